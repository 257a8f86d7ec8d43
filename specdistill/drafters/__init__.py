"""Drafter families. Each family module calls `register()` at import; imports are explicit."""

from specdistill.drafters.base import REGISTRY, DrafterSpec, LossOutput, register

__all__ = ["REGISTRY", "DrafterSpec", "LossOutput", "register", "build", "get"]


def get(name: str) -> DrafterSpec:
    if name not in REGISTRY:
        raise KeyError(f"unknown drafter {name!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[name]


def build(cfg, target):
    """Build the drafter named by `cfg.name` for `target` (a TargetModel)."""
    spec = get(cfg.name)
    model = spec.make(cfg, target)
    model.spec = spec
    return model


# Family modules register themselves on import; explicit, no directory scanning.
from specdistill.drafters import ctc, eagle, medusa, small_lm  # noqa: E402,F401
