"""Verified, atomic checkpoints with a `latest` pointer, retention, fall-back and exact resume.

Layout under `train.output_dir`:

    .lock                     flock held by the run's main process for the run's life (locks.py)
    config.yaml               resolved RunConfig (written at start)
    step_<n>/                 one checkpoint
        drafter.safetensors   the drafter's full state dict (what export and eval read)
        optimizer.pt          AdamW state (torch.save; loaded with weights_only=True)
        trainer_state.json    step, epoch, batch position, scheduler, python/numpy RNG, metrics, and
                              `checksums` (sha256 + size of every other file of the checkpoint) and
                              `state_sha256` (of this file's own content, canonical JSON)
        rng_rank<r>.pt        torch RNG state of each rank
        deepspeed/            engine state, only under DeepSpeed (accelerate save_state)
    latest                    text file naming the newest complete step_<n>

A checkpoint is first written to `.tmp_step_<n>.<pid>`, fsynced and renamed into place, then `latest`
is replaced atomically; a crash or a failed write (disk full) at any point leaves the previous `latest`
complete and loadable. On resume the main process verifies the checkpoint `latest` names against its
checksums; one that fails (missing, truncated, modified, unreadable file) is reported by file and
reason and the next older one that verifies is used instead, and `latest` is pointed at it. When
checkpoints exist but none verifies, the run stops rather than start over from step 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from specdistill import fsutil
from specdistill.locks import DirLock, LockHeldError

log = logging.getLogger(__name__)

STEP_RE = re.compile(r"^step_(\d+)$")
TMP_RE = re.compile(r"^\.tmp_step_\d+(\.\d+)?$")
STATE = "trainer_state.json"


class CheckpointError(ValueError):
    """A checkpoint cannot be used or written; one line naming the file and the reason."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint failed (e.g. disk full); the previous `latest` is intact."""


def _reason(e: BaseException) -> str:
    """One line for a library's load error, never torch's advice to load with weights_only=False."""
    text = str(e)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    if "weights_only" in text or "Unpickl" in text or "PytorchStreamReader" in text:
        return "not a loadable torch file (corrupt or truncated, or it holds objects a safe load refuses)"
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
    return line if len(line) <= 300 else line[:297] + "..."


