"""Query logs: JSONL files in a directory, one served request a line.

A record gives the prompt and, optionally, what was served and the acceptance the server saw:
    {"prompt": "plain text"}                                   (a single user turn)
    {"prompt": [{"role": "user", "content": "..."}], "response": "...", "acceptance": 2.4}
    {"messages": [...OpenAI messages...]}  or  {"conversations": [...ShareGPT turns...]}
        (a last assistant turn is the served response)
    {"request": {"messages": [...]}, "response": {"choices": [{"message": {"content": "..."}}]}}
Optional keys: "id", "system" (with a text prompt), "response"/"completion", and the acceptance as
"acceptance", "accept_length" or "mean_accepted_tokens" (a number >= 0).

Reading never stops at a bad line: it is skipped and counted by reason (data/stats.py reasons) with
`file:line`. A last line without its newline is a write in progress: it is not read, and the
returned offset stops before it, so the next run reads it whole. Files are `*.jsonl` and rotated
`*.jsonl.<n>`, oldest first.

`specdistill retrain` reads the logs through its ledger (online/ledger.py: only what is new);
`data.source=logs:<dir>` reads every complete record of every log file (`LogsSource`): a logged
response is the assistant turn, and records without one are kept for `specdistill data regenerate`
(the target writes the answer) but skipped as `no_assistant_turn` by training data preparation.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from specdistill.data.sources import (
    MAX_DEPTH,
    ROLE_ALIASES,
    Conversation,
    SourceError,
    has_bad_text,
    too_deep,
)
from specdistill.data.stats import SkipCounter

LOG_NAME = re.compile(r"\.jsonl(\.\d+)?$")
ACCEPTANCE_KEYS = ("acceptance", "accept_length", "mean_accepted_tokens")
READ_CHUNK = 64 * 2**20  # at most this many new bytes of one file per call; the rest waits for the next


@dataclass
class LogRecord:
    key: str
    """Content hash of the line (the unit the ledger never consumes twice)."""
    prompt: list[dict]
    """Messages {"role", "content"} ending with a user turn."""
    response: str | None
    acceptance: float | None
    where: str


def record_key(line: bytes) -> str:
    return hashlib.sha256(line.strip()).hexdigest()[:24]


def _text(content) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: text only
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type", "text") == "text"]
        if len(parts) == len(content) and all(isinstance(t, str) for t in parts):
            return "".join(parts)
    return None


def _messages(raw, where: str, counter: SkipCounter) -> list[dict] | None:
    if not isinstance(raw, list):
        counter.skip("bad_shape", where, f"messages is a {type(raw).__name__}, not a list")
        return None
    out = []
    for j, m in enumerate(raw):
        role = m.get("role", m.get("from")) if isinstance(m, dict) else None
        content = _text(m.get("content", m.get("value"))) if isinstance(m, dict) else None
        if not isinstance(role, str) or content is None:
            counter.skip("bad_shape", where, f"message {j} needs a string role/from and text content/value")
            return None
        norm = ROLE_ALIASES.get(role.strip().lower())
        if norm is None:
            counter.skip("unknown_role", where, f"message {j} has role {role!r}")
            return None
        out.append({"role": norm, "content": content})
    return out


def _response_text(resp) -> str | None:
    if isinstance(resp, str):
        return resp
    if isinstance(resp, dict):  # an OpenAI response object
        choices = resp.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            c = choices[0]
            msg = c.get("message")
            return _text(msg.get("content")) if isinstance(msg, dict) else _text(c.get("text"))
    return None


def parse_record(rec, where: str, counter: SkipCounter) -> LogRecord | None:
    """A LogRecord, or None after counting why the record is skipped (key is filled in by the reader)."""
    if not isinstance(rec, dict):
        counter.skip("bad_shape", where, f"record is a {type(rec).__name__}, not an object")
        return None
    req = rec.get("request") if isinstance(rec.get("request"), dict) else rec
    response = None
    if "prompt" in req:
        p = req["prompt"]
        if isinstance(p, str):
            prompt = ([{"role": "system", "content": req["system"]}] if isinstance(req.get("system"), str) else []) + \
                [{"role": "user", "content": p}]
        else:
            prompt = _messages(p, where, counter)
    elif any(k in req for k in ("messages", "conversations")):
        prompt = _messages(req.get("messages", req.get("conversations")), where, counter)
        if prompt and prompt[-1]["role"] == "assistant":
            response = prompt.pop()["content"]
    else:
        counter.skip("bad_shape", where, f"no 'prompt', 'messages' or 'conversations' key (keys: {sorted(rec)[:6]})")
        return None
    if prompt is None:
        return None
    if not prompt or not any(m["content"].strip() for m in prompt if m["role"] == "user"):
        counter.skip("empty", where, "no non-empty user message in the prompt")
        return None
    if prompt[-1]["role"] != "user":
        counter.skip("bad_shape", where, f"the prompt ends with a {prompt[-1]['role']} turn, not a user turn")
        return None
    for key in ("response", "completion"):
        if response is None and key in rec:
            response = _response_text(rec[key])
            if response is None:
                counter.note("response_unreadable")
    acceptance = next((rec[k] for k in ACCEPTANCE_KEYS if k in rec), None)
    if acceptance is not None and (isinstance(acceptance, bool) or not isinstance(acceptance, (int, float))
                                   or not math.isfinite(acceptance) or acceptance < 0):
        counter.note("acceptance_ignored")
        acceptance = None
    texts = [m["content"] for m in prompt] + ([response] if response else [])
    if any(has_bad_text(t) for t in texts):
        counter.skip("invalid_utf8", where, "holds a lone surrogate or bytes that are not valid UTF-8")
        return None
    return LogRecord("", prompt, response or None, None if acceptance is None else float(acceptance), where)


def read_from(path: Path, offset: int, first_line: int, counter: SkipCounter
              ) -> tuple[list[LogRecord], int, int, bool]:
    """The complete lines of `path` from byte `offset` (line number `first_line`): (records, new offset,
    next line number, read to the end). A last line without its newline is left unread (a note)."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(READ_CHUNK)
    end = data.rfind(b"\n") + 1
    if end < len(data) and len(data) < READ_CHUNK:
        counter.note("partial_last_line")  # being written: read next time, whole
    records, lineno = [], first_line
    for raw in data[:end].splitlines(keepends=True):
        where = f"{path}:{lineno}"
        lineno += 1
        body = raw.removeprefix(codecs.BOM_UTF8) if lineno == 2 and offset == 0 else raw
        if not body.strip():
            continue
        try:
            line = body.decode("utf-8")
        except UnicodeDecodeError as e:
            counter.skip("invalid_utf8", where, f"byte {e.start} of the line is {body[e.start]:#04x}")
            continue
        if too_deep(line):
            counter.skip("bad_shape", where, f"nested deeper than {MAX_DEPTH} levels")
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            counter.skip("invalid_json", where, e.msg)
            continue
        rec = parse_record(obj, where, counter)
        if rec is not None:
            rec.key = record_key(body)
            records.append(rec)
    return records, offset + end, lineno, len(data) < READ_CHUNK


