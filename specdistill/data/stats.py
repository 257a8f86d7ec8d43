"""Counting what the data pipeline keeps and skips, by reason, with the first few examples logged."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Every reason a conversation can be skipped. Kept as one list so the README, the summary and the
# tests agree; `SkipCounter.skip` refuses reasons not listed here so typos cannot hide a category.
SKIP_REASONS = {
    "empty": "no messages, or no non-empty message before the first assistant turn",
    "no_assistant_turn": "no assistant message that answers a user/system message",
    "unknown_role": "a message role that is not system/user/assistant or a known alias",
    "bad_shape": "the record is not a conversation (missing/odd keys, non-string content, nested too deep)",
    "invalid_json": "a JSONL line, or a stretch of a JSON array up to the next record, that does not parse",
    "invalid_utf8": "bytes that are not UTF-8, or lone surrogates (\\ud83d) in the text or the id",
    "truncated_file": "the file ends in the middle of a record (that record is lost)",
    "template_error": "the chat template raised, or its rendering could not be aligned with the messages",
    "too_long": "after truncation to max_length fewer than min_loss_tokens assistant tokens remain",
    "too_short": "fewer than min_loss_tokens assistant tokens even without truncation",
}

# Repairs that keep the conversation (`SkipCounter.note`), with what each one did.
NOTES = {
    "dropped_leading_assistant": "leading assistant messages removed (they answer nothing)",
    "cut_at_empty_message": "conversation cut before its first empty message",
    "prompt_truncated": "first reply did not fit: oldest prompt characters cut (truncate_prompt)",
    "array_not_closed": "the JSON array ends without its closing ']' after a complete record",
}


@dataclass
class SkipCounter:
    """Kept/skipped counts by reason; logs the first `log_first` skips with where and why."""

    log_first: int = 5
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        if reason not in SKIP_REASONS:
            raise KeyError(f"unknown skip reason {reason!r}; known: {sorted(SKIP_REASONS)}")
        self.skipped[reason] += 1
        if len(self.examples) < self.log_first:
            msg = f"{where}: skipped ({reason}){': ' + detail if detail else ''}"
            self.examples.append(msg)
            log.warning(msg)

    def note(self, what: str, n: int = 1) -> None:
        """Count a repair that did not drop the conversation (e.g. a leading assistant turn removed)."""
        self.notes[what] += n

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict:
        return {
            "kept": self.kept,
            "skipped": self.total_skipped,
            "skipped_by_reason": dict(sorted(self.skipped.items())),
            "notes": dict(sorted(self.notes.items())),
            "first_skips": list(self.examples),
        }

    @classmethod
    def from_dict(cls, d: dict) -> SkipCounter:
        return cls(kept=d.get("kept", 0), skipped=Counter(d.get("skipped_by_reason", {})),
                   notes=Counter(d.get("notes", {})), examples=list(d.get("first_skips", [])))


def token_stats(lengths: np.ndarray, loss_tokens: np.ndarray, turns: np.ndarray) -> dict:
    """Token statistics of the kept samples (after truncation)."""
    if len(lengths) == 0:
        return {"conversations": 0, "turns": 0, "total_tokens": 0, "loss_tokens": 0}
    return {
        "conversations": int(len(lengths)),
        "turns": int(turns.sum()),
        "assistant_turns_mean": round(float(turns.mean()), 2),
        "total_tokens": int(lengths.sum()),
        "loss_tokens": int(loss_tokens.sum()),
        "loss_fraction": round(float(loss_tokens.sum() / max(1, lengths.sum())), 4),
        "length_mean": round(float(lengths.mean()), 1),
        "length_median": float(np.median(lengths)),
        "length_p95": float(np.percentile(lengths, 95)),
        "length_max": int(lengths.max()),
    }


def format_summary(summary: dict) -> str:
    """Human-readable lines for `specdistill data stats` and for the log of `build`."""
    c = summary["counts"]
    st = summary.get("settings", {})
    lines = [f"source: {summary.get('source', '?')}  (max_length {st.get('max_length')}, "
             f"min_loss_tokens {st.get('min_loss_tokens')}, truncate_prompt {st.get('truncate_prompt', False)}, "
             f"limit {st.get('limit') or 'none'})"]
    if "conversations_valid" in summary:
        lines.append(f"read {summary['records_read']} records: {summary['conversations_valid']} valid conversations")
    lines.append(f"kept {c['kept']} conversations as samples, skipped {c['skipped']}"
                 f" ({summary.get('truncated_samples', 0)} kept samples truncated to max_length)")
    for reason, n in c["skipped_by_reason"].items():
        lines.append(f"  skipped {reason:<16} {n:>7}   ({SKIP_REASONS.get(reason, '')})")
    for what, n in c.get("notes", {}).items():
        lines.append(f"  note    {what:<16} {n:>7}   ({NOTES.get(what, '')})")
    for split in ("train", "val"):
        if split in summary:
            s = summary[split]
            if not s.get("conversations"):
                lines.append(f"{split}: 0 conversations")
                continue
            lines.append(
                f"{split}: {s['conversations']} conversations, {s['turns']} assistant turns, "
                f"{s['total_tokens']} tokens ({s['loss_tokens']} loss tokens, {100 * s['loss_fraction']:.1f}%), "
                f"length mean {s['length_mean']} median {s['length_median']:.0f} p95 {s['length_p95']:.0f} "
                f"max {s['length_max']}")
    if "seconds" in summary:
        lines.append(f"prepared in {summary['seconds']:.1f}s{' (from cache)' if summary.get('cached') else ''}")
    return "\n".join(lines)


def save_json(obj: dict, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
