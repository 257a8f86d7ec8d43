"""A small draft LM as a standard Hugging Face model directory (FAMILIES.md D3/D4, FIELD.md 4.1-4.3).

    config.json              the draft's transformers config (architectures *ForCausalLM, vocab_size = the target's)
    model.safetensors        its weights under transformers' names (a tied head is stored once, as save_pretrained does)
    generation_config.json   the target's, plus num_assistant_tokens (the measured draft length; schedule constant)
                             and assistant_confidence_threshold when the evaluation used one
    tokenizer files          the target's, byte-identical (copied from its directory)
    specdistill_export.json  metadata (family, drafter config, target)

Readers: transformers `target.generate(..., assistant_model=AutoModelForCausalLM.from_pretrained(dir))`,
vLLM `--speculative-config '{"method": "draft_model", "model": dir, "num_speculative_tokens": k}'`,
SGLang `--speculative-algorithm STANDALONE --speculative-draft-model-path dir`.

Contract checks before anything is written: the vocabulary equals the target's (vLLM refuses a different
`get_vocab_size()`, HF then switches to universal assisted decoding); the tokenizer files reload to the
target's vocabulary; and the directory path never contains `eagle-`, `eagle3`, `dflash` or `dspark`,
which make vLLM switch method silently (FIELD.md 4.1).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from specdistill import fsutil
from specdistill.export import common, contracts, formats

FORMAT = "hf_draft"
VLLM_PATH_TRIGGERS = ("eagle-", "eagle3", "dflash", "dspark")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json")
DEFAULT_DRAFT_TOKENS = 3


def path_problem(path: str | Path) -> str | None:
    """Why vLLM would not read `path` as a draft_model (a method-switching substring), or None."""
    s = str(path).lower()
    hit = [t for t in VLLM_PATH_TRIGGERS if t in s]
    if hit:
        return (f"{path}: contains {hit[0]!r}, which makes vLLM switch the speculative method away from draft_model "
                f"whatever the config says (FIELD.md 4.1); choose a path without {', '.join(VLLM_PATH_TRIGGERS)}")
    return None


def engine_gap(drafter) -> str | None:
    info = drafter.export_info()
    if "hf_config" not in info:
        return f"{FORMAT} needs a whole causal LM drafter (small_lm), not {drafter.spec.name!r}"
    vd, v = int(info.get("draft_vocab_size") or info["vocab_size"]), int(info["vocab_size"])
    if vd != v:
        return (f"{FORMAT} needs the target's whole vocabulary ({v} tokens) but this draft's output layer covers "
                f"drafter.draft_vocab_size={vd}: HF assisted generation, vLLM draft_model and SGLang STANDALONE "
                "read draft logits as target token ids; export it as native (specdistill eval) or train with "
                "drafter.draft_vocab_size=0")
    return None


def build(drafter, target, dtype: str = "bfloat16") -> tuple[dict, dict]:
    gap = engine_gap(drafter)
    if gap:
        raise contracts.ContractError(f"{FORMAT} export: {gap}")
    info = drafter.export_info()
    cfg = json.loads(info["hf_config"].to_json_string(use_diff=False))
    cfg.pop("_name_or_path", None)
    cfg["architectures"] = [info["architecture"]]
    cfg["torch_dtype"] = cfg["dtype"] = dtype
    cfg["transformers_version"] = common.transformers_version()
    cfg["target_vocab_size"] = int(target.vocab_size)
    tensors = common.cast(drafter.export_state_dict(), common.torch_dtype(dtype))
    return cfg, tensors


def check(cfg: dict, tensors: dict, num_target_layers: int) -> None:
    where = f"{FORMAT} export"
    archs = cfg.get("architectures") or []
    if not any(str(a).endswith("ForCausalLM") for a in archs):
        raise contracts.ContractError(f"{where}: config.json architectures {archs} is not a *ForCausalLM")
    v, tv = cfg.get("vocab_size"), cfg.get("target_vocab_size")
    emb = tensors.get("model.embed_tokens.weight")
    if emb is None:
        raise contracts.ContractError(f"{where}: model.embed_tokens.weight is missing")
    heads = {k: tuple(t.shape) for k, t in tensors.items() if k in ("lm_head.weight", "model.embed_tokens.weight")}
    if v != tv or any(s[0] != tv for s in heads.values()):
        raise contracts.ContractError(f"{where}: vocab_size {v} / tensor rows {heads} differ from the target's {tv}; "
                                      "vLLM draft_model and HF assisted generation need the target's vocabulary exactly")
    if "lm_head.weight" not in tensors and not cfg.get("tie_word_embeddings"):
        raise contracts.ContractError(f"{where}: lm_head.weight is missing and tie_word_embeddings is off")
    n = cfg.get("num_hidden_layers")
    have = {int(k.split(".")[2]) for k in tensors if k.startswith("model.layers.")}
    if have != set(range(int(n or 0))):
        raise contracts.ContractError(f"{where}: num_hidden_layers is {n} but the weights hold layers {sorted(have)}")


def _tokenizer_bytes(target) -> dict[str, bytes]:
    """The target's tokenizer files: copied from its directory, else saved from the in-memory tokenizer."""
    tok = target.tokenizer
    if tok is None:
        raise contracts.ContractError(f"{FORMAT} export: the target has no tokenizer to ship with the draft")
    src = Path(str(getattr(tok, "name_or_path", "") or ""))
    found = {n: (src / n).read_bytes() for n in TOKENIZER_FILES if src.is_dir() and (src / n).is_file()}
    if found:
        return found
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return {n: (Path(d) / n).read_bytes() for n in TOKENIZER_FILES if (Path(d) / n).is_file()}


