"""Metrics sinks: a JSONL file always; TensorBoard and wandb when installed and asked for.

Only the main process builds real sinks; other ranks get the null logger, so callers never
branch on `if wandb:` or on the rank.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)


class NullLogger:
    def log(self, metrics: dict, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlLogger(NullLogger):
    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "a", buffering=1)

    def log(self, metrics, step):
        self.f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")

    def close(self):
        self.f.close()


def truncate_jsonl(path: Path, step: int) -> int:
    """Drop the rows of `path` logged after `step` (and any torn last line), atomically; returns how many
    went. A run resumed at `step` then logs each later step once, not a second time beside the rows the
    interrupted run had written past its last checkpoint."""
    from specdistill.fsutil import atomic_write_text

    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
            keep = isinstance(row, dict) and int(row.get("step", 0)) <= step
        except (ValueError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        elif line.strip():
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(x + "\n" for x in kept))
    return dropped


class TensorBoardLogger(NullLogger):
    def __init__(self, logdir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(str(logdir))

    def log(self, metrics, step):
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self.w.add_scalar(k, v, step)

    def close(self):
        self.w.close()


class WandbLogger(NullLogger):
    def __init__(self, project: str, name: str, config: dict, out_dir: Path):
        import wandb

        # No network on many training boxes: offline unless the user configured a mode.
        os.environ.setdefault("WANDB_MODE", "offline")
        self.run = wandb.init(project=project, name=name, config=config, dir=str(out_dir),
                              resume="allow", id=_wandb_id(out_dir))

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def close(self):
        self.run.finish()


@contextlib.contextmanager
def stdout_to_stderr():
    """Everything printed inside goes to stderr, logging handlers already bound to stdout included
    (e.g. DeepSpeed's, made at its import): scripts whose stdout must hold only JSON wrap their run."""
    import sys

    moved = []
    for lg in [logging.getLogger()] + [x for x in logging.Logger.manager.loggerDict.values()
                                        if isinstance(x, logging.Logger)]:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and h.stream is sys.stdout:
                moved.append((h, h.setStream(sys.stderr)))
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for h, old in moved:
            h.setStream(old)


def _wandb_id(out_dir: Path) -> str:
    p = out_dir / "wandb_id.txt"
    if p.exists():
        return p.read_text().strip()
    import uuid

    rid = uuid.uuid4().hex[:12]
    p.write_text(rid)
    return rid


class MultiLogger(NullLogger):
    def __init__(self, sinks):
        self.sinks = sinks

    def log(self, metrics, step):
        for s in self.sinks:
            s.log(metrics, step)

    def close(self):
        for s in self.sinks:
            s.close()


def build(out_dir: Path, trackers: list[str], project: str, name: str, config: dict, is_main: bool):
    if not is_main:
        return NullLogger()
    sinks = [JsonlLogger(out_dir / "metrics.jsonl")]
    wanted = set(trackers)
    auto = "auto" in wanted
    if "tensorboard" in wanted or (auto and importlib.util.find_spec("tensorboard")):
        try:
            sinks.append(TensorBoardLogger(out_dir / "tensorboard"))
        except Exception as e:  # a broken optional install must not kill training
            log.warning("tensorboard logging disabled: %s", e)
    if "wandb" in wanted or (auto and importlib.util.find_spec("wandb")):
        try:
            sinks.append(WandbLogger(project, name, config, out_dir))
        except Exception as e:
            log.warning("wandb logging disabled: %s", e)
    return MultiLogger(sinks)
