"""Durable file writes shared by checkpoints, exports, eval results and locks (ground floor: imports nothing of ours).

`atomic_write_*` write to a temp file named with the pid beside the target, fsync it, rename it over the
target and fsync the directory, so a crash or power loss leaves either the old file or the new one.
Files get the mode the umask allows (as `open()` would), not mkstemp's 0600.
"""

from __future__ import annotations

import os
from pathlib import Path


def _umask_mode(base: int = 0o666) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so a rename inside it survives a power loss (no-op where unsupported)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under `root` (before renaming a finished folder into place)."""
    root = Path(root)
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if not p.is_symlink():
                fsync_file(p)
        fsync_dir(dirpath)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _umask_mode())
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def umask_mode(base: int = 0o666) -> int:
    """The mode `open()` would give a new file under the current umask (for chmod after a library's write)."""
    return _umask_mode(base)


# ---------------------------------------------------------------- load errors as one line (CLI)


def _first_line(text: str) -> str:
    return next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")


def _load_error_kind(exc: BaseException) -> str | None:
    """'safetensors' | 'json' | 'yaml' | 'text' | 'pickle' for an error met while parsing a file, else None."""
    import json
    import pickle

    name = type(exc).__name__
    if name == "SafetensorError":
        return "safetensors"
    if isinstance(exc, json.JSONDecodeError):
        return "json"
    if isinstance(exc, UnicodeDecodeError):
        return "text"
    if isinstance(exc, (pickle.UnpicklingError, EOFError)):
        return "pickle"
    if any(c.__name__ == "YAMLError" for c in type(exc).__mro__):
        return "yaml"
    if isinstance(exc, RuntimeError) and any(s in str(exc) for s in (
            "PytorchStreamReader", "Error while deserializing", "invalid load key", "weights_only")):
        return "pickle"
    return None


def _probe(given: Path, kind: str) -> Path | None:
    """The first file under the input `given` that fails to parse as `kind` (the loaders name no file)."""
    import json

    if given.is_file():
        return given
    if not given.is_dir():
        return None
    dirs = [given]
    latest = given / "latest"
    if latest.is_file():
        try:
            dirs.insert(0, given / latest.read_text().strip())
        except (OSError, UnicodeDecodeError):
            return latest
    dirs += sorted(p for p in given.iterdir() if p.is_dir() and not p.name.startswith("."))
    globs = {"safetensors": ["*.safetensors"], "json": ["*.json"], "yaml": ["*.yaml", "*.yml"],
             "text": ["*.json", "*.yaml", "latest"], "pickle": ["*.pt", "*.bin", "*.pth"]}[kind]
    for d in [given.parent / "config.yaml", *dirs]:
        for p in ([d] if d.is_file() else sorted(q for g in globs for q in d.glob(g))):
            try:
                if kind == "safetensors":
                    from safetensors import safe_open

                    with safe_open(str(p), framework="pt"):
                        pass
                elif kind == "json":
                    json.loads(p.read_text())
                elif kind == "yaml":
                    import yaml

                    yaml.safe_load(p.read_text())
                elif kind == "text":
                    p.read_text()
                else:
                    import torch

                    torch.load(p, map_location="cpu", weights_only=True)
            except Exception:
                return p
    return None


def describe_load_error(exc: BaseException, given: str | Path | None = None) -> str | None:
    """`<file>: <reason>` for an error met while reading a file, or None when `exc` is not one.

    The file is the one the error names (OSError.filename, or a message that starts with an existing
    path); failing that, the first file under the command's input `given` that does not parse. The reason
    is one line, and never torch's advice to load with weights_only=False.
    """
    kind = _load_error_kind(exc)
    line = _first_line(exc)
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or line}"
    head, sep, rest = line.partition(": ")
    if sep and head and (kind or isinstance(exc, ValueError)) and Path(head).exists():
        file, reason = head, rest
    elif kind is None:
        return None
    else:
        found = _probe(Path(given), kind) if given else None
        file, reason = (str(found) if found else str(given or "?")), line
    if "weights_only" in reason or kind == "pickle":
        detail = _first_line(str(exc).rsplit("WeightsUnpickler error:", 1)[-1]) if "WeightsUnpickler" in str(exc) \
            else ("" if "weights_only" in reason else reason)
        detail = detail.split(". ")[0].rstrip(".")  # the fact, not torch's advice that follows it
        reason = "not a loadable torch file (corrupt, or holds objects a safe load refuses)" + \
            (f": {detail}" if detail and "weights_only" not in detail else "")
    if kind == "safetensors" and "safetensors" not in reason:
        reason = f"not a valid safetensors file ({reason})"
    return f"{file}: {reason}"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def fresh_owned_dir(path: str | Path, marker: str) -> Path:
    """Make `path` an empty directory holding only the file `marker`, deleting an earlier one only if
    it carries that marker (a directory a previous run of the same tool made). An existing non-empty
    directory without it (a user's, or its parent) is refused, never deleted."""
    import shutil

    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise FileExistsError(f"{path}: exists and is not a directory; choose another path")
    if path.is_dir() and any(path.iterdir()):
        if not (path / marker).is_file():
            raise FileExistsError(f"{path}: not empty and not made by this tool (no {marker}); "
                                  "choose an empty or new directory")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / marker).write_text("made by specdistill; deleted and rebuilt by the next run\n")
    return path
