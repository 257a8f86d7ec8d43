"""Medusa head exports: vLLM's `MedusaModel` layout and the FasterDecoding layout (FORMATS.md 1.3 with the
corrections of FAMILIES.md D5).

vllm_medusa   config.json  {"architectures": ["MedusaModel"], "model_type": "medusa", "hidden_size", "num_heads",
                            "num_hidden_layers", "vocab_size", "truncated_vocab_size", "medusa_fc_bias": true, ...}
              model.safetensors  blocks.{k}.layers.{l}.weight [H, H], blocks.{k}.layers.{l}.bias [H],
                                 lm_heads.{k}.weight [Vd, H], token_map int64 [Vd] (reduced vocabulary only)
    vLLM drops what it does not expect without a word: biases unless `medusa_fc_bias: true`, a missing
    `hidden_size` becomes 4096, a `token_map` is read only when truncated_vocab_size < vocab_size, heads
    beyond `num_speculative_tokens` are skipped and missing ones stay uninitialised. `check_vllm` refuses
    each of these before anything is written. Serve with
    --speculative-config '{"method": "medusa", "model": DIR, "num_speculative_tokens": K}', K <= num_heads.
medusa_fd     config.json  {"medusa_num_heads", "medusa_num_layers", "base_model_name_or_path", ...}
              medusa_lm_head.safetensors (= model.safetensors, a hard link)  {k}.{l}.linear.weight,
                                 {k}.{l}.linear.bias, {k}.{L}.weight [V, H]
    The Medusa-1.0 per-head layout, in the file FasterDecoding's trainer writes; its loaders read only
    medusa_lm_head.pt: `torch.save(safetensors.torch.load_file("medusa_lm_head.safetensors"),
    "medusa_lm_head.pt")` to load it there (the model card says so). Its heads are full-vocabulary, so a
    reduced head vocabulary cannot be written in it (engine gap).
Both write medusa_tree.json (held-out accuracy counts per head and rank, and the static sparse tree).

Both reload here through `specdistill.loading.load_drafter` (the drafter config rides in specdistill_export.json).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from specdistill import config as _config
from specdistill import drafters
from specdistill.export import common, formats, native
from specdistill.export.contracts import ContractError

VLLM = "vllm_medusa"
FD = "medusa_fd"
_BLOCK = re.compile(r"^blocks\.(\d+)\.layers\.(\d+)\.(weight|bias)$")
_HEAD = re.compile(r"^lm_heads\.(\d+)\.weight$")


def _gap(drafter) -> str | None:
    name = common.spec_of(drafter).name
    if name != "medusa":
        return f"only Medusa heads can be written in this layout (drafter {name!r})"
    if drafter.variant == "hydra":
        return "Hydra heads read the draft's earlier tokens; no engine serves them (native export only)"
    return None


def fd_gap(drafter) -> str | None:
    gap = _gap(drafter)
    if gap:
        return gap
    info = drafter.export_info()
    if info["draft_vocab_size"] < info["vocab_size"]:
        return (f"FasterDecoding heads are full-vocabulary; this drafter has a reduced head vocabulary "
                f"({info['draft_vocab_size']} of {info['vocab_size']}): use vllm_medusa, or train with "
                "drafter.draft_vocab_size=0")
    return None


TREE_FILE = "medusa_tree.json"
FD_WEIGHTS = "medusa_lm_head.safetensors"


def tree_files(drafter, target, out_dir, dtype: str = "") -> dict:
    """medusa_tree.json: what the sparse tree is built from, so an engine-layout export drafts the same tree here."""
    return {TREE_FILE: common.json_writer(_meta_extra(drafter))}


def fd_files(drafter, target, out_dir, dtype: str = "") -> dict:
    def link(p: Path) -> None:  # written after model.safetensors (common.write_export's order): no second copy
        os.link(p.parent / "model.safetensors", p)

    return {**tree_files(drafter, target, out_dir), FD_WEIGHTS: link}


def card_serving(inp, repo: str) -> list[str]:
    """Model-card serving text (export/card.py `_serving`)."""
    k = int(inp.meta.get("drafter_config", {}).get("num_heads", 4))
    changed = ["", "**The target was fine-tuned with LoRA (Medusa-2):** serve the adapted target, the run's "
               "`native` export ships `target_adapter.safetensors` (`export.target_adapters=merged` writes a merged "
               "target); with the original target these heads draft for a model that no longer exists."] \
        if inp.meta.get("target_changed") else []
    if inp.meta.get("format") == FD:
        return ["### FasterDecoding Medusa", "",
                f"`config.json` and `{FD_WEIGHTS}` are FasterDecoding's Medusa-1.0 layout; its loaders read only "
                "`medusa_lm_head.pt`, so convert first: `torch.save(safetensors.torch.load_file("
                f"'{FD_WEIGHTS}'), 'medusa_lm_head.pt')`.", *changed, ""]
    spec = json.dumps({"method": "medusa", "model": repo, "num_speculative_tokens": k}, separators=(",", ":"))
    return ["### vLLM", "", "```bash", f"vllm serve {inp.meta.get('target', '<target>')} --speculative-config '{spec}'",
            "```", "", f"`num_speculative_tokens` must not exceed the {k} exported heads (vLLM would run "
            "uninitialised heads); vLLM V1 drafts a chain (top-1 of each head), not the sparse tree.", *changed, ""]


def _meta_extra(drafter) -> dict:
    info = drafter.export_info()
    return {"head_accuracy_counts": info["accuracy_counts"], "head_accuracy_totals": info["accuracy_totals"],
            "medusa_tree": info["tree"]}


# -- vLLM MedusaModel ---------------------------------------------------------------------------------


def build_vllm(drafter, target, dtype: str = "bfloat16") -> tuple[dict, dict]:
    gap = _gap(drafter)
    if gap:
        raise ContractError(f"{VLLM} export: {gap}")
    tensors = common.cast(drafter.export_state_dict(), common.torch_dtype(dtype))
    info = drafter.export_info()
    cfg = {
        "architectures": ["MedusaModel"],
        "model_type": "medusa",
        "hidden_size": info["hidden_size"],
        "num_heads": info["num_heads"],
        "num_hidden_layers": info["num_layers"],
        "vocab_size": info["vocab_size"],
        "truncated_vocab_size": info["draft_vocab_size"],
        "medusa_fc_bias": any(k.endswith(".bias") for k in tensors),
        "original_lm_head": False,
        "torch_dtype": dtype,
        "transformers_version": common.transformers_version(),
    }
    return cfg, tensors


def _int(cfg, key, where):
    v = cfg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ContractError(f"{where}: config key {key!r} must be an explicit positive integer, got {v!r}"
                            + (" (vLLM's MedusaConfig would default it to 4096)" if key == "hidden_size" else ""))
    return v


def check_vllm(cfg: dict, tensors: dict, num_target_layers: int = 0) -> None:
    """Refuse what vLLM's MedusaModel loader would misread or drop silently (FAMILIES.md D2, D5.4)."""
    where = f"{VLLM} export"
    if cfg.get("model_type") != "medusa" or "MedusaModel" not in (cfg.get("architectures") or []):
        raise ContractError(f"{where}: config needs model_type 'medusa' and architectures ['MedusaModel'] "
                            f"(got {cfg.get('model_type')!r}, {cfg.get('architectures')!r})")
    h = _int(cfg, "hidden_size", where)
    k_heads = _int(cfg, "num_heads", where)
    n_layers = _int(cfg, "num_hidden_layers", where)
    v = _int(cfg, "vocab_size", where)
    vt = cfg.get("truncated_vocab_size")
    vt = v if vt is None else vt
    if cfg.get("original_lm_head"):
        raise ContractError(f"{where}: original_lm_head true shares lm_heads.0 across heads; these heads have "
                            "their own output layers")
    blocks, heads, unknown = {}, {}, []
    for key, t in tensors.items():
        if (m := _BLOCK.match(key)):
            blocks[(int(m[1]), int(m[2]), m[3])] = t
        elif (m := _HEAD.match(key)):
            heads[int(m[1])] = t
        elif key != "token_map":
            unknown.append(key)
    if unknown:
        raise ContractError(f"{where}: tensors vLLM does not read (it drops them silently): {sorted(unknown)[:5]}")
    if sorted(heads) != list(range(len(heads))) or len(heads) != k_heads:
        raise ContractError(f"{where}: num_heads is {k_heads} but lm_heads.{{k}} exist for {sorted(heads)}: vLLM "
                            "would build heads that stay uninitialised or skip exported ones")
    has_bias = any(kind == "bias" for (_, _, kind) in blocks)
    if has_bias and cfg.get("medusa_fc_bias") is not True:
        raise ContractError(f"{where}: the ResBlocks have biases but medusa_fc_bias is not true: vLLM would drop "
                            "every bias without an error")
    for k in range(k_heads):
        for layer in range(n_layers):
            w = blocks.get((k, layer, "weight"))
            if w is None or tuple(w.shape) != (h, h):
                raise ContractError(f"{where}: blocks.{k}.layers.{layer}.weight must be [{h}, {h}] (hidden_size), "
                                    f"got {None if w is None else tuple(w.shape)}")
            b = blocks.get((k, layer, "bias"))
            if cfg.get("medusa_fc_bias") and (b is None or tuple(b.shape) != (h,)):
                raise ContractError(f"{where}: medusa_fc_bias is true but blocks.{k}.layers.{layer}.bias is "
                                    f"{None if b is None else tuple(b.shape)}, expected [{h}]")
        if tuple(heads[k].shape) != (vt, h):
            raise ContractError(f"{where}: lm_heads.{k}.weight must be [truncated_vocab_size {vt}, hidden_size {h}], "
                                f"got {tuple(heads[k].shape)}")
    extra = sorted(f"blocks.{k}.layers.{la}" for (k, la, _) in blocks if k >= k_heads or la >= n_layers)
    if extra:
        raise ContractError(f"{where}: blocks beyond num_heads/num_hidden_layers would be skipped: {extra[:4]}")
    tm = tensors.get("token_map")
    if vt < v:
        if tm is None or tm.dtype != torch.int64 or tuple(tm.shape) != (vt,):
            raise ContractError(f"{where}: truncated_vocab_size {vt} < vocab_size {v} needs token_map int64 [{vt}], "
                                f"got {None if tm is None else (tm.dtype, tuple(tm.shape))}")
        if int(tm.min()) < 0 or int(tm.max()) >= v or tm.unique().numel() != vt:
            raise ContractError(f"{where}: token_map must hold {vt} distinct target ids in [0, {v})")
    elif vt != v:
        raise ContractError(f"{where}: truncated_vocab_size {vt} exceeds vocab_size {v}")
    elif tm is not None:
        raise ContractError(f"{where}: token_map is only read when truncated_vocab_size < vocab_size; it would be dropped")


