"""A deliberately small drafter for Trainer tests: one linear head on the target's last hidden state
predicting the token after next (a single Medusa-style head). Registered as `toy` on import."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specdistill.drafters.base import REGISTRY, Drafter, DrafterSpec, LossOutput, register


@dataclass
class ToyConfig:
    name: str = "toy"
    """Registry name."""
    nan_after: int = 0
    """Return a NaN loss from this call on (0 = never); for the non-finite-loss test."""


class ToyDrafter(Drafter):
    def __init__(self, cfg: ToyConfig, hidden: int, vocab: int):
        super().__init__()
        self.cfg = cfg
        self.proj = torch.nn.Linear(hidden, hidden)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)
        self.calls = 0

    def loss(self, batch, target_out):
        self.calls += 1
        h = target_out.last_hidden[:, :-2]
        logits = self.head(torch.nn.functional.silu(self.proj(h)))
        labels = batch["input_ids"][:, 2:]
        mask = batch["loss_mask"][:, 2:].bool()
        loss = F.cross_entropy(logits[mask].float(), labels[mask], reduction="sum")
        if self.cfg.nan_after and self.calls >= self.cfg.nan_after:
            loss = loss * float("nan")
        correct = (logits[mask].argmax(-1) == labels[mask]).sum()
        return LossOutput(loss, mask.sum(), {"correct": correct})

    def num_loss_tokens(self, batch):
        return batch["loss_mask"][:, 2:].sum()

    def trainable_parameters(self):
        return list(self.parameters())

    def proposer(self, target, options=None):
        raise NotImplementedError("the toy drafter is for Trainer tests; it does not draft")

    def export_state_dict(self):
        return {k: v.detach() for k, v in self.state_dict().items()}


def _build(cfg, target):
    return ToyDrafter(cfg, target.hidden_size, target.vocab_size)


if "toy" not in REGISTRY:
    register(DrafterSpec(name="toy", config_cls=ToyConfig, build=_build, drafter_cls=ToyDrafter,
                         target_layers=lambda cfg, tc: [], export_formats=("native",), paper="test only"))
