"""What `specdistill retrain` has consumed from the query logs, so no record is read twice or lost.

Per log file: its identity (device, inode), the byte offset and line number read up to (always the
end of a complete line), and two fingerprints of the consumed bytes (hashes of the first and of the
last FINGERPRINT bytes before the offset). On the next scan a file continues at its offset only
when it is the same file with the same consumed bytes:
  - same path, inode and fingerprints, size >= offset          -> continue (appended lines are new)
  - another path with the inode and fingerprints of an entry   -> rotated (renamed): continue there
  - same path, but shorter or other bytes before the offset    -> rewritten: read again from 0
  - same path, another inode (a new file after a rotation)       -> replaced: read from 0
Records read again after a rewrite are still dropped when their content hash (logs.record_key) is
among the last MAX_SEEN consumed ones. The ledger is saved with the replay buffer in one atomic
write (retrain.py), so a crash leaves either both before or both after an ingest.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from specdistill.data.querylogs import LogRecord, log_files, read_from
from specdistill.data.stats import SkipCounter

FINGERPRINT = 4096
MAX_SEEN = 500_000


@dataclass
class FileEntry:
    path: str
    dev: int
    ino: int
    offset: int
    line: int
    head: str
    tail: str


def _fingerprints(path: Path, offset: int) -> tuple[str, str]:
    with open(path, "rb") as f:
        head = f.read(min(offset, FINGERPRINT))
        f.seek(max(0, offset - FINGERPRINT))
        tail = f.read(min(offset, FINGERPRINT))
    return hashlib.sha256(head).hexdigest()[:16], hashlib.sha256(tail).hexdigest()[:16]


def _same_bytes(entry: FileEntry, path: Path, size: int) -> bool:
    return size >= entry.offset and _fingerprints(path, entry.offset) == (entry.head, entry.tail)


@dataclass
class Ledger:
    files: dict[str, FileEntry] = field(default_factory=dict)
    seen: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"files": {k: asdict(v) for k, v in self.files.items()}, "seen": self.seen}

    @classmethod
    def from_dict(cls, d: dict | None) -> Ledger:
        d = d or {}
        return cls({k: FileEntry(**v) for k, v in d.get("files", {}).items()}, list(d.get("seen", [])))

    def scan(self, directory: str | Path, counter: SkipCounter) -> tuple[list[LogRecord], Ledger, dict]:
        """Read what is new in `directory`: (new records, the ledger after consuming them, per-file events).
        `self` is not changed: the caller saves the returned ledger together with what it did with them."""
        by_inode = {(e.dev, e.ino): e for e in self.files.values()}
        seen = set(self.seen)
        new_files: dict[str, FileEntry] = {}
        records: list[LogRecord] = []
        events = {"continued": [], "new": [], "rotated": [], "rewritten": [], "replaced": [],
                  "duplicates": 0}
        for p in log_files(directory):
            st = p.stat()
            key = str(p.resolve())
            old = self.files.get(key)
            start = (0, 1)
            if old is not None and (old.dev, old.ino) == (st.st_dev, st.st_ino) and _same_bytes(old, p, st.st_size):
                start = (old.offset, old.line)
                events["continued"].append(key)
            elif (st.st_dev, st.st_ino) in by_inode and _same_bytes(by_inode[(st.st_dev, st.st_ino)], p, st.st_size):
                e = by_inode[(st.st_dev, st.st_ino)]
                start = (e.offset, e.line)
                events["rotated"].append(f"{e.path} -> {key}")
            elif old is not None:  # new bytes where consumed ones were: read again (seen records dropped)
                events["rewritten" if (old.dev, old.ino) == (st.st_dev, st.st_ino) else "replaced"].append(key)
            else:
                events["new"].append(key)
            offset, line = start
            while True:
                recs, offset, line, eof = read_from(p, offset, line, counter)
                for r in recs:
                    if r.key in seen:
                        events["duplicates"] += 1
                        continue
                    seen.add(r.key)
                    records.append(r)
                if eof:
                    break
            head, tail = _fingerprints(p, offset)
            new_files[key] = FileEntry(key, st.st_dev, st.st_ino, offset, line, head, tail)
        if events["duplicates"]:
            counter.note("duplicate_record", events["duplicates"])
        order = self.seen + [r.key for r in records]
        return records, Ledger(new_files, order[-MAX_SEEN:]), events


def describe(ledger: Ledger) -> list[str]:
    return [f"{e.path}: {e.offset} bytes, {e.line - 1} lines consumed" for e in ledger.files.values()
            if os.path.exists(e.path)]
