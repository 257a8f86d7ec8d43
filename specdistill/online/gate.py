"""The gate (challenger vs the drafter in service) and the serving directory's releases.

Layout (state dir of `specdistill retrain`):
    releases/<id>/      every promoted drafter (a native export + the gate's eval.json), never edited
    history.json        {"releases": [{"id", "path", "promoted_at", "tau", ...}], "events": [...]}
The serving path is a symlink to one release (or, before the first promotion, the user's directory).
Promotion: copy into releases/.tmp-<id>, fsync, rename to releases/<id>, then one atomic swap of the
serving entry: a new symlink renamed over the old one (os.replace), or, when serving is still a real
directory, renameat2(RENAME_EXCHANGE) with the new symlink, after which the old directory becomes
release `initial-<time>`. A crash anywhere leaves serving pointing at one complete drafter;
`recover()` (at the start of every run, under the lock) finishes or undoes what a crash interrupted.
`rollback()` points serving at the release before the current one, whose files were never touched.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import shutil
import time
from pathlib import Path

from specdistill import fsutil

log = logging.getLogger(__name__)

RENAME_EXCHANGE = 2


def overall(result: dict) -> dict:
    o = result.get("overall", result)
    return {"tau": o.get("tau"), "speedup": o.get("speedup"), "identical_to_greedy": o.get("identical_to_greedy"),
            "alpha": o.get("alpha"), "new_tokens": o.get("new_tokens")}


def decide(serving: dict, challenger: dict, min_tau_gain: float, guard: tuple[dict, dict] | None = None,
           max_guard_drop: float = 0.0) -> tuple[bool, str]:
    """(promote?, why) from the two eval results on the same held-out questions; with `guard` (the
    serving and challenger results on a fixed guard set, e.g. other Spec-Bench categories) the challenger
    must also stay lossless there and lose at most `max_guard_drop` tau, so retraining on one kind of
    traffic cannot quietly make the drafter worse on the rest."""
    if guard is not None:
        gs, gc = overall(guard[0]), overall(guard[1])
        if gc["identical_to_greedy"] is not True:
            return False, f"rejected: challenger not identical to greedy on the guard set ({gc['identical_to_greedy']})"
        if gs["tau"] is not None and gc["tau"] is not None and gc["tau"] < gs["tau"] - max_guard_drop:
            return False, (f"rejected: guard-set tau {gc['tau']:.3f} vs serving {gs['tau']:.3f} drops more than "
                           f"online.max_guard_drop={max_guard_drop}")
    s, c = overall(serving), overall(challenger)
    if c["identical_to_greedy"] is not True:
        return False, f"rejected: challenger not identical to greedy decoding ({c['identical_to_greedy']})"
    if c["tau"] is None or s["tau"] is None:
        return False, "rejected: no tau measured (no held-out question decoded)"
    gain = c["tau"] - s["tau"]
    if gain < min_tau_gain:
        return False, f"rejected: tau {c['tau']:.3f} vs serving {s['tau']:.3f} (gain {gain:+.3f} < {min_tau_gain})"
    return True, f"promoted: tau {c['tau']:.3f} vs serving {s['tau']:.3f} (gain {gain:+.3f} >= {min_tau_gain})"


# ------------------------------------------------------------------ history


def _history_path(state: Path) -> Path:
    return state / "history.json"


def load_history(state: Path) -> dict:
    p = _history_path(state)
    if not p.exists():
        return {"releases": [], "events": []}
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise ValueError(f"{p}: not valid JSON ({e}); restore it from releases/ or delete it") from None


def save_history(state: Path, hist: dict) -> None:
    state.mkdir(parents=True, exist_ok=True)
    fsutil.atomic_write_text(_history_path(state), json.dumps(hist, indent=1))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def current(serving: Path) -> Path:
    return serving.resolve()


# ------------------------------------------------------------------ the swap


def _exchange(a: Path, b: Path) -> None:
    """Atomically swap two directory entries (Linux renameat2 RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        raise OSError(f"{b}: cannot swap a real directory atomically here (no renameat2); make the serving path a "
                      f"symlink first: mv {b} {b}.v0 && ln -s {b.name}.v0 {b}")
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{b}: atomic exchange failed ({os.strerror(err)}); make the serving path a symlink "
                           f"first: mv {b} {b}.v0 && ln -s {b.name}.v0 {b}")


def _swap_name(serving: Path) -> Path:
    return serving.parent / f".{serving.name}.swap{os.getpid()}"


def point_serving(serving: Path, release: Path, state: Path) -> None:
    """Make `serving` a symlink to `release` in one atomic step (see the module docstring)."""
    tmp = _swap_name(serving)
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(release, serving.parent), tmp)
    if serving.is_symlink() or not serving.exists():
        os.replace(tmp, serving)
        fsutil.fsync_dir(serving.parent)
        return
    _exchange(tmp, serving)  # serving is now the symlink; tmp holds the user's original directory
    fsutil.fsync_dir(serving.parent)
    _adopt_original(tmp, state)


def _adopt_original(old_dir: Path, state: Path) -> None:
    """The user's original serving directory, swapped out by the first promotion, becomes a release."""
    hist = load_history(state)
    rid = f"initial-{time.strftime('%Y%m%dT%H%M%S')}"
    dest = (state / "releases" / rid).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.rename(old_dir, dest)  # same filesystem: beside the serving path
    fsutil.fsync_dir(dest.parent)
    for r in hist["releases"]:
        if r.get("original_dir"):
            r["path"] = str(dest)
    save_history(state, hist)


