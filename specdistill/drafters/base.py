"""The drafter contract and the single registry (DESIGN.md "The contracts", STYLE.md 1.1).

Shared code (train/, verify/, export/, pipeline.py, data/) talks to a drafter only through the
`Drafter` methods below and to its family only through the `DrafterSpec`. A family that forgets a
required method fails at `register()` with a `ProtocolError` naming it. docs/adding_a_family.md is
the worked example.

    required                                     what it is for
    loss(batch, target_out) -> LossOutput        the training objective: a *sum* over loss tokens
    num_loss_tokens(batch) -> Tensor             the count that sum runs over (after any rollout)
    trainable_parameters() -> list[Parameter]    what the optimizer steps (not the target's adapters)
    proposer(target, options) -> Proposer        the verifier's drafting side (ProposerOptions)
    export_state_dict() -> dict[str, Tensor]     the tensors the export formats write

    optional (the base class gives the default)
    fit(train_data, target, data_key)            data-derived state before training (EAGLE: draft vocabulary)
    rollout(batch, target, seeds) -> batch       on-policy sampling before the loss (spec.rollout)
    lora_config() -> peft.LoraConfig             adapters to put on the target (spec.trains_target)
    export_info() -> dict                        metadata the format writers read (variant, layer ids, ...)
    export_formats() -> tuple[str, ...]          formats this instance can be written in (default: the spec's)
    variant -> str                               the family variant ("" when the family has one)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from specdistill.errors import ProtocolError

REQUIRED_METHODS = ("loss", "num_loss_tokens", "trainable_parameters", "proposer", "export_state_dict")
TARGET_OUTPUTS = ("none", "hidden", "logits")


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


class Drafter(torch.nn.Module):
    """Base class of every drafter family: the required methods raise until a family defines them
    (and `register` refuses a family that has not), the optional ones have working defaults."""

    cfg: Any
    spec: DrafterSpec

    # -- required ----------------------------------------------------------------------------
    def loss(self, batch: dict, target_out) -> LossOutput:
        raise NotImplementedError

    def num_loss_tokens(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def proposer(self, target, options=None):
        """A `verify.proposer.Proposer` for `target`; `options` is a `verify.proposer.ProposerOptions`
        (None = its defaults)."""
        raise NotImplementedError

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # -- optional ----------------------------------------------------------------------------
    def fit(self, train_data, target, data_key: str = "") -> None:
        """Derive state from the training data before the first step (not on resume or warm start,
        where the state comes with the weights). Default: nothing to derive."""

    def rollout(self, batch: dict, target, seeds: torch.Tensor) -> dict:
        """On-policy data: continue `batch` by sampling (under no_grad, on the unwrapped modules) and
        return the new batch with its masks. `seeds` (B,) int64 seeds row b's sampling (one
        `torch.Generator().manual_seed(int(seeds[b]))` per row keeps the update independent of how
        the global batch is split). Called only when the spec's `rollout` is on."""
        raise ProtocolError(f"{type(self).__name__}: its spec asks for a rollout but it defines no rollout()")

    def lora_config(self):
        """The peft LoraConfig for the target's adapters. Called only when the spec's `trains_target` is on."""
        raise ProtocolError(f"{type(self).__name__}: its spec trains the target but it defines no lora_config()")

    @property
    def variant(self) -> str:
        return str(getattr(self.cfg, "variant", "") or "")

    def export_info(self) -> dict:
        """Family facts the export writers and the model card read, beyond the tensors."""
        return {"variant": self.variant}

    def export_formats(self) -> tuple[str, ...]:
        return tuple(self.spec.export_formats)


def _flag(value, cfg) -> Any:
    return value(cfg) if callable(value) else value


@dataclass(frozen=True)
class TargetNeeds:
    """What a drafter instance needs of the target and the loop (resolved from its spec and config)."""

    output: str
    """none (no target forward: e.g. Seq-KD trains on the target's text), hidden or logits."""
    layers: tuple[int, ...]
    """Hidden-state layer ids (targets.py convention) the target forward captures."""
    rollout: bool
    """The Trainer calls `drafter.rollout` on each micro-batch before counting tokens."""
    trains_target: bool
    """peft adapters on the target train with the drafter (the target forward runs with grad)."""


@dataclass
class DrafterSpec:
    name: str
    """Registry key, used as `drafter.name` in YAML."""
    config_cls: type
    """The family's JSON-serialisable config dataclass (must have a `name` field)."""
    build: Callable[[Any, Any], torch.nn.Module] | None = None
    """build(cfg, target) -> drafter, sizes derived from the target's config; None = drafter_cls(cfg, target)."""
    target_layers: Callable[[Any, Any], list[int]] = lambda cfg, target_config: []  # noqa: E731
    """target_layers(cfg, target_hf_config) -> layer ids the drafter needs (targets.py convention); default none."""
    export_formats: tuple[str, ...] = ("native",)
    """Formats under specdistill/export this family can be written in."""
    paper: str = ""
    """Paper(s) the family implements, for model cards and docs/papers.md."""
    drafter_cls: type | None = None
    """The family's module class; `register` checks it implements the protocol."""
    target_output: str | Callable[[Any], str] = "hidden"
    """What the target forward returns per batch: none | hidden | logits (or cfg -> one of them)."""
    rollout: bool | Callable[[Any], bool] = False
    """Whether the family samples on-policy data in the loop (or cfg -> bool)."""
    trains_target: bool | Callable[[Any], bool] = False
    """Whether the family trains peft adapters on the target (or cfg -> bool)."""

    def make(self, cfg, target):
        return (self.build or self.drafter_cls)(cfg, target)

    def needs(self, cfg, target_config) -> TargetNeeds:
        out = _flag(self.target_output, cfg)
        if out not in TARGET_OUTPUTS:
            raise ProtocolError(f"drafter {self.name!r}: target_output {out!r} must be one of {TARGET_OUTPUTS}")
        layers = tuple(self.target_layers(cfg, target_config)) if out != "none" else ()
        return TargetNeeds(out, layers, bool(_flag(self.rollout, cfg)), bool(_flag(self.trains_target, cfg)))


REGISTRY: dict[str, DrafterSpec] = {}


def check_protocol(spec: DrafterSpec) -> None:
    """Raise ProtocolError naming every required method `spec.drafter_cls` lacks."""
    cls = spec.drafter_cls
    if cls is None:
        raise ProtocolError(f"drafter {spec.name!r}: DrafterSpec.drafter_cls is required (the family's module class)")
    missing = []
    for m in REQUIRED_METHODS:
        impl = getattr(cls, m, None)
        if impl is None or not callable(impl) or impl is getattr(Drafter, m):
            missing.append(m)
    if missing:
        raise ProtocolError(f"drafter {spec.name!r} ({cls.__name__}) does not implement {', '.join(missing)} "
                            "of the Drafter protocol (specdistill/drafters/base.py)")
    for flag, method in (("rollout", "rollout"), ("trains_target", "lora_config")):
        if getattr(spec, flag) is not False and getattr(cls, method, None) in (None, getattr(Drafter, method)):
            raise ProtocolError(f"drafter {spec.name!r}: its spec sets {flag} but {cls.__name__} defines no {method}()")


def register(spec: DrafterSpec) -> DrafterSpec:
    if spec.name in REGISTRY:
        raise ValueError(f"drafter {spec.name!r} is registered twice")
    if "name" not in getattr(spec.config_cls, "__dataclass_fields__", {}):
        raise ProtocolError(f"drafter {spec.name!r}: config_cls needs a `name` field")
    check_protocol(spec)
    REGISTRY[spec.name] = spec
    return spec
