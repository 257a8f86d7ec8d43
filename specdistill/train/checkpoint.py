"""Atomic checkpoints with a `latest` pointer, retention and exact resume.

Layout under `train.output_dir`:

    config.yaml               resolved RunConfig (written at start)
    step_<n>/                 one checkpoint
        drafter.safetensors   the drafter's full state dict (what export and eval read)
        optimizer.pt          AdamW state (torch.save; loaded with weights_only=True)
        trainer_state.json    step, epoch, batch position, scheduler, python/numpy RNG, metrics
        rng_rank<r>.pt        torch RNG state of each rank
        deepspeed/            engine state, only under DeepSpeed (accelerate save_state)
    latest                    text file naming the newest complete step_<n>

A checkpoint is first written to `.tmp_step_<n>` and renamed into place, then `latest` is replaced
with os.replace; a crash at any point leaves the previous `latest` complete and loadable.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STEP_RE = re.compile(r"^step_(\d+)$")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def latest(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, following the `latest` pointer."""
    out_dir = Path(out_dir)
    ptr = out_dir / "latest"
    if not ptr.exists():
        return None
    d = out_dir / ptr.read_text().strip()
    if not (d / "trainer_state.json").exists():
        raise FileNotFoundError(f"{ptr} points to {d.name}, which is not a complete checkpoint")
    return d


def saved_num_processes(ckpt: Path) -> int:
    return int(json.loads((Path(ckpt) / "trainer_state.json").read_text()).get("num_processes", 1))


def list_steps(out_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for p in out_dir.iterdir() if out_dir.exists() else []:
        m = STEP_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


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


def save(accelerator, out_dir: Path, step: int, drafter_state: dict, optimizer, trainer_state: dict,
         keep_last: int, deepspeed_models=None) -> Path:
    """Write step_<step>/ atomically (all ranks call this; only the main process writes files)."""
    out_dir = Path(out_dir)
    final = out_dir / f"step_{step}"
    tmp = out_dir / f".tmp_step_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if deepspeed_models is not None:
        # ZeRO partitions optimizer state across ranks: the engine must write it (every rank takes part).
        accelerator.save_state(str(tmp / "deepspeed"))
    rng = torch.get_rng_state()
    # Each rank writes its own torch RNG; files are tiny.
    torch.save({"cpu": rng, "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
               tmp / f"rng_rank{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_file({k: v.detach().contiguous().cpu() for k, v in drafter_state.items()}, tmp / "drafter.safetensors")
        if deepspeed_models is None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        state = dict(trainer_state, rng=python_rng_state(), num_processes=accelerator.num_processes)
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_write_text(out_dir / "latest", final.name)
        for _, old in list_steps(out_dir)[:-keep_last] if keep_last > 0 else []:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, ckpt: Path, drafter, optimizer, deepspeed_models=None) -> dict:
    """Restore drafter weights, optimizer, RNG; return the trainer state dict."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if deepspeed_models is not None:
        accelerator.load_state(str(ckpt / "deepspeed"))
    else:
        sd = load_file(ckpt / "drafter.safetensors")
        missing, unexpected = drafter.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"{ckpt}: checkpoint does not match the drafter (missing {missing}, unexpected {unexpected})")
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    rng_file = ckpt / f"rng_rank{accelerator.process_index}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    set_python_rng_state(state.pop("rng"))
    return state
