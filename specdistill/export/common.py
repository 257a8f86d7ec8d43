"""Pieces every export writer shares: dtype casting, EAGLE dimensions, metadata, atomic directory writes."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from specdistill import targets as _targets

LAYER_CONVENTION = (
    "layer id i (0 <= i < N) = hidden state entering decoder layer i = HF output_hidden_states[i] "
    "= vLLM/SGLang eagle_aux_hidden_state_layer_ids (capture-before-layer); id N = last decoder "
    "output before the final norm (specdistill/targets.py)"
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"export.dtype ({name!r}) must be one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors to `dtype`; integer/bool maps (d2t, t2d) keep theirs. Contiguous CPU copies."""
    out = {}
    for k, v in tensors.items():
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous().clone()
    return out


def spec_of(drafter):
    spec = getattr(drafter, "spec", None)
    if spec is None:
        from specdistill import drafters

        spec = drafters.get(drafter.cfg.name)
    return spec


def drafter_config_dict(drafter) -> dict:
    cfg = drafter.cfg
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(vars(cfg))


def layer_ids(drafter, target) -> list[int]:
    """The aux layer ids the drafter reads, in the targets.py convention (explicit, never defaulted)."""
    ids = getattr(drafter, "layer_ids", None) or getattr(drafter.cfg, "layer_ids", None)
    if not ids:
        ids = spec_of(drafter).target_layers(drafter.cfg, target.config)
    return [int(i) for i in ids]


def _rope_theta(hf_cfg) -> float:
    theta = getattr(hf_cfg, "rope_theta", None)
    if theta is None:
        rp = getattr(hf_cfg, "rope_parameters", None) or {}
        theta = rp.get("rope_theta") if isinstance(rp, dict) else None
    return float(theta if theta is not None else 10000.0)


def rope_scaling(hf_cfg) -> dict | None:
    """HF `rope_scaling` for a non-default RoPE (llama3, yarn, ...); None for plain RoPE."""
    rp = getattr(hf_cfg, "rope_parameters", None) or getattr(hf_cfg, "rope_scaling", None)
    if not isinstance(rp, dict) or rp.get("rope_type", rp.get("type", "default")) == "default":
        return None
    return {k: v for k, v in rp.items() if k != "rope_theta"}


def eagle3_engine_gap(drafter) -> str | None:
    """Why the SGLang/vLLM EAGLE-3 layouts cannot express this drafter, or None if they can."""
    c = drafter.cfg
    variant = getattr(c, "variant", "eagle3")
    if variant != "eagle3":
        return f"variant {variant!r} has no EAGLE-3 engine layout (only eagle3, with or without HASS options)"
    if getattr(c, "num_layers", 1) != 1:
        return f"drafter.num_layers={c.num_layers}: the engines' EAGLE-3 loaders read exactly one draft layer"
    return None