def check_serving(cfg: dict, num_speculative_tokens: int) -> None:
    """vLLM builds exactly num_speculative_tokens heads: more than the export holds leaves heads uninitialised."""
    if num_speculative_tokens > int(cfg.get("num_heads", 0)):
        raise ContractError(f"{VLLM}: num_speculative_tokens {num_speculative_tokens} exceeds the {cfg.get('num_heads')} "
                            "exported heads (vLLM would run uninitialised heads)")


def write_vllm(drafter, target, out_dir: str | Path, dtype: str = "bfloat16") -> Path:
    cfg, tensors = build_vllm(drafter, target, dtype)
    check_vllm(cfg, tensors)
    meta = {**common.metadata(drafter, target, VLLM, dtype), **_meta_extra(drafter)}
    return common.write_export(Path(out_dir), cfg, tensors, meta, extra=tree_files(drafter, target, out_dir))


# -- FasterDecoding --------------------------------------------------------------------------------------


def build_fd(drafter, target, dtype: str = "bfloat16") -> tuple[dict, dict]:
    gap = fd_gap(drafter)
    if gap:
        raise ContractError(f"{FD} export: {gap}")
    sd = drafter.export_state_dict()
    info = drafter.export_info()
    n_layers = info["num_layers"]
    out = {}
    for key, t in sd.items():
        if (m := _BLOCK.match(key)):
            out[f"{m[1]}.{m[2]}.linear.{m[3]}"] = t
        elif (m := _HEAD.match(key)):
            out[f"{m[1]}.{n_layers}.weight"] = t
    cfg = {"medusa_num_heads": int(info["num_heads"]), "medusa_num_layers": int(n_layers),
           "base_model_name_or_path": common.target_name(target),
           "transformers_version": common.transformers_version()}
    return cfg, common.cast(out, common.torch_dtype(dtype))


