"""Reliability of training runs (issue 11): verified checkpoints with fall-back, one run per output dir,
metrics without duplicate steps, config validation, disk-full saves, train.threads, locked feature builds."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch
import toy_drafter  # noqa: F401  (registers the `toy` drafter)
from test_trainer import collate, make_data, run_cfg

from specdistill import cli, config, drafters
from specdistill.locks import DirLock, LockHeldError
from specdistill.train import Trainer, checkpoint

ONE_PROCESS = SimpleNamespace(num_processes=1, is_main_process=True, print=print)
SAVE = {"save_every": 2, "keep_last": 5, "warmup_steps": 2}


def _fit(tmp_path, target, name, hook=None, **train):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    cfg = run_cfg(tmp_path, name, **train)
    torch.manual_seed(0)
    d = drafters.build(cfg.drafter, target)
    if hook is not None:  # called inside each loss, i.e. while the run is going
        orig = d.loss
        d.loss = lambda b, t: (hook(d), orig(b, t))[1]
    tr = Trainer(cfg, target, d, make_data(), make_data(8, seed=1), collate_fn=collate)
    return tr, tr.fit()


def _damage(path, fault):
    data = bytearray(path.read_bytes())
    if fault == "bitflip":  # a byte well inside the file (past a safetensors/zip header, amid the JSON)
        i = len(data) - 9 if path.suffix == ".safetensors" else len(data) // 2
        data[i] ^= 0x01
    elif fault == "truncate":
        data = data[: len(data) // 2]
    else:  # garbage of the same size
        data = bytearray(os.urandom(len(data)))
    path.write_bytes(bytes(data))


def _train_rows(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


@pytest.mark.parametrize("fault", ["bitflip", "truncate", "garbage"])
@pytest.mark.parametrize("fname", ["drafter.safetensors", "optimizer.pt", "trainer_state.json"])
def test_damaged_latest_falls_back_to_the_previous_checkpoint(tmp_path, tiny_target, capsys, fname, fault):
    _, full = _fit(tmp_path, tiny_target, "full", max_steps=6, **SAVE)
    out = tmp_path / "run"
    _fit(tmp_path, tiny_target, "run", max_steps=4, **SAVE)
    assert checkpoint.latest(out).name == "step_4"
    _damage(out / "step_4" / fname, fault)
    capsys.readouterr()
    _, resumed = _fit(tmp_path, tiny_target, "run", max_steps=6, **SAVE)
    text = capsys.readouterr().out
    assert f"step_4 is unusable: {out / 'step_4' / fname}: " in text
    assert f"falling back to {out / 'step_2'}" in text and f"resumed from {out / 'step_2'} at step 2" in text
    # the resumed run repeats steps 3-6 of the uninterrupted one exactly
    assert resumed["losses"] == pytest.approx(full["losses"][2:], rel=1e-6, abs=1e-7)
    assert _train_rows(out) == [1, 2, 3, 4, 5, 6]
    assert checkpoint.choose(ONE_PROCESS, out).name == "step_6"


def test_latest_naming_a_deleted_step_falls_back(tmp_path, tiny_target, capsys):
    out = tmp_path / "run"
    _fit(tmp_path, tiny_target, "run", max_steps=4, **SAVE)
    shutil.rmtree(out / "step_4")
    capsys.readouterr()
    _, resumed = _fit(tmp_path, tiny_target, "run", max_steps=5, **SAVE)
    text = capsys.readouterr().out
    assert "latest: points to step_4, which does not exist" in text and "resumed from" in text
    assert len(resumed["losses"]) == 3


def test_no_checkpoint_verifies_refuses_to_start_over(tmp_path, tiny_target):
    out = tmp_path / "run"
    _fit(tmp_path, tiny_target, "run", max_steps=4, **SAVE)
    _damage(out / "step_2" / "drafter.safetensors", "bitflip")
    _damage(out / "step_4" / "optimizer.pt", "truncate")
    with pytest.raises(checkpoint.CheckpointError) as ei:
        _fit(tmp_path, tiny_target, "run", max_steps=6, **SAVE)
    msg = str(ei.value)
    assert "\n" not in msg and "no checkpoint verifies" in msg and "refusing to start over" in msg
    assert "step_2/drafter.safetensors: checksum mismatch" in msg and "step_4/optimizer.pt: truncated" in msg
    assert sorted(p.name for p in out.glob("step_*")) == ["step_2", "step_4"]  # nothing overwritten


def test_unverifiable_load_error_is_one_line_naming_the_file(tmp_path, tiny_target):
    """A checkpoint written before checksums (no `checksums` in its state) with a garbage optimizer.pt:
    one line naming the file, not torch's advice to load with weights_only=False."""
    out = tmp_path / "run"
    _fit(tmp_path, tiny_target, "run", max_steps=2, **SAVE)
    sp = out / "step_2" / "trainer_state.json"
    st = json.loads(sp.read_text())
    del st["checksums"], st["state_sha256"]
    sp.write_text(json.dumps(st))
    _damage(out / "step_2" / "optimizer.pt", "garbage")
    with pytest.raises(checkpoint.CheckpointError) as ei:
        _fit(tmp_path, tiny_target, "run", max_steps=4, **SAVE)
    msg = str(ei.value)
    assert msg.startswith(f"{out / 'step_2' / 'optimizer.pt'}: unreadable")
    assert "\n" not in msg and "weights_only" not in msg


_HOLDER = ("import sys; from specdistill.locks import DirLock; DirLock(sys.argv[1]).acquire(); "
           "print('held', flush=True); sys.stdin.read()")


