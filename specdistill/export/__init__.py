"""Export a trained drafter in the formats serving engines load (FORMATS.md is the contract).

`write(drafter, export_cfg, out_root, target) -> {format: path}` builds every requested format,
checks each against its engine's contract (contracts.py) before anything is written, then writes
each directory atomically under `<out_root>/<format>/`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from specdistill.export import common, contracts, native, sglang, vllm
from specdistill.export.contracts import ContractError
from specdistill.export.native import is_native_dir, load_checkpoint
from specdistill.export.native import load as load_native

log = logging.getLogger(__name__)

__all__ = ["ContractError", "FORMATS", "write", "load_any", "load_native", "load_checkpoint", "is_native_dir"]

# format name -> (build(drafter, target, dtype) -> (config, tensors), check(config, tensors, n_layers))
FORMATS = {
    "native": (native.build, native.check),
    "sglang": (sglang.build, contracts.check_sglang),
    "vllm": (vllm.build, contracts.check_vllm),
}


def resolve_formats(drafter, requested) -> list[str]:
    spec = common.spec_of(drafter)
    # A family may narrow its formats per instance.
    own = getattr(drafter, "export_formats", None)  # a method on the Drafter protocol (drafters/base.py)
    supported = tuple((own() if callable(own) else own) or spec.export_formats)
    if not requested:
        # Every format the family lists that can express this instance (EAGLE-1: native and sglang).
        return [f for f in supported if f in FORMATS and engine_gap(drafter, f) is None]
    fmts = list(requested)
    for f in fmts:
        if f not in FORMATS:
            raise ValueError(f"export.formats: unknown format {f!r}; known: {sorted(FORMATS)}")
        if f not in supported:
            raise ValueError(f"export.formats: drafter {spec.name!r}"
                             f"{' (' + str(drafter.cfg.variant) + ')' if getattr(drafter.cfg, 'variant', None) else ''}"
                             f" does not support {f!r}; it supports {list(supported)}")
    return fmts


def engine_gap(drafter, fmt: str) -> str | None:
    """Why format `fmt` cannot express this drafter instance, or None (native expresses every drafter)."""
    gaps = {"sglang": sglang.engine_gap, "vllm": vllm.engine_gap}
    return gaps[fmt](drafter) if fmt in gaps else None


def write(drafter, export_cfg, out_root: str | Path | None, target) -> dict[str, Path]:
    """Check then write every format; returns {format: directory}. Raises ContractError on a violation."""
    root = Path(getattr(export_cfg, "out_dir", "") or out_root or "export")
    dtype = getattr(export_cfg, "dtype", "bfloat16")
    fmts = resolve_formats(drafter, getattr(export_cfg, "formats", None))
    built = {}
    for f in fmts:
        build, check = FORMATS[f]
        cfg, tensors = build(drafter, target, dtype)
        check(cfg, tensors, target.num_layers)
        built[f] = (cfg, tensors)
    out = {}
    for f, (cfg, tensors) in built.items():
        meta = common.metadata(drafter, target, f, dtype)
        out[f] = common.write_export(root / f, cfg, tensors, meta)
    return out


# ---------------------------------------------------------------------------------------------
# Verifier loader: `specdistill eval --drafter <native export | run dir | step_<n>/>`


def _claims(path: Path) -> bool:
    return is_native_dir(path) or native.is_engine_export(path) or native.checkpoint_dir(path) is not None


def load_any(path: str | Path, target):
    """The drafter in a native export, an SGLang/vLLM export written here, or a Trainer checkpoint."""
    path = Path(path)
    if is_native_dir(path):
        return load_native(path, target)
    if native.is_engine_export(path):
        return native.load_engine_export(path, target)
    return load_checkpoint(path, target)


def init_weights(drafter, path: str | Path, target) -> None:
    """Warm start: copy the weights (and the draft-vocabulary map) of the drafter saved at `path`
    into `drafter`, which must have the same family and tensor shapes. Optimizer, schedule and
    data order are not taken: this starts a new run from trained weights."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: no such directory (train.init_from wants an export or a checkpoint dir)")
    src = load_any(path, target)
    if type(src) is not type(drafter):
        raise ValueError(f"{path}: holds a {type(src).__name__}, the run builds a {type(drafter).__name__}")
    shared = native._target_storage(target)
    mine = {k: v for k, v in drafter.state_dict().items() if v.data_ptr() not in shared}
    theirs = src.state_dict()
    bad = [f"{k} {tuple(theirs[k].shape) if k in theirs else 'missing'} vs {tuple(v.shape)}"
           for k, v in mine.items() if k not in theirs or theirs[k].shape != v.shape]
    if bad:
        raise ValueError(f"{path}: weights do not fit the drafter this run builds (check drafter.* overrides "
                         f"against the saved config); first mismatches: {bad[:4]}")
    # load_state_dict (not raw copies) so a family re-derives what it keeps beside its weights
    # (EAGLE's draft_ids from d2t).
    drafter.load_state_dict({k: theirs[k].to(v.dtype) for k, v in mine.items()}, strict=False)
    log.info("initialised %d drafter tensors from %s", len(mine), path)


def proposer_kwargs(opts) -> dict:
    """ProposerOptions -> EAGLE-style proposer arguments (chain: k; tree: depth, topk, budget;
    both: min_prob from the confidence threshold)."""
    conf = {"min_prob": float(opts.confidence_threshold)} if opts.confidence_threshold else {}
    if not opts.tree:
        return {"mode": "chain", "k": int(opts.num_draft_tokens), **conf}
    tree = [int(b) for b in opts.tree]
    budget, width = 0, 1
    for b in tree:
        width *= b
        budget += width
    return {"mode": "tree", "depth": len(tree), "topk": max(tree), "budget": budget, **conf}


def _load_proposer(path: Path, target, opts):
    drafter = load_any(path, target).to(target.device)
    # A family that maps the verifier's options itself says so; otherwise the EAGLE mapping applies.
    hook = getattr(drafter, "proposer_from_options", None)
    if hook is not None:
        return hook(target, opts)
    return drafter.proposer(target, **proposer_kwargs(opts))


try:
    from specdistill.verify.loading import register_loader
except ImportError:  # verifier not part of this build
    register_loader = None
if register_loader is not None:
    register_loader(_claims, _load_proposer, "specdistill_native_or_checkpoint")