def _check_tokenizer(target, files: dict[str, bytes]) -> None:
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        for n, b in files.items():
            (Path(d) / n).write_bytes(b)
        back = AutoTokenizer.from_pretrained(d)
    if back.get_vocab() != target.tokenizer.get_vocab():
        raise contracts.ContractError(f"{FORMAT} export: the tokenizer files reload to a vocabulary that differs "
                                      f"from the target's ({getattr(target.tokenizer, 'name_or_path', '')})")


def generation_config(target, num_assistant_tokens: int, confidence: float = 0.0) -> dict:
    gc = json.loads(target.model.generation_config.to_json_string(use_diff=True))
    gc.pop("transformers_version", None)
    gc.update(num_assistant_tokens=int(num_assistant_tokens), num_assistant_tokens_schedule="constant")
    if confidence > 0:
        gc["assistant_confidence_threshold"] = float(confidence)
    return gc


def _measured(export_dir: Path) -> tuple[int, float] | None:
    """(draft length, confidence threshold) from the directory's eval.json: its best k if it swept several,
    else the k it ran with."""
    try:
        ev = json.loads((Path(export_dir) / "eval.json").read_text())
    except (OSError, ValueError):
        return None
    s = ev.get("settings") or {}
    k = ev.get("best_num_draft_tokens") or s.get("num_draft_tokens")
    if not isinstance(k, int) or k < 1:
        return None
    return k, float(s.get("draft_confidence") or 0.0)


def files(drafter, target, out_dir: Path, dtype: str = "") -> dict:
    """Tokenizer files + generation_config.json, after the path, vocabulary and tokenizer checks."""
    bad = path_problem(Path(out_dir).resolve()) or path_problem(out_dir)
    if bad:
        raise contracts.ContractError(f"{FORMAT} export: {bad}")
    if int(drafter.export_info()["vocab_size"]) != int(target.vocab_size):
        raise contracts.ContractError(f"{FORMAT} export: draft vocabulary {drafter.export_info()['vocab_size']} "
                                      f"differs from the target's {target.vocab_size}")
    tok = _tokenizer_bytes(target)
    _check_tokenizer(target, tok)
    k, conf = _measured(out_dir) or (DEFAULT_DRAFT_TOKENS, 0.0)
    gc = generation_config(target, k, conf)
    out = {n: (lambda p, b=b: p.write_bytes(b)) for n, b in tok.items()}
    out["generation_config.json"] = common.json_writer(gc)
    return out


def sync_generation_config(export_dir: str | Path) -> dict | None:
    """Rewrite generation_config.json with the draft length measured by the eval.json beside it (after
    `specdistill eval` or a recipe's scoring); returns the new config, or None when nothing was measured."""
    d = Path(export_dir)
    m = _measured(d)
    p = d / "generation_config.json"
    if m is None or not p.is_file():
        return None
    gc = json.loads(p.read_text())
    gc.update(num_assistant_tokens=m[0], num_assistant_tokens_schedule="constant")
    if m[1] > 0:
        gc["assistant_confidence_threshold"] = m[1]
    else:
        gc.pop("assistant_confidence_threshold", None)
    fsutil.atomic_write_text(p, json.dumps(gc, indent=2) + "\n")
    return gc


def claims(path: Path) -> bool:
    p = Path(path) / "specdistill_export.json"
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def load(path: str | Path, target, device=None):
    """The small_lm drafter of this directory (init = the directory itself; vocabulary checked)."""
    from specdistill import config as _config
    from specdistill import drafters

    path = Path(path)
    meta = json.loads((path / "specdistill_export.json").read_text())
    spec = drafters.get(meta.get("family") or "small_lm")
    dcfg = _config._merge(spec.config_cls(), {**meta.get("drafter_config", {}), "init": str(path)},
                          "drafter_config.")
    drafter = drafters.build(dcfg, target)
    if device is not None:
        drafter = drafter.to(device)
    return drafter.eval()


def card_serving(inp, repo: str) -> list[str]:
    """vLLM draft_model and SGLang STANDALONE launch lines for this directory (card.py `_serving`)."""
    from specdistill.export import card

    target = card.target_of(inp)
    try:
        gc = json.loads((Path(inp.export_dir) / "generation_config.json").read_text())
    except (OSError, ValueError):
        gc = {}
    k = int(gc.get("num_assistant_tokens") or card.speculative_tokens(inp))
    spec = json.dumps({"method": "draft_model", "model": repo, "num_speculative_tokens": k}, separators=(",", ":"))
    parts = ["### vLLM", "", "```bash", f"vllm serve {target} --speculative-config '{spec}'", "```", "",
             "A plain causal LM with the target's vocabulary and tokenizer (vLLM requires equal vocabulary sizes).", ""]
    bad = path_problem(repo)
    if bad:
        parts += [f"**Warning:** {bad}", ""]
    parts += ["### SGLang", "", "```bash",
              f"python -m sglang.launch_server --model {target} --speculative-algorithm STANDALONE \\",
              f"  --speculative-draft-model-path {repo} --speculative-num-steps {k} \\",
              f"  --speculative-eagle-topk 1 --speculative-num-draft-tokens {k + 1}", "```", "",
              "SGLang does not check the draft's vocabulary; this draft uses the target's token ids exactly.", ""]
    return parts


formats.register(formats.ExportFormat(
    name=FORMAT, build=build, check=check, engine="HF assisted generation / vLLM draft_model / SGLang STANDALONE",
    engine_gap=engine_gap, claims=claims, load=load, card_serving=card_serving, files=files))
