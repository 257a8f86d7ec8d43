"""Export a trained drafter in the formats serving engines load (FORMATS.md is the contract).

`write(drafter, export_cfg, out_root, target) -> {format: path}` builds every requested format,
checks each against its engine's contract before anything is written, then writes each directory
atomically under `<out_root>/<format>/`. The formats are those registered in export/formats.py by
the modules imported below; loading a drafter back is `specdistill.loading.load_drafter`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from specdistill.export import common, formats, native, sglang, vllm  # noqa: F401  (each registers its format)
from specdistill.export import hf_draft as _hf_draft  # noqa: F401  (hf_draft: a standard HF draft model)
from specdistill.export import medusa as _medusa  # noqa: F401  (vllm_medusa, medusa_fd)
from specdistill.export.contracts import ContractError
from specdistill.export.native import is_native_dir, load_checkpoint
from specdistill.export.native import load as load_native

log = logging.getLogger(__name__)

__all__ = ["ContractError", "write", "resolve_formats", "load_native", "load_checkpoint", "is_native_dir"]


def resolve_formats(drafter, requested) -> list[str]:
    """The formats to write: those asked for (each checked against what this instance supports), or
    every format the instance supports that can express it (EAGLE-1: native and sglang)."""
    supported = tuple(drafter.export_formats())
    if not requested:
        return [f for f in supported if f in formats.REGISTRY and engine_gap(drafter, f) is None]
    for f in requested:
        formats.get(f)
        if f not in supported:
            variant = f" ({drafter.variant})" if drafter.variant else ""
            raise ValueError(f"export.formats: drafter {drafter.spec.name!r}{variant} does not support {f!r}; "
                             f"it supports {list(supported)}")
    return list(requested)


def engine_gap(drafter, fmt: str) -> str | None:
    """Why format `fmt` cannot express this drafter instance, or None (native expresses every drafter)."""
    gap = formats.get(fmt).engine_gap
    return gap(drafter) if gap is not None else None


def write_merged_target(target, out_dir: Path) -> Path:
    """The trained target with its adapters folded in, as a plain HF model directory (tokenizer included)."""
    import copy

    merged = copy.deepcopy(target)
    merged.merge_adapters()

    def fill(tmp: Path) -> None:
        merged.model.save_pretrained(tmp, safe_serialization=True)
        merged.tokenizer.save_pretrained(tmp)
        (tmp / "specdistill_export.json").write_text(json.dumps(
            {"format": "merged_target", "target": common.target_name(target), "target_changed": True}, indent=2))

    common.atomic_dir(Path(out_dir), fill)
    return Path(out_dir)


def write(drafter, export_cfg, out_root: str | Path | None, target) -> dict[str, Path]:
    """Check then write every format; returns {format: directory}. Raises ContractError on a violation."""
    root = Path(export_cfg.out_dir or out_root or "export")
    dtype = export_cfg.dtype
    built = {}
    for f in resolve_formats(drafter, export_cfg.formats):
        fmt = formats.get(f)
        cfg, tensors = fmt.build(drafter, target, dtype)
        fmt.check(cfg, tensors, target.num_layers)
        built[f] = (cfg, tensors, fmt.files(drafter, target, root / f, dtype) if fmt.files is not None else {})
    out = {}
    for f, (cfg, tensors, files) in built.items():
        meta = common.metadata(drafter, target, f, dtype)
        out[f] = common.write_export(root / f, cfg, tensors, meta, extra=files or None)
    if target.has_adapters and export_cfg.target_adapters == "merged":
        out["merged_target"] = write_merged_target(target, root / "merged_target")
    return out
