"""Per-sample seeds for the Trainer's rollout step (drafters/base.py `Drafter.rollout`).

A rollout samples continuations; seeding each row by its sample index and epoch (not by the
micro-batch or the rank) keeps the update the same whatever the split of the global batch over
accumulation steps and processes, the property tests/test_trainer.py checks.
"""

from __future__ import annotations

import torch


class Indexed(torch.utils.data.Dataset):
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return i, self.ds[i]


class SeededCollate:
    """Collates (index, sample) pairs and adds `rollout_seed`: (B,) int64, one seed per sample and epoch."""

    def __init__(self, collate, epoch_seed: int):
        self.collate, self.epoch_seed = collate, epoch_seed

    def __call__(self, items):
        batch = self.collate([s for _, s in items])
        idx = torch.tensor([i for i, _ in items], dtype=torch.int64)
        batch["rollout_seed"] = (idx * 1_000_000_007 + self.epoch_seed) % (2 ** 62)
        return batch
