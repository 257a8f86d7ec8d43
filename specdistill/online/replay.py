"""The replay buffer and the held-out slice, bounded, persisted with the ledger between runs.

OSD's released code clears its buffer after every update, so a model only ever sees the last
interval. Here a retrain sees two parts, both sized in tokens:
  recent     the newest records, up to recent_fraction * max_tokens (first in, first out);
  reservoir  a uniform sample of everything that has left `recent`: each record carries a fixed
             random priority u (a hash of its key and the seed), and the reservoir keeps the
             lowest-u records that fit (bottom-k sampling, so the sample stays uniform over all
             records ever evicted, whatever order they came in).
Records picked for the held-out slice (a hash of the key below holdout_fraction, plus the newest
ones while fewer than holdout_min are held) never enter the buffer: the gate scores on them.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field


def _unit(key: str, salt: str) -> float:
    return int.from_bytes(hashlib.sha256(f"{salt}:{key}".encode()).digest()[:8], "big") / 2**64


@dataclass
class Entry:
    key: str
    prompt: list[dict]
    response: str | None = None
    """What was served (from the log), if logged."""
    answer: list[dict] | None = None
    """The target's regenerated conversation (prompt + its answer), once made."""
    tokens: int = 0
    acceptance: float | None = None
    run: str = ""
    """The run that ingested it."""
    u: float = 0.0

    def conversation(self, use_served: bool) -> list[dict] | None:
        if self.answer is not None:
            return self.answer
        if use_served and self.response:
            return self.prompt + [{"role": "assistant", "content": self.response}]
        return None


@dataclass
class ReplayBuffer:
    max_tokens: int
    recent_fraction: float = 0.5
    seed: int = 0
    recent: list[Entry] = field(default_factory=list)
    reservoir: list[Entry] = field(default_factory=list)
    evicted: int = 0
    """Records that left `recent` over the buffer's life (kept in the reservoir or dropped)."""

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"online.buffer_tokens ({self.max_tokens}) must be >= 1")
        if not 0 <= self.recent_fraction <= 1:
            raise ValueError(f"online.recent_fraction ({self.recent_fraction}) must be in [0, 1]")

    def entries(self) -> list[Entry]:
        return self.reservoir + self.recent

    def tokens(self) -> int:
        return sum(e.tokens for e in self.entries())

    def add(self, new: list[Entry]) -> None:
        for e in new:
            e.u = _unit(e.key, f"reservoir{self.seed}")
        self.recent.extend(new)
        budget = int(self.max_tokens * self.recent_fraction)
        total = sum(e.tokens for e in self.recent)
        out = []
        while self.recent and total > budget:
            e = self.recent.pop(0)
            total -= e.tokens
            out.append(e)
        self.evicted += len(out)
        pool = sorted(self.reservoir + out, key=lambda e: e.u)
        room, kept = self.max_tokens - total, []
        for e in pool:
            if e.tokens <= room:
                kept.append(e)
                room -= e.tokens
        self.reservoir = kept

    def to_dict(self) -> dict:
        return {"max_tokens": self.max_tokens, "recent_fraction": self.recent_fraction, "seed": self.seed,
                "evicted": self.evicted, "recent": [asdict(e) for e in self.recent],
                "reservoir": [asdict(e) for e in self.reservoir]}

    @classmethod
    def from_dict(cls, d: dict | None, max_tokens: int, recent_fraction: float, seed: int) -> ReplayBuffer:
        """The saved buffer re-bounded to the current settings (a smaller budget drops records now)."""
        buf = cls(max_tokens, recent_fraction, seed)
        if d:
            buf.evicted = d.get("evicted", 0)
            buf.reservoir = [Entry(**e) for e in d.get("reservoir", [])]
            buf.add([Entry(**e) for e in d.get("recent", [])])
        return buf


def split_holdout(entries: list[Entry], held: list[Entry], fraction: float, minimum: int, size: int,
                  seed: int) -> tuple[list[Entry], list[Entry]]:
    """(records for training, the held-out slice after adding the others): a record is held out when
    the hash of its key is below `fraction`, or while fewer than `minimum` are held (newest first);
    the slice keeps its newest `size` records."""
    train, hold = [], []
    for e in entries:
        (hold if _unit(e.key, f"holdout{seed}") < fraction else train).append(e)
    while len(held) + len(hold) < minimum and train:
        hold.append(train.pop())
    return train, (held + hold)[-size:] if size > 0 else []
