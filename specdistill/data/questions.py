"""Benchmark questions in the MT-bench / Spec-Bench JSONL format (DESIGN.md "Metrics").

One JSON object a line: {"question_id": ..., "category": ..., "turns": ["...", ...]}. Bad lines are
skipped and reported as `file:line: reason`, never silently dropped, with the data files' rules
(specdistill/data/sources.py): a leading UTF-8 BOM is ignored, a line that is not valid UTF-8, nests
deeper than MAX_DEPTH or holds a lone surrogate is skipped, and the rest of the file is still read.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from specdistill.data.sources import MAX_DEPTH, has_bad_text, too_deep

DEFAULT_FILE = "spec_bench_question.jsonl"


@dataclass
class Question:
    question_id: str | int
    category: str
    turns: list[str]


@dataclass
class QuestionSet:
    path: str
    questions: list[Question] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """One `file:line: reason` per skipped line."""

    def categories(self) -> list[str]:
        """Categories in order of first appearance."""
        return list(dict.fromkeys(q.category for q in self.questions))


def default_path() -> Path:
    """The Spec-Bench question file shipped as package data (480 questions, 13 categories)."""
    return Path(str(resources.files("specdistill") / "resources" / DEFAULT_FILE))


def _parse(obj, where: str) -> Question:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("question_id", "turns") if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing {missing}")
    turns = obj["turns"]
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise ValueError(f"{where}: 'turns' must be a non-empty list of non-empty strings")
    category = str(obj.get("category") or "uncategorized")
    for what, text in [("question_id", str(obj["question_id"])), ("category", category)] + \
            [(f"turn {i}", t) for i, t in enumerate(turns)]:
        if has_bad_text(text):
            raise ValueError(f"{where}: {what} holds a lone surrogate (not valid Unicode text)")
    return Question(obj["question_id"], category, list(turns))


def load_questions(path: str | Path | None = None, limit_per_category: int = 0,
                   categories: list[str] | None = None) -> QuestionSet:
    """Read a question file; keep the first `limit_per_category` of each category (0 = all)."""
    p = Path(path).expanduser() if path else default_path()
    if not p.exists():
        raise FileNotFoundError(f"{p}: question file not found")
    out = QuestionSet(str(p))
    per_cat: dict[str, int] = {}
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if not raw.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                out.skipped.append(f"{where}: not valid UTF-8 (byte {e.start} of the line is {raw[e.start]:#04x})")
                continue
            if too_deep(line):
                out.skipped.append(f"{where}: nested deeper than {MAX_DEPTH} levels")
                continue
            try:
                q = _parse(json.loads(line), where)
            except json.JSONDecodeError as e:
                out.skipped.append(f"{where}: invalid JSON ({e.msg})")
                continue
            except ValueError as e:
                out.skipped.append(str(e))
                continue
            if categories and q.category not in categories:
                continue
            if limit_per_category and per_cat.get(q.category, 0) >= limit_per_category:
                continue
            per_cat[q.category] = per_cat.get(q.category, 0) + 1
            out.questions.append(q)
    return out
