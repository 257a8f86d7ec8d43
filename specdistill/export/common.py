"""Pieces every export writer shares: dtype casting, EAGLE dimensions, metadata, atomic directory writes."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from specdistill import targets as _targets
from specdistill.fsutil import fsync_dir, fsync_tree, sha256_file, umask_mode

log = logging.getLogger(__name__)

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
    """The drafter's DrafterSpec: the registry entry of its config's family name."""
    from specdistill import drafters

    return drafters.get(drafter.cfg.name)


def drafter_config_dict(drafter) -> dict:
    cfg = drafter.cfg
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(vars(cfg))


def layer_ids(drafter, target) -> list[int]:
    """The aux layer ids the drafter reads, in the targets.py convention (explicit, never defaulted):
    its export_info()'s `layer_ids`, else the ids its spec resolves for this target."""
    ids = drafter.export_info().get("layer_ids")
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
    variant = drafter.variant
    if variant != "eagle3":
        return f"variant {variant!r} has no EAGLE-3 engine layout (only eagle3, with or without HASS options)"
    num_layers = drafter.export_info().get("num_layers", 1)
    if num_layers != 1:
        return f"drafter.num_layers={num_layers}: the engines' EAGLE-3 loaders read exactly one draft layer"
    return None


def eagle_dims(drafter, target, tensors: dict[str, torch.Tensor]) -> dict:
    """Architecture numbers of an EAGLE draft layer: the draft layer's own LlamaConfig (export_info()
    `llama_config`, when the family has one) first, the target's config second.

    Shapes are *not* inferred from the tensors here on purpose: the contract check compares these
    numbers against the tensors, so a drafter whose weights disagree with its config is caught.
    """
    info, t = drafter.export_info(), target.config
    lc = info.get("llama_config")

    def pick(name, default=None):
        v = getattr(lc, name, None) if lc is not None else None
        if v in (None, 0, ""):
            v = getattr(t, name, None)
        return default if v is None else v

    hidden = int(pick("hidden_size"))
    heads = int(pick("num_attention_heads"))
    head_dim = pick("head_dim") or hidden // heads
    draft_vocab = info.get("draft_vocab_size") or target.vocab_size
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
        "norm_before_residual": bool(info.get("norm_before_residual", False)),
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
        "variant": drafter.variant or None,
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
        **({"target_changed": True, "target_adapters": TARGET_ADAPTERS_NOTE} if target.has_adapters else {}),
    }


TARGET_ADAPTERS_NOTE = ("the target was fine-tuned with LoRA adapters during training: serve it with the native "
                        "export's target_adapter.safetensors (+ adapter_config.json, peft layout) applied, or the "
                        "merged target (export.target_adapters=merged)")


_STAGING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)(?P<pid>\d+)$")
EXPORT_FILES = ("config.json", "specdistill_export.json")  # plus every *.safetensors: what an export writes
CARRIED_EVAL = ("eval.json", "eval.png")  # written by `specdistill eval`, kept across a re-export
EVAL_STALE = ".eval_stale"  # sha256 of an eval.json that measured the weights before a re-export


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers from an earlier call in this process are stale too
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def clean_stale(out_dir: Path) -> None:
    """Remove `.<name>.tmp<pid>` / `.<name>.old<pid>` folders left beside `out_dir` by a writer that died.

    If `out_dir` itself is missing (a crash between the two renames), the newest dead `.old<pid>` copy is
    renamed back first: it is the last complete directory. Folders of a live process are left alone.
    """
    out_dir = Path(out_dir)
    parent = out_dir.parent
    if not parent.is_dir():
        return
    stale: list[tuple[str, Path]] = []
    for p in parent.iterdir():
        m = _STAGING.match(p.name)
        if m and m["name"] == out_dir.name and p.is_dir() and not p.is_symlink() and not _pid_alive(int(m["pid"])):
            stale.append((m["kind"], p))
    olds = sorted((p for k, p in stale if k == "old"), key=lambda p: p.stat().st_mtime)
    if olds and not out_dir.exists() and not out_dir.is_symlink():
        log.warning("%s: missing after an interrupted write; restoring the previous copy %s", out_dir, olds[-1].name)
        os.replace(olds[-1], out_dir)
        fsync_dir(parent)
        stale = [(k, p) for k, p in stale if p != olds[-1]]
    for _kind, p in stale:
        log.info("removing %s (left by an interrupted write)", p)
        shutil.rmtree(p, ignore_errors=True)