def check_fd(cfg: dict, tensors: dict, num_target_layers: int = 0) -> None:
    where = f"{FD} export"
    for key in ("medusa_num_heads", "medusa_num_layers", "base_model_name_or_path"):
        if key not in cfg:
            raise ContractError(f"{where}: config key {key!r} is required and missing")
    k, n = cfg["medusa_num_heads"], cfg["medusa_num_layers"]
    want = {f"{h}.{la}.linear.{p}" for h in range(k) for la in range(n) for p in ("weight", "bias")}
    want |= {f"{h}.{n}.weight" for h in range(k)}
    if set(tensors) != want:
        raise ContractError(f"{where}: tensors do not match {k} heads x {n} layers (missing "
                            f"{sorted(want - set(tensors))[:3]}, unexpected {sorted(set(tensors) - want)[:3]})")


def write_fd(drafter, target, out_dir: str | Path, dtype: str = "bfloat16") -> Path:
    cfg, tensors = build_fd(drafter, target, dtype)
    check_fd(cfg, tensors)
    meta = {**common.metadata(drafter, target, FD, dtype), **_meta_extra(drafter)}
    return common.write_export(Path(out_dir), cfg, tensors, meta, extra=fd_files(drafter, target, out_dir))


# -- loading back ----------------------------------------------------------------------------------------