def eagle_dims(drafter, target, tensors: dict[str, torch.Tensor]) -> dict:
    """Architecture numbers of an EAGLE draft layer: drafter.cfg first, the target's config second.

    Shapes are *not* inferred from the tensors here on purpose: the contract check compares these
    numbers against the tensors, so a drafter whose weights disagree with its config is caught.
    """
    c, t = drafter.cfg, target.config
    lc = getattr(drafter, "llama_config", None)  # the draft layer's own LlamaConfig, when the family has one

    def pick(name, default=None):
        v = getattr(lc, name, None) if lc is not None else None
        if v in (None, 0, ""):
            v = getattr(c, name, None)
        if v in (None, 0, ""):
            v = getattr(t, name, None)
        return default if v is None else v

    hidden = int(pick("hidden_size"))
    heads = int(pick("num_attention_heads"))
    head_dim = pick("head_dim") or hidden // heads
    draft_vocab = getattr(drafter, "draft_vocab_size", None) or getattr(c, "draft_vocab_size", None) or target.vocab_size
    return {
        "hidden_size": hidden,
        "intermediate_size": int(pick("intermediate_size")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(pick("num_key_value_heads", heads)),
        "head_dim": int(head_dim),
        "rms_norm_eps": float(pick("rms_norm_eps", 1e-5)),
        "max_position_embeddings": int(pick("max_position_embeddings", 2048)),
        "rope_theta": _rope_theta(lc) if lc is not None else _rope_theta(t),
        "rope_scaling": rope_scaling(lc if lc is not None else t),
        "hidden_act": str(pick("hidden_act", "silu")),
        "initializer_range": float(pick("initializer_range", 0.02)),
        "vocab_size": int(target.vocab_size),
        "draft_vocab_size": int(draft_vocab),
        "target_hidden_size": int(target.hidden_size),
        "target_num_layers": int(target.num_layers),
        "bos_token_id": getattr(t, "bos_token_id", None),
        "eos_token_id": getattr(t, "eos_token_id", None),
        "pad_token_id": getattr(t, "pad_token_id", None),
        "norm_before_residual": bool(getattr(c, "norm_before_residual", False)),
        "layer_ids": layer_ids(drafter, target),
    }


def target_name(target) -> str:
    return getattr(target, "name", "") or getattr(target.config, "_name_or_path", "") or _targets.DEFAULT_NAME


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def metadata(drafter, target, fmt: str, dtype: str) -> dict:
    spec = spec_of(drafter)
    return {
        "format": fmt,
        "family": spec.name,
        "variant": getattr(drafter.cfg, "variant", None),
        "drafter_config": drafter_config_dict(drafter),
        "target": target_name(target),
        "target_license": getattr(target, "license", "") or None,
        "target_num_layers": int(target.num_layers),
        "layer_ids": layer_ids(drafter, target),
        "layer_convention": LAYER_CONVENTION,
        "dtype": dtype,
        "paper": spec.paper,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
    }


def atomic_dir(out_dir: Path, fill: Callable[[Path], object]):
    """Run `fill(tmp)` on a temp sibling directory, then swap it into place atomically.

    A crash leaves either the previous directory or nothing at `out_dir`, never a half-written one.
    Returns what `fill` returned.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp{os.getpid()}"
    old = out_dir.parent / f".{out_dir.name}.old{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        result = fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return result


def write_dir(out_dir: Path, files: dict[str, Callable[[Path], None]]) -> Path:
    """Write every file of `files` (name -> writer) into `out_dir` atomically (see atomic_dir)."""

    def fill(tmp: Path) -> None:
        for name, fn in files.items():
            fn(tmp / name)

    atomic_dir(out_dir, fill)
    return Path(out_dir)


def write_export(out_dir: Path, cfg: dict, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """The three files every export format writes: config.json, model.safetensors, specdistill_export.json."""
    return write_dir(Path(out_dir), {
        "config.json": json_writer(cfg),
        "model.safetensors": safetensors_writer(tensors),
        "specdistill_export.json": json_writer(meta),
    })


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def json_writer(obj: dict) -> Callable[[Path], None]:
    return lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def safetensors_writer(tensors: dict[str, torch.Tensor], meta: dict | None = None) -> Callable[[Path], None]:
    return lambda p: save_file(tensors, str(p), metadata={"format": "pt", **(meta or {})})


def llama_config(architecture: str, d: dict, num_layers: int, dtype: str) -> dict:
    """The Llama `config.json` fields SGLang's EAGLE draft models (EAGLE-1 and EAGLE-3) read, from
    `eagle_dims`; the embedding and head are the target's, so they are never tied."""
    return {
        "architectures": [architecture],
        "model_type": "llama",
        "bos_token_id": d["bos_token_id"],
        "eos_token_id": d["eos_token_id"],
        "pad_token_id": d["pad_token_id"],
        "hidden_act": d["hidden_act"],
        "hidden_size": d["hidden_size"],
        "initializer_range": d["initializer_range"],
        "intermediate_size": d["intermediate_size"],
        "max_position_embeddings": d["max_position_embeddings"],
        "num_attention_heads": d["num_attention_heads"],
        "num_key_value_heads": d["num_key_value_heads"],
        "head_dim": d["head_dim"],
        "num_hidden_layers": int(num_layers),
        "rms_norm_eps": d["rms_norm_eps"],
        "rope_theta": d["rope_theta"],
        "rope_scaling": d["rope_scaling"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "transformers_version": transformers_version(),
        "use_cache": True,
        "vocab_size": d["vocab_size"],
    }
