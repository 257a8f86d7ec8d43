"""One holder per directory: an `flock` on `<dir>/.lock` (ground floor: imports nothing of ours).

A training run holds the lock on `train.output_dir` for its whole life; a feature-cache build holds
the one on its cache folder. The kernel drops an flock when its holder exits, however it exits
(kill -9 included), so a lock file left by a dead process is not held and is simply taken over; the
file's text (pid, host, start time) only says who holds it, for the refusal message. flock locks
belong to an open file, so two holders in one process conflict as two processes do.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path


class LockHeldError(RuntimeError):
    """Another live process holds the lock; the message names the lock file and the holder's pid."""


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _holder_pid(text: str) -> str:
    return text.split()[0] if text.split() else "?"


class DirLock:
    """`with DirLock(d, "training run"):` or `.acquire()` / `.release()`."""

    def __init__(self, directory: str | Path, what: str = "process"):
        self.dir = Path(directory)
        self.path = self.dir / ".lock"
        self.what = what
        self.fd: int | None = None
        self.stale_holder = ""  # text of a dead holder's lock file that was taken over, if any

    def acquire(self, wait: bool = False, on_wait=None) -> DirLock:
        """Take the lock. Held by a live process: raise LockHeldError, or with `wait` call
        `on_wait(holder_pid)` once and block until it is free."""
        if self.fd is not None:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise LockHeldError(f"{self.path}: cannot lock ({e.strerror}); this filesystem may not "
                                        "support flock") from None
                holder = _read_holder(fd)
                if not wait:
                    raise LockHeldError(
                        f"{self.path}: held by pid {_holder_pid(holder)} ({holder or 'no details'}); another "
                        f"{self.what} is using {self.dir}. Wait for it to finish or use another directory"
                    ) from None
                if on_wait is not None:
                    on_wait(_holder_pid(holder))
                fcntl.flock(fd, fcntl.LOCK_EX)
            self.stale_holder = _read_holder(fd)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.ftruncate(fd, 0)  # an empty file: nobody holds it (a non-empty one unlocked = holder died)
        except OSError:
            pass
        finally:
            os.close(fd)  # closing drops the flock

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