def test_second_run_on_a_held_output_dir_is_refused(tmp_path, tiny_target):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeldError) as ei:
            _fit(tmp_path, tiny_target, "run", max_steps=2)
        msg = str(ei.value)
        assert "\n" not in msg and msg.startswith(f"{out / '.lock'}: held by pid {holder.pid} ")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written: no config, no metrics
    finally:
        holder.stdin.close()
        holder.wait(10)


def test_running_training_holds_its_lock_and_logs_clean_metrics(tmp_path, tiny_target):
    out = tmp_path / "run"
    tries = []

    def contend(d):
        if d.calls == 2:  # mid-run: a second process asks for the same output dir
            tries.append(subprocess.run([sys.executable, "-c", _HOLDER, str(out)], input="", text=True,
                                        capture_output=True))

    _fit(tmp_path, tiny_target, "run", hook=contend, max_steps=3)
    (p,) = tries
    assert p.returncode != 0 and f"held by pid {os.getpid()} " in p.stderr
    assert _train_rows(out) == [1, 2, 3]
    assert (out / ".lock").read_text() == ""  # released at the end of fit
    DirLock(out).acquire().release()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, tiny_target, capsys):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(f"{dead.pid} somehost 2026-01-01T00:00:00\n")
    _, summary = _fit(tmp_path, tiny_target, "run", max_steps=2)
    assert summary["step"] == 2
    assert f"taking over a stale lock left by pid {dead.pid}" in capsys.readouterr().out


def test_resumed_run_logs_no_step_twice(tmp_path, tiny_target):
    out = tmp_path / "run"
    _fit(tmp_path, tiny_target, "run", max_steps=3, **SAVE)
    # killed after logging step 3 but before its checkpoint landed, mid-way through a row
    shutil.rmtree(out / "step_3")
    (out / "latest").write_text("step_2")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    _fit(tmp_path, tiny_target, "run", max_steps=4, **SAVE)
    assert _train_rows(out) == [1, 2, 3, 4]


@pytest.mark.parametrize("key,value", [("max_steps", -1), ("max_steps", 0), ("save_every", -1), ("keep_last", -2),
                                       ("eval_every", -1), ("log_every", 0), ("threads", -1), ("lr", -1)])
def test_bad_train_values_are_refused_naming_the_key(key, value):
    with pytest.raises(config.ConfigError, match=f"train.{key} "):
        config.load(None, [f"train.{key}={value}"])


@pytest.mark.parametrize("fault", ["ENOSPC", "EFBIG"])
def test_failed_save_is_one_line_and_keeps_latest(tmp_path, tiny_target, monkeypatch, fault):
    out = tmp_path / "run"
    tr, _ = _fit(tmp_path, tiny_target, "run", max_steps=2, save_every=1, keep_last=3)
    tr.step = 3
    if fault == "ENOSPC":
        def full(_sd, path, *a, **k):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        monkeypatch.setattr(checkpoint, "save_file", full)
        with pytest.raises(checkpoint.CheckpointWriteError) as ei:
            tr.save()
    else:  # a real EFBIG: the file-size limit is below the size of the weights
        old_sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, hard))  # rng file fits, weights do not
        try:
            with pytest.raises(checkpoint.CheckpointWriteError) as ei:
                tr.save()
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, old_sig)
    msg = str(ei.value)
    assert "\n" not in msg and "drafter.safetensors: checkpoint step_3 not written" in msg
    assert f"{out / 'step_2'} is still the latest checkpoint" in msg
    if fault == "ENOSPC":
        assert "No space left on device" in msg
    assert checkpoint.latest(out).name == "step_2" and not (out / "step_3").exists()
    assert not list(out.glob(".tmp_step_*"))
    assert checkpoint.verify(out / "step_2") is None


def test_train_threads_honoured(tmp_path, tiny_target, monkeypatch):
    before = torch.get_num_threads()
    want = before + 1
    seen = []
    _fit(tmp_path, tiny_target, "run", hook=lambda d: seen.append(torch.get_num_threads()), max_steps=2,
         threads=want)
    assert seen and set(seen) == {want}
    assert torch.get_num_threads() == before
    # `specdistill train <recipe> ... --threads N`: torch threads from the start, and train.threads=N
    got = {}
    monkeypatch.setattr(cli.runpy, "run_path", lambda *a, **k: got.update(argv=list(sys.argv),
                                                                       threads=torch.get_num_threads()))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    try:
        cli.main(["train", "eagle", "train.max_steps=3", "--threads", str(want)])
    finally:
        torch.set_num_threads(before)
    assert got["threads"] == want and got["argv"][1:] == ["train.max_steps=3", f"train.threads={want}"]


def test_concurrent_feature_builds_compute_each_shard_once(tmp_path, tiny_target, monkeypatch):
    from specdistill.data import features

    calls = []
    orig = features._extract_shard

    def slow(*a, **k):
        calls.append(threading.get_ident())
        time.sleep(0.05)
        return orig(*a, **k)

    monkeypatch.setattr(features, "_extract_shard", slow)
    g = torch.Generator().manual_seed(0)
    splits = {"train": [{"input_ids": torch.randint(8, 128, (10,), generator=g).tolist(), "loss_mask": [0] * 4 + [1] * 6}
                        for _ in range(10)]}
    results = []
    ths = [threading.Thread(target=lambda: results.append(
        features.build_cache(tiny_target, splits, [0, 1], tmp_path / "c", shard_samples=4, batch_size=3)))
        for _ in range(2)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    assert len(results) == 2 and all(m["complete"] for m in results)
    assert len(calls) == 3  # 10 samples in shards of 4, computed by one build; the other reused them
