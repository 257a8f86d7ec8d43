"""One way to read a drafter from disk, used by `eval`, `export`, warm starts (`train.init_from`) and the CLI.

    load_drafter(path, target)      an export of a registered format (native, or an SGLang/vLLM
                                    export written here) or a Trainer checkpoint (run dir / step_<n>/)
    init_weights(drafter, path, target)   warm start: copy those weights into a freshly built drafter
    load_proposer(spec, target, options)  a `--drafter` spec: pld | hf:<model> | truncated:<n> | a path

Loaders refuse what they do not implement (unknown tensors, architecture switches they do not
compute) rather than dropping it. This module sits above export/, drafters/ and verify/: none of
them imports it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from specdistill.verify.proposer import Proposer, ProposerOptions

log = logging.getLogger(__name__)


def load_drafter(path: str | Path, target, device=None):
    """The drafter saved at `path`, rebuilt for `target` (a trained target's adapters are put back on it)."""
    from specdistill.export import formats, native

    path = Path(path)
    fmt = formats.claiming(path)
    if fmt is not None:
        drafter = fmt.load(path, target)
    elif native.checkpoint_dir(path) is not None:
        drafter = native.load_checkpoint(path, target)
    else:
        found = sorted(p.name for p in path.iterdir())[:12] if path.is_dir() else []
        raise ValueError(f"{path}: not a drafter specdistill can load: neither an export of a registered format "
                         f"({', '.join(sorted(formats.REGISTRY))}, with config.json/specdistill_export.json) nor a "
                         f"Trainer checkpoint (run dir with `latest`, or step_<n>/); contents: {found}")
    return drafter.to(device).eval() if device is not None else drafter.eval()


def init_weights(drafter, path: str | Path, target) -> None:
    """Warm start: copy the weights (and the draft-vocabulary map) of the drafter saved at `path` into
    `drafter`, which must be of the same family with the same tensor shapes. Optimizer, schedule and
    data order are not taken: this starts a new run from trained weights. A trained target's adapters
    come along (they are put on `target`)."""
    from specdistill.export import native

    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: no such directory (train.init_from wants an export or a checkpoint dir)")
    src = load_drafter(path, target)
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


def load_proposer(spec: str, target, options: ProposerOptions | None = None, **opts) -> Proposer:
    """A proposer for `target` from a `--drafter` spec: the verifier's built-ins (pld, hf:, truncated:,
    an HF model directory), else a saved drafter (`load_drafter`) and its `proposer(target, options)`."""
    from specdistill.export import formats, native
    from specdistill.verify import loading as builtin

    o = options or ProposerOptions(**opts)
    path = Path(spec).expanduser()
    if path.exists() and (formats.claiming(path) is not None or native.checkpoint_dir(path) is not None):
        return load_drafter(path, target, device=target.device).proposer(target, o)
    found = builtin.builtin_proposer(spec, target, o)
    if found is not None:
        return found
    if not path.exists():
        raise FileNotFoundError(f"--drafter {spec}: not pld, hf:<model>, truncated:<n>, nor an existing path")
    load_drafter(path, target)  # raises, naming what it found there
    raise AssertionError("unreachable")
