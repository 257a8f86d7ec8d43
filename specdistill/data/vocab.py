"""Reduced draft vocabulary (EAGLE-3, arXiv 2503.01840 section 3): the Vd most frequent label tokens.

The maps follow the engines' convention (FORMATS.md 1.1):

    d2t: int64 [Vd], target_id = draft_id + d2t[draft_id]   (SGLang: hot_token_id = d2t + arange)
    t2d: bool  [V],  t2d[target_id] is True iff the target token is in the draft vocabulary

Draft ids are assigned in increasing target-id order, so `d2t` is non-decreasing and
`draft_id + d2t[draft_id]` is strictly increasing. Counts are taken over loss-masked tokens only
(the tokens the drafter is trained to predict), never over prompts. The mapping is a data step with
a cache keyed by dataset key + tokenizer hash + Vd (never a `cache.pt` in the working directory).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


@dataclass
class VocabMap:
    d2t: torch.Tensor
    """int64 [Vd]: target_id = draft_id + d2t[draft_id]."""
    t2d: torch.Tensor
    """bool [V]: which target ids are in the draft vocabulary."""
    counts: torch.Tensor
    """int64 [V]: loss-masked token counts the map was built from."""
    coverage: float
    """Fraction of counted (label) tokens whose id is in the draft vocabulary."""

    @property
    def draft_vocab_size(self) -> int:
        return int(self.d2t.numel())

    def draft_to_target(self) -> torch.Tensor:
        """int64 [Vd] target ids of the draft vocabulary, ascending."""
        return torch.arange(self.d2t.numel(), dtype=torch.int64) + self.d2t


def count_tokens(samples: Iterable[dict], vocab_size: int) -> torch.Tensor:
    """Histogram (int64 [vocab_size]) of the tokens whose loss_mask is 1, over every sample."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for n, s in enumerate(samples):
        ids = torch.as_tensor(s["input_ids"], dtype=torch.int64)
        mask = torch.as_tensor(s["loss_mask"], dtype=torch.bool)
        if ids.shape != mask.shape:
            raise ValueError(f"sample {n}: input_ids ({tuple(ids.shape)}) and loss_mask ({tuple(mask.shape)}) differ in length")
        lab = ids[mask]
        if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= vocab_size):
            raise ValueError(f"sample {n}: token id {int(lab.max())} outside the vocabulary of size {vocab_size}")
        counts += torch.bincount(lab, minlength=vocab_size)
    return counts


def vocab_map_from_counts(counts: torch.Tensor, draft_vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`draft_vocab_size` ids by count -> (d2t int64 [Vd], t2d bool [V]).

    Ties (including the zero-count ids used to fill when Vd exceeds the number of distinct label
    tokens) go to the lower target id, so the map is deterministic and never fails for Vd <= V.
    """
    counts = torch.as_tensor(counts, dtype=torch.int64).flatten()
    v = counts.numel()
    if not 0 < draft_vocab_size <= v:
        raise ValueError(f"draft_vocab_size ({draft_vocab_size}) must be in 1..{v} (the target vocabulary size)")
    ids = torch.arange(v, dtype=torch.int64)
    # Sort by (-count, id): a stable sort by id first, then a stable sort by descending count.
    order = torch.sort(-counts, stable=True).indices
    chosen = torch.sort(ids[order[:draft_vocab_size]]).values
    d2t = chosen - torch.arange(draft_vocab_size, dtype=torch.int64)
    t2d = torch.zeros(v, dtype=torch.bool)
    t2d[chosen] = True
    return d2t, t2d


def coverage(counts: torch.Tensor, t2d: torch.Tensor) -> float:
    total = int(counts.sum())
    return float(counts[t2d].sum()) / total if total else 0.0


def check_maps(d2t: torch.Tensor, t2d: torch.Tensor) -> None:
    """Raise ValueError unless d2t/t2d are a consistent pair (the engines trust them blindly)."""
    if d2t.dtype != torch.int64 or d2t.dim() != 1:
        raise ValueError(f"d2t must be int64 [Vd], got {d2t.dtype} {tuple(d2t.shape)}")
    if t2d.dtype != torch.bool or t2d.dim() != 1:
        raise ValueError(f"t2d must be bool [V], got {t2d.dtype} {tuple(t2d.shape)}")
    vd, v = d2t.numel(), t2d.numel()
    tid = torch.arange(vd, dtype=torch.int64) + d2t
    if vd and (int(tid.min()) < 0 or int(tid.max()) >= v):
        raise ValueError(f"d2t maps draft ids outside the target vocabulary 0..{v - 1}")
    if vd > 1 and not bool((tid[1:] > tid[:-1]).all()):
        raise ValueError("d2t: target ids of the draft vocabulary must be strictly increasing")
    if int(t2d.sum()) != vd:
        raise ValueError(f"t2d has {int(t2d.sum())} True entries but d2t has {vd}")
    if not bool(t2d[tid].all()):
        raise ValueError("t2d and d2t disagree: some draft token's target id is False in t2d")


def tokenizer_hash(tokenizer) -> str:
    """Stable hash of a tokenizer's vocabulary and special tokens (cache-key ingredient)."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []))
    blob = json.dumps([vocab, special], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cache_path(root: str | Path, data_key: str, tok_hash: str, draft_vocab_size: int) -> Path:
    key = hashlib.sha256(f"{data_key}|{tok_hash}|{draft_vocab_size}".encode()).hexdigest()[:16]
    return Path(root) / f"vocab-{draft_vocab_size}-{key}.safetensors"


def build(samples: Iterable[dict], vocab_size: int, draft_vocab_size: int, *, data_key: str = "",
          tokenizer=None, root: str | Path = "data/vocab") -> VocabMap:
    """Count label tokens, build the maps, cache them under `root` (reused when the key matches).

    `data_key` identifies the dataset (e.g. the prepared-data key); without it nothing is cached,
    since a key-less cache is exactly the stale-mapping bug this module exists to avoid.
    """
    path = None
    if data_key:
        tok_hash = tokenizer_hash(tokenizer) if tokenizer is not None else f"V{vocab_size}"
        path = cache_path(root, data_key, tok_hash, draft_vocab_size)
        if path.exists():
            t = load_file(str(path))
            if t["t2d"].numel() == vocab_size:
                check_maps(t["d2t"], t["t2d"])
                return VocabMap(t["d2t"], t["t2d"], t["counts"], coverage(t["counts"], t["t2d"]))
    counts = count_tokens(samples, vocab_size)
    d2t, t2d = vocab_map_from_counts(counts, draft_vocab_size)
    vm = VocabMap(d2t, t2d, counts, coverage(counts, t2d))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        save_file({"d2t": d2t, "t2d": t2d, "counts": counts}, str(tmp),
                  metadata={"data_key": data_key, "draft_vocab_size": str(draft_vocab_size),
                            "coverage": f"{vm.coverage:.6f}"})
        os.replace(tmp, path)
    return vm
