"""Batching samples of the batch contract, and an optional length-bucketed order."""

from __future__ import annotations

import functools

import numpy as np
import torch


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `input_ids`/`loss_mask` to the longest sample: (B, T) long tensors + attention_mask."""
    if not batch:
        raise ValueError("collate: empty batch")
    width = max(len(s["input_ids"]) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, s in enumerate(batch):
        n = len(s["input_ids"])
        if len(s["loss_mask"]) != n:
            raise ValueError(f"collate: sample {r} has {n} input_ids but {len(s['loss_mask'])} loss_mask entries")
        ids[r, :n] = torch.as_tensor(s["input_ids"], dtype=torch.long)
        mask[r, :n] = torch.as_tensor(s["loss_mask"], dtype=torch.long)
        att[r, :n] = 1
    return {"input_ids": ids, "attention_mask": att, "loss_mask": mask}


def make_collate(pad_id: int):
    """A picklable collate_fn for DataLoader workers."""
    return functools.partial(collate, pad_id=pad_id)


def length_grouped_order(lengths, batch_size: int, seed: int = 0, bucket_batches: int = 50) -> list[int]:
    """A shuffled order whose consecutive `batch_size` chunks have similar lengths (less padding).

    Shuffle, cut into mega-buckets of `bucket_batches` batches, sort each by length, then shuffle
    the batches: randomness of order is kept while padding inside a batch shrinks.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    lengths = np.asarray(lengths)
    mega = batch_size * bucket_batches
    batches = []
    for k in range(0, len(order), mega):
        chunk = order[k:k + mega]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return [int(i) for b in batches for i in b]