def _state_digest(state: dict) -> str:
    body = {k: v for k, v in state.items() if k != "state_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _files(ckpt: Path) -> list[str]:
    """Every regular file of a checkpoint but trainer_state.json, as posix paths relative to it."""
    out = []
    for dirpath, _dirs, names in os.walk(ckpt):
        for n in names:
            p = Path(dirpath) / n
            rel = p.relative_to(ckpt).as_posix()
            if rel != STATE and p.is_file() and not p.is_symlink():
                out.append(rel)
    return sorted(out)


# ------------------------------------------------------------------ finding checkpoints
def list_steps(out_dir: Path) -> list[tuple[int, Path]]:
    out_dir = Path(out_dir)
    found = []
    for p in out_dir.iterdir() if out_dir.exists() else []:
        m = STEP_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _pointer(out_dir: Path) -> str | None:
    ptr = out_dir / "latest"
    try:
        return ptr.read_text().strip() if ptr.is_file() else None
    except (OSError, UnicodeDecodeError):
        return ""


def latest(out_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names when it is complete, else the newest complete step_<n> (cheap: no
    checksums; `choose` verifies); None when there is none."""
    out_dir = Path(out_dir)
    name = _pointer(out_dir)
    if name and STEP_RE.match(name) and (out_dir / name / STATE).is_file():
        return out_dir / name
    complete = [p for _, p in list_steps(out_dir) if (p / STATE).is_file()]
    return complete[-1] if complete else None


def _candidates(out_dir: Path) -> tuple[list[Path], list[str]]:
    """Checkpoints to try, best first: the one `latest` names, then older ones (newest first). Without a
    usable pointer, every step_<n>. Also the notes on the pointer itself."""
    steps = list_steps(out_dir)
    name, notes = _pointer(out_dir), []
    m = STEP_RE.match(name or "")
    if name is not None and not m:
        notes.append(f"{out_dir / 'latest'}: unreadable or not a step_<n> name ({name[:40]!r})")
    if m and not (out_dir / name).is_dir():
        notes.append(f"{out_dir / 'latest'}: points to {name}, which does not exist")
    if m:
        n = int(m.group(1))
        older = [p for s, p in steps if s <= n]
        if older:
            return older[::-1], notes
    return [p for _, p in steps][::-1], notes


def verify(ckpt: Path) -> str | None:
    """None when every file of the checkpoint is intact, else '<file>: <reason>'."""
    ckpt = Path(ckpt)
    sp = ckpt / STATE
    if not sp.is_file():
        return f"{sp}: missing (incomplete checkpoint)"
    try:
        state = json.loads(sp.read_text())
    except UnicodeDecodeError:
        return f"{sp}: corrupt (not UTF-8 text)"
    except json.JSONDecodeError as e:
        return f"{sp}: truncated or corrupt (not valid JSON: {e})"
    except OSError as e:
        return f"{sp}: unreadable ({_reason(e)})"
    if not isinstance(state, dict) or "step" not in state:
        return f"{sp}: corrupt (no trainer state in it)"
    sums = state.get("checksums")
    if sums is None:  # written before checksums existed: the files are checked when loaded
        log.warning("%s: written without checksums; not verified before loading", ckpt)
        return None
    if state.get("state_sha256") != _state_digest(state):
        return f"{sp}: checksum mismatch (the file was modified or corrupted)"
    for rel, want in sorted(sums.items()):
        p = ckpt / rel
        if not p.is_file():
            return f"{p}: missing"
        size = p.stat().st_size
        if size != want["bytes"]:
            kind = "truncated" if size < want["bytes"] else "wrong size"
            return f"{p}: {kind} ({size} bytes, {want['bytes']} written)"
        try:
            digest = fsutil.sha256_file(p)
        except OSError as e:
            return f"{p}: unreadable ({_reason(e)})"
        if digest != want["sha256"]:
            return f"{p}: checksum mismatch (sha256 {digest[:12]}..., {want['sha256'][:12]}... written)"
    return None


def agree(accelerator, value):
    """The main process's `value`, on every rank."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def first_error(accelerator, err: str | None) -> str | None:
    """The first rank's error (None when no rank has one), on every rank."""
    if accelerator.num_processes == 1:
        return err
    from accelerate.utils import gather_object

    return next((e for e in gather_object([err]) if e is not None), None)


def choose(accelerator, out_dir: str | Path) -> Path | None:
    """The checkpoint to resume from (same on every rank; the main process verifies), or None when the
    folder holds none. A checkpoint that fails verification is reported and the next older one is
    tried; `latest` is pointed at the one chosen. Raises CheckpointError when checkpoints exist but
    none verifies (a run never starts over silently)."""
    out_dir = Path(out_dir)
    result = None
    if accelerator.is_main_process:
        cands, notes = _candidates(out_dir)
        for n in notes:
            accelerator.print(f"checkpoint: {n}")
        failed = list(notes)
        chosen = None
        for c in cands:
            why = verify(c)
            if why is None:
                chosen = c
                break
            failed.append(why)
            accelerator.print(f"checkpoint {c.name} is unusable: {why}")
        if chosen is None and failed:
            result = ("error", f"{out_dir}: no checkpoint verifies ({'; '.join(failed)}); refusing to start "
                               "over from step 0. Repair or move the step_<n> folders, or set train.resume=false")
        elif chosen is not None:
            if failed:
                accelerator.print(f"checkpoint: falling back to {chosen} (the newest one that verifies)")
            if _pointer(out_dir) != chosen.name:
                fsutil.atomic_write_text(out_dir / "latest", chosen.name)
            result = ("ok", str(chosen))
    kind, value = agree(accelerator, result) or (None, None)
    if kind == "error":
        raise CheckpointError(value)
    return Path(value) if value else None


def saved_num_processes(ckpt: Path) -> int:
    try:
        return int(json.loads((Path(ckpt) / STATE).read_text()).get("num_processes", 1))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{Path(ckpt) / STATE}: unreadable ({_reason(e)})") from None


# ------------------------------------------------------------------ the run lock
def guarded(trainer, fn):
    """Run `fn()` (Trainer.fit) for the run's life holding `<output_dir>/.lock` (main process only; other
    ranks share the folder) with `train.threads` torch threads. A second run on the folder fails in one
    line naming the holder's pid; a lock left by a dead process is taken over."""
    acc, tc = trainer.accelerator, trainer.tc
    lock = DirLock(trainer.out_dir, "training run")
    err = None
    if acc.is_main_process:
        try:
            lock.acquire()
        except LockHeldError as e:
            err = str(e)
        except OSError as e:  # the folder cannot be created or opened
            err = f"{lock.path}: cannot take the run lock ({_reason(e)})"
    if (err := agree(acc, err)) is not None:
        raise LockHeldError(err)
    if lock.stale_holder:
        acc.print(f"{lock.path}: taking over a stale lock left by pid {lock.stale_holder.split()[0]} "
                  "(that process is gone)")
    threads = torch.get_num_threads()
    if getattr(tc, "threads", 0):
        torch.set_num_threads(tc.threads)
    trainer._run_lock = lock
    try:
        return fn()
    finally:
        trainer._run_lock = None
        torch.set_num_threads(threads)
        lock.release()


# ------------------------------------------------------------------ RNG
def python_rng_state() -> dict:
    st = random.getstate()
    np_st = np.random.get_state()
    return {"python": [st[0], list(st[1]), st[2]],
            "numpy": [np_st[0], np_st[1].tolist(), int(np_st[2]), int(np_st[3]), float(np_st[4])]}


def set_python_rng_state(d: dict) -> None:
    p = d["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    n = d["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


# ------------------------------------------------------------------ save / load
def _clean_stale_tmp(out_dir: Path, keep: Path) -> None:
    """Temp folders of earlier (crashed) runs; the run lock guarantees none belongs to a live run."""
    for p in out_dir.iterdir() if out_dir.exists() else []:
        if TMP_RE.match(p.name) and p != keep and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def save(accelerator, out_dir: Path, step: int, drafter_state: dict, optimizer, trainer_state: dict,
         keep_last: int, deepspeed_models=None) -> Path:
    """Write step_<step>/ atomically (all ranks call this; only the main process writes the shared files).
    A failed write raises CheckpointWriteError naming the file, after removing the partial folder."""
    out_dir = Path(out_dir)
    final = out_dir / f"step_{step}"
    tmp = Path(agree(accelerator, str(out_dir / f".tmp_step_{step}.{os.getpid()}")))
    current = tmp
    prev = latest(out_dir)

    def failed(e: BaseException) -> CheckpointWriteError:
        shutil.rmtree(tmp, ignore_errors=True)
        return CheckpointWriteError(
            f"{current}: checkpoint step_{step} not written ({_reason(e)}); "
            + (f"{prev} is still the latest checkpoint" if prev else "no earlier checkpoint exists"))

    err = None
    if accelerator.is_main_process:
        try:
            _clean_stale_tmp(out_dir, tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except Exception as e:
            err = str(failed(e))
    if (err := agree(accelerator, err)) is not None:
        raise CheckpointWriteError(err)
    try:
        if deepspeed_models is not None:
            # ZeRO partitions optimizer state across ranks: the engine must write it (every rank takes part).
            current = tmp / "deepspeed"
            accelerator.save_state(str(current))
        rng = torch.get_rng_state()
        # Each rank writes its own torch RNG; files are tiny.
        current = tmp / f"rng_rank{accelerator.process_index}.pt"
        torch.save({"cpu": rng, "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   current)
    except Exception as e:
        err = str(failed(e))
    # (also the barrier: every rank's files are in tmp before the main process checksums them)
    if (err := first_error(accelerator, err)) is not None:
        raise CheckpointWriteError(err)
    if accelerator.is_main_process:
        try:
            current = tmp / "drafter.safetensors"
            save_file({k: v.detach().contiguous().cpu() for k, v in drafter_state.items()}, current)
            os.chmod(current, fsutil.umask_mode())  # safetensors writes 0600; the mode open() would give
            if deepspeed_models is None:
                current = tmp / "optimizer.pt"
                torch.save(optimizer.state_dict(), current)
            current = tmp
            sums = {rel: {"sha256": fsutil.sha256_file(tmp / rel), "bytes": (tmp / rel).stat().st_size}
                    for rel in _files(tmp)}
            state = dict(trainer_state, rng=python_rng_state(), num_processes=accelerator.num_processes,
                         checksums=sums)
            state["state_sha256"] = _state_digest(state)
            current = tmp / STATE
            current.write_text(json.dumps(state, indent=1))
            current = tmp
            fsutil.fsync_tree(tmp)
            current = final
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            fsutil.fsync_dir(out_dir)
            current = out_dir / "latest"
            fsutil.atomic_write_text(current, final.name)
        except Exception as e:
            err = str(failed(e))
        if err is None:
            for _, old in list_steps(out_dir)[:-keep_last] if keep_last > 0 else []:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
    if (err := agree(accelerator, err)) is not None:
        raise CheckpointWriteError(err)
    accelerator.wait_for_everyone()
    return final


def _read(path: Path, reader):
    try:
        return reader(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable ({_reason(e)})") from None


def load(accelerator, ckpt: Path, drafter, optimizer, deepspeed_models=None) -> dict:
    """Restore drafter weights, optimizer, RNG; return the trainer state dict. Every failure is a
    CheckpointError naming the file."""
    ckpt = Path(ckpt)
    state = _read(ckpt / STATE, lambda p: json.loads(p.read_text()))
    for k in ("checksums", "state_sha256"):
        state.pop(k, None)
    if deepspeed_models is not None:
        _read(ckpt / "deepspeed", lambda p: accelerator.load_state(str(p)))
    else:
        sd = _read(ckpt / "drafter.safetensors", load_file)
        try:
            missing, unexpected = drafter.load_state_dict(sd, strict=False)
        except RuntimeError as e:  # shape mismatch
            raise CheckpointError(f"{ckpt / 'drafter.safetensors'}: does not match the drafter ({_reason(e)})") \
                from None
        if missing or unexpected:
            raise CheckpointError(f"{ckpt / 'drafter.safetensors'}: does not match the drafter (missing "
                                  f"{missing}, unexpected {unexpected})")
        opt_sd = _read(ckpt / "optimizer.pt", lambda p: torch.load(p, map_location="cpu", weights_only=True))
        try:
            optimizer.load_state_dict(opt_sd)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{ckpt / 'optimizer.pt'}: does not match the optimizer ({_reason(e)})") from None
    rng_file = ckpt / f"rng_rank{accelerator.process_index}.pt"
    if rng_file.exists():
        rng = _read(rng_file, lambda p: torch.load(p, weights_only=True))
        try:
            torch.set_rng_state(rng["cpu"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        except (KeyError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"{rng_file}: not an RNG state ({_reason(e)})") from None
    try:
        set_python_rng_state(state.pop("rng"))
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise CheckpointError(f"{ckpt / STATE}: no usable RNG state ({_reason(e)})") from None
    return state
