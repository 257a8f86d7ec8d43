"""The drafter contract and the single registry (DESIGN.md "The contracts", STYLE.md 1.1)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class LossOutput:
    """What `Drafter.loss` returns.

    `loss` is the *sum* of per-token losses over this micro-batch (not the mean); the Trainer
    divides by the global token count across accumulation steps and ranks, so every split of the
    same global batch gives the same update. `num_tokens` is the count that sum runs over.
    `metrics` are per-micro-batch sums too (e.g. correct predictions) and are normalised the same way.
    """

    loss: torch.Tensor
    num_tokens: torch.Tensor | int
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)


@dataclass
class DrafterSpec:
    name: str
    """Registry key, used as `drafter.name` in YAML."""
    config_cls: type
    """The family's JSON-serialisable config dataclass (must have a `name` field)."""
    build: Callable[[Any, Any], torch.nn.Module]
    """build(cfg, target) -> drafter; sizes are derived from the target's config."""
    target_layers: Callable[[Any, Any], list[int]]
    """target_layers(cfg, target_hf_config) -> layer ids the drafter needs (targets.py convention)."""
    export_formats: tuple[str, ...] = ("native",)
    """Formats under specdistill/export this family can be written in."""
    paper: str = ""
    """Paper(s) the family implements, for model cards and docs/papers.md."""


REGISTRY: dict[str, DrafterSpec] = {}


def register(spec: DrafterSpec) -> DrafterSpec:
    if spec.name in REGISTRY:
        raise ValueError(f"drafter {spec.name!r} is registered twice")
    if "name" not in getattr(spec.config_cls, "__dataclass_fields__", {}):
        raise ValueError(f"drafter {spec.name!r}: config_cls needs a `name` field")
    REGISTRY[spec.name] = spec
    return spec