def _new_release(state: Path, export_dir: Path, rid: str, eval_result: dict) -> Path:
    rel = state / "releases"
    rel.mkdir(parents=True, exist_ok=True)
    tmp, dest = rel / f".tmp-{rid}", rel / rid
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(export_dir, tmp, symlinks=False)
    fsutil.atomic_write_text(tmp / "eval.json", json.dumps(eval_result, indent=1))
    fsutil.fsync_tree(tmp)
    os.rename(tmp, dest)
    fsutil.fsync_dir(rel)
    return dest.resolve()


def ensure_initial(serving: Path, state: Path, serving_eval: dict | None = None) -> dict:
    """history.json with the drafter in service as its first release (the one rollback ends at)."""
    hist = load_history(state)
    if not hist["releases"]:
        cur = current(serving)
        hist["releases"].append({"id": "initial", "path": str(cur), "promoted_at": None, "run": None,
                                 "original_dir": not serving.is_symlink(),
                                 **({k: overall(serving_eval)[k] for k in ("tau", "speedup")} if serving_eval else {})})
        save_history(state, hist)
    return hist


def promote(serving: Path, state: Path, export_dir: Path, rid: str, eval_result: dict, fault=None) -> Path:
    """Copy the challenger export into releases/<rid> (with its eval.json) and point serving at it."""
    ensure_initial(serving, state)
    dest = _new_release(state, export_dir, rid, eval_result)
    if fault:
        fault("promote")
    point_serving(serving, dest, state)
    if fault:
        fault("after_swap")
    _record(state, dest, rid, eval_result, "promote")
    return dest


def _record(state: Path, dest: Path, rid: str, eval_result: dict | None, event: str) -> None:
    hist = load_history(state)
    if not any(Path(r["path"]) == dest for r in hist["releases"]):
        o = overall(eval_result or {})
        hist["releases"].append({"id": rid, "path": str(dest), "promoted_at": _now(), "run": rid,
                                 "tau": o["tau"], "speedup": o["speedup"]})
    hist["events"].append({"at": _now(), "event": event, "serving": str(dest)})
    save_history(state, hist)


def recover(serving: Path, state: Path) -> list[str]:
    """Finish or undo what a crashed run left (called under the lock); returns what was done."""
    done = []
    for p in serving.parent.glob(f".{serving.name}.swap*"):
        if p.is_symlink():
            p.unlink()
            done.append(f"removed a stale swap link {p}")
        elif p.is_dir():  # crashed between the exchange and adopting the original directory
            _adopt_original(p, state)
            done.append(f"kept the original serving directory {p} as a release")
    rel = state / "releases"
    for p in rel.glob(".tmp-*") if rel.is_dir() else []:
        shutil.rmtree(p, ignore_errors=True)
        done.append(f"removed an unfinished release copy {p}")
    hist = load_history(state)
    known = {str(Path(r["path"])) for r in hist["releases"]}
    cur = str(current(serving)) if serving.exists() else ""
    if cur and cur not in known and Path(cur).parent == rel.resolve():
        ev = Path(cur) / "eval.json"
        _record(state, Path(cur), Path(cur).name, json.loads(ev.read_text()) if ev.exists() else None, "recovered")
        done.append(f"recorded the release in service {cur} (a crash came after the swap)")
        known.add(cur)
    for p in rel.iterdir() if rel.is_dir() else []:
        if p.is_dir() and not p.name.startswith(".") and str(p.resolve()) not in known and str(p.resolve()) != cur:
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed release {p.name} (not in history.json: never put in service, or rolled back)")
    return done


def prune(serving: Path, state: Path, keep: int) -> list[str]:
    """Delete the oldest release folders beyond `keep` (never the one in service or one outside releases/)."""
    hist = load_history(state)
    cur = str(current(serving))
    rel = (state / "releases").resolve()
    removed = []
    while keep > 0 and len(hist["releases"]) > keep:
        r = next((r for r in hist["releases"] if r["path"] != cur), None)
        if r is None:
            break
        hist["releases"].remove(r)
        if Path(r["path"]).parent == rel:
            shutil.rmtree(r["path"], ignore_errors=True)
        removed.append(r["id"])
    if removed:
        save_history(state, hist)
    return removed


def rollback(serving: Path, state: Path) -> dict:
    """Point serving at the release promoted before the one in service."""
    hist = load_history(state)
    paths = [str(Path(r["path"])) for r in hist["releases"]]
    cur = str(current(serving))
    if cur not in paths:
        raise ValueError(f"{serving}: serves {cur}, which is not in {_history_path(state)}; nothing to roll back to")
    i = paths.index(cur)
    if i == 0:
        raise ValueError(f"{serving}: serves the first release in {_history_path(state)}; nothing older to roll back to")
    prev = Path(paths[i - 1])
    if not prev.is_dir():
        raise FileNotFoundError(f"{prev}: the previous release is missing; cannot roll back")
    point_serving(serving, prev, state)
    hist = load_history(state)
    removed = hist["releases"].pop(i)  # the rolled-back release leaves the chain (its folder stays until pruned)
    hist.setdefault("rolled_back", []).append(removed)
    hist["events"].append({"at": _now(), "event": "rollback", "serving": str(prev), "from": cur})
    save_history(state, hist)
    return {"serving": str(prev), "from": cur}