def log_files(directory: str | Path) -> list[Path]:
    """The log files of `directory`, oldest first (rotated `x.jsonl.2` before `x.jsonl.1` before `x.jsonl`)."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise SourceError(f"{d}: logs directory not found")
    files = [p for p in d.iterdir() if p.is_file() and LOG_NAME.search(p.name) and not p.name.startswith(".")]

    def order(p: Path):
        m = LOG_NAME.search(p.name)
        return (p.name[:m.start()], -int(m.group(1)[1:]) if m.group(1) else 0, p.name)
    return sorted(files, key=order)


class LogsSource:
    """`data.source=logs:<dir>`: the query logs as conversations (prompt turns + the served response)."""

    def __init__(self, spec: str, directory: Path):
        self.spec, self.path = spec, Path(directory).expanduser()
        self.files = log_files(self.path)

    def identity(self) -> str:
        parts = [f"{p.name}|{p.stat().st_size}|{int(p.stat().st_mtime)}" for p in self.files]
        return f"logs:{self.path.resolve()}|" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def iter(self, counter: SkipCounter):
        for path in self.files:
            records, _, _, _ = read_from(path, 0, 1, counter)
            for rec in records:
                turns = rec.prompt + ([{"role": "assistant", "content": rec.response}] if rec.response else [])
                yield Conversation(rec.key, turns, rec.where)