def atomic_dir(out_dir: Path, fill: Callable[[Path], object], carry: Callable[[Path, Path], None] | None = None):
    """Run `fill(tmp)` on a temp sibling directory, then swap it into place.

    Every file and directory is fsynced before the swap. If the second rename fails the previous
    directory is put back; a crash between the two renames is repaired by the next call (clean_stale).
    So `out_dir` holds the previous directory or the new one, never a half-written one.
    `carry(old, tmp)`, when given, copies what should survive from the previous directory into tmp.
    Returns what `fill` returned.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp{os.getpid()}"
    old = out_dir.parent / f".{out_dir.name}.old{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        result = fill(tmp)
        if carry is not None and out_dir.is_dir():
            carry(out_dir, tmp)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    had_old = out_dir.exists() or out_dir.is_symlink()
    if had_old:
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if had_old:
            os.replace(old, out_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out_dir.parent)
    shutil.rmtree(old, ignore_errors=True)
    return result


def write_dir(out_dir: Path, files: dict[str, Callable[[Path], None]],
              carry: Callable[[Path, Path], None] | None = None) -> Path:
    """Write every file of `files` (name -> writer) into `out_dir` atomically (see atomic_dir)."""

    def fill(tmp: Path) -> None:
        for name, fn in files.items():
            fn(tmp / name)

    atomic_dir(out_dir, fill, carry)
    return Path(out_dir)


def _same_weights(old: Path, new: Path) -> bool:
    names = sorted(p.name for p in new.glob("*.safetensors"))
    if names != sorted(p.name for p in old.glob("*.safetensors")):
        return False
    return all((old / n).stat().st_size == (new / n).stat().st_size and sha256_file(old / n) == sha256_file(new / n)
               for n in names)


def carry_over(old: Path, new: Path) -> None:
    """Re-export: keep what `specdistill eval` or a person put into the previous export.

    Everything in `old` that the export does not write itself (EXPORT_FILES, *.safetensors) and that
    `new` lacks is copied over, with a warning. eval.json/eval.png describe the previous weights: when
    the weights changed they are kept but marked stale (EVAL_STALE), and `specdistill publish` refuses
    them until `specdistill eval` has measured the new weights.
    """
    kept = []
    for p in sorted(old.iterdir()):
        name = p.name
        if name in EXPORT_FILES or name.endswith(".safetensors") or name == EVAL_STALE or (new / name).exists():
            continue
        if _STAGING.match(name):
            continue
        if p.is_symlink():
            os.symlink(os.readlink(p), new / name)
        elif p.is_dir():
            shutil.copytree(p, new / name, symlinks=True)
        else:
            shutil.copy2(p, new / name)
        kept.append(name)
    if not kept:
        return
    log.warning("%s: re-export keeps %s from the previous export", old, ", ".join(kept))
    if (new / "eval.json").is_file():
        stale_mark = old / EVAL_STALE
        if _same_weights(old, new):
            if stale_mark.is_file():
                shutil.copy2(stale_mark, new / EVAL_STALE)
        else:
            (new / EVAL_STALE).write_text(sha256_file(new / "eval.json") + "\n")
            log.warning("%s: the weights changed, so eval.json/eval.png describe the previous weights; run "
                        "`specdistill eval --drafter %s` again (publish refuses the stale eval.json until then)",
                        old, old)


def eval_is_stale(export_dir: Path) -> bool:
    """True when eval.json is the one a re-export carried over from different weights (see carry_over)."""
    mark, ev = Path(export_dir) / EVAL_STALE, Path(export_dir) / "eval.json"
    if not mark.is_file() or not ev.is_file():
        return False
    return mark.read_text().strip() == sha256_file(ev)


def write_export(out_dir: Path, cfg: dict, tensors: dict[str, torch.Tensor], meta: dict,
                 extra: dict[str, Callable[[Path], None]] | None = None) -> Path:
    """The three files every export format writes: config.json, model.safetensors, specdistill_export.json
    (plus `extra`: name -> writer, e.g. a trained target's adapters).

    A previous export in `out_dir` is replaced; its eval.json/eval.png and other added files are kept
    (carry_over)."""
    return write_dir(Path(out_dir), {
        "config.json": json_writer(cfg),
        "model.safetensors": safetensors_writer(tensors),
        "specdistill_export.json": json_writer(meta),
        **(extra or {}),
    }, carry=carry_over)


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def json_writer(obj: dict) -> Callable[[Path], None]:
    return lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def safetensors_writer(tensors: dict[str, torch.Tensor], meta: dict | None = None) -> Callable[[Path], None]:
    def write(p: Path) -> None:
        save_file(tensors, str(p), metadata={"format": "pt", **(meta or {})})
        os.chmod(p, umask_mode())  # safetensors creates 0600; a serving engine may run as another user

    return write


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