def load(path: str | Path, target, device=None):
    """Rebuild the Medusa drafter from a vllm_medusa or medusa_fd directory written here (refusing foreign tensors)."""
    path = Path(path)
    meta = json.loads((path / "specdistill_export.json").read_text())
    cfg = json.loads((path / "config.json").read_text())
    where = str(path / "model.safetensors")
    raw = load_file(where)
    if meta["format"] == VLLM:
        check_vllm(cfg, raw)
        sd = raw
    else:
        check_fd(cfg, raw)
        n = cfg["medusa_num_layers"]
        sd = {}
        for key, t in raw.items():
            h, la, *rest = key.split(".")
            sd[f"lm_heads.{h}.weight" if int(la) == n else f"blocks.{h}.layers.{la}.{rest[-1]}"] = t
    spec = drafters.get(meta["family"])
    dcfg = _config._merge(spec.config_cls(), meta["drafter_config"], "drafter_config.")
    drafter = drafters.build(dcfg, target)
    tm = sd.pop("token_map", None)
    own = {k for k in drafter.state_dict() if k.startswith(("blocks.", "lm_heads."))}
    if set(sd) != own:
        raise ValueError(f"{where}: tensors do not match the drafter built from its config (missing "
                         f"{sorted(own - set(sd))[:3]}, unexpected {sorted(set(sd) - own)[:3]})")
    if tm is not None:  # the drafter installs a map that comes with the weights (d2t/t2d, data/vocab.py)
        if not torch.equal(tm.sort().values, tm):
            raise ValueError(f"{where}: token_map is not ascending; specdistill's draft ids are in target-id order")
        t2d = torch.zeros(int(cfg["vocab_size"]), dtype=torch.bool)
        t2d[tm] = True
        sd.update(d2t=tm - torch.arange(tm.numel()), t2d=t2d)
    tree = json.loads((path / TREE_FILE).read_text()) if (path / TREE_FILE).is_file() else meta
    if "head_accuracy_counts" in tree:
        sd.update(acc_counts=torch.tensor(tree["head_accuracy_counts"], dtype=torch.int64),
                  acc_totals=torch.tensor(tree["head_accuracy_totals"], dtype=torch.int64))
    drafter.load_state_dict(sd, strict=False)
    if device is not None:
        drafter = drafter.to(device)
    return drafter.eval()


formats.register(formats.ExportFormat(
    name=VLLM, build=build_vllm, check=check_vllm, engine="vLLM (MedusaModel, method medusa)", engine_gap=_gap,
    claims=lambda p: native.is_engine_export(p, VLLM), load=load, card_serving=card_serving, files=tree_files))
formats.register(formats.ExportFormat(
    name=FD, build=build_fd, check=check_fd, engine="FasterDecoding Medusa (convert to medusa_lm_head.pt)",
    engine_gap=fd_gap, claims=lambda p: native.is_engine_export(p, FD), load=load, card_serving=card_serving,
    files=fd_files))
