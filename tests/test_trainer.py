"""The one Trainer: accumulation equivalence, exact resume, atomic checkpoints, NaN stop."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import toy_drafter  # noqa: F401  (registers the `toy` drafter)

from specdistill import config, drafters
from specdistill.train import NonFiniteLossError, Trainer, checkpoint


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def collate(batch, pad=0):
    T = max(len(s["input_ids"]) for s in batch)
    ids = torch.full((len(batch), T), pad)
    am = torch.zeros((len(batch), T), dtype=torch.long)
    lm = torch.zeros((len(batch), T), dtype=torch.long)
    for i, s in enumerate(batch):
        n = len(s["input_ids"])
        ids[i, :n] = torch.tensor(s["input_ids"])
        am[i, :n] = 1
        lm[i, :n] = torch.tensor(s["loss_mask"])
    return {"input_ids": ids, "attention_mask": am, "loss_mask": lm}


def make_data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        T = int(torch.randint(12, 24, (1,), generator=g))
        ids = torch.randint(8, 80, (T,), generator=g).tolist()
        start = int(torch.randint(3, 8, (1,), generator=g))
        out.append({"input_ids": ids, "loss_mask": [0] * start + [1] * (T - start)})
    return ListDataset(out)


def run_cfg(tmp_path, name="run", **train):
    base = {"output_dir": str(tmp_path / name), "lr": 1e-2, "warmup_steps": 0, "max_steps": 1,
            "micro_batch_size": 4, "grad_accum": 1, "save_every": 0, "eval_every": 0, "log_every": 1,
            "trackers": ["none"], "progress": False, "mixed_precision": "no", "grad_clip": 0.0}
    base.update(train)
    return config.load(None, [f"train.{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in base.items()]
                       + ["drafter.name=toy"])


def fit(tmp_path, tiny_target, name="run", data=None, drafter_cfg=None, **train):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    cfg = run_cfg(tmp_path, name, **train)
    if drafter_cfg:
        cfg.drafter = drafter_cfg
    torch.manual_seed(0)
    d = drafters.build(cfg.drafter, tiny_target)
    tr = Trainer(cfg, tiny_target, d, data or make_data(), make_data(8, seed=1), collate_fn=collate)
    summary = tr.fit()
    return tr, d, summary


@pytest.mark.parametrize("mb,accum", [(4, 2), (1, 8)])
def test_grad_accumulation_equivalence(tmp_path, tiny_target, mb, accum):
    _, ref, _ = fit(tmp_path, tiny_target, "ref", micro_batch_size=8, grad_accum=1)
    _, d, _ = fit(tmp_path, tiny_target, f"a{mb}", micro_batch_size=mb, grad_accum=accum)
    for (k, a), b in zip(ref.state_dict().items(), d.state_dict().values()):
        # atol 1e-4 = 1% of the lr: Adam's first step is ~lr * sign(grad), so a gradient element near 0 whose
        # summation order differs (an AVX2-only CPU: 1 of 8,192 head weights off by 3.1e-5) moves by up to the
        # lr; a micro-batch lost or counted twice changes the gradient direction and moves many elements by ~lr
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (k, float((a - b).abs().max()))
    # the update really moved the weights (the test could not pass with a no-op step)
    torch.manual_seed(0)
    fresh = drafters.build(ref.cfg, tiny_target)
    assert not torch.allclose(fresh.head.weight, ref.head.weight)


def test_resume_reproduces_losses(tmp_path, tiny_target):
    _, _, full = fit(tmp_path, tiny_target, "full", max_steps=6, save_every=3, keep_last=5, warmup_steps=2)
    # Simulate a crash after step 3: a run directory holding only the step-3 checkpoint.
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(tmp_path / "full" / "step_3", crashed / "step_3")
    (crashed / "latest").write_text("step_3")
    shutil.copy(tmp_path / "full" / "config.yaml", crashed / "config.yaml")
    _, _, resumed = fit(tmp_path, tiny_target, "crashed", max_steps=6, save_every=3, keep_last=5, warmup_steps=2)
    assert len(full["losses"]) == 6 and len(resumed["losses"]) == 3
    assert resumed["losses"] == pytest.approx(full["losses"][3:], rel=1e-6, abs=1e-7)


def test_interrupted_checkpoint_keeps_latest(tmp_path, tiny_target, monkeypatch):
    tr, d, _ = fit(tmp_path, tiny_target, "ck", max_steps=2, save_every=1, keep_last=3)
    out = tmp_path / "ck"
    assert checkpoint.latest(out).name == "step_2"

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpoint, "save_file", boom)
    tr.step = 3
    with pytest.raises(OSError):
        tr.save()
    ck = checkpoint.latest(out)
    assert ck.name == "step_2"
    sd = checkpoint.load_file(ck / "drafter.safetensors")
    assert set(sd) == set(d.state_dict())


def test_nonfinite_loss_stops_and_keeps_last_good(tmp_path, tiny_target):
    cfg = run_cfg(tmp_path, "nan").drafter
    cfg.nan_after = 4
    with pytest.raises(NonFiniteLossError, match="step_2"):
        fit(tmp_path, tiny_target, "nan", drafter_cfg=cfg, max_steps=5, save_every=2)
    assert checkpoint.latest(tmp_path / "nan").name == "step_2"


def test_logs_and_config_written(tmp_path, tiny_target):
    fit(tmp_path, tiny_target, "logs", max_steps=3, eval_every=2, eval_batches=2)
    out = tmp_path / "logs"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert any("val/loss" in r for r in rows)
    assert all(r["tokens_per_s"] > 0 for r in rows if "loss" in r)
    assert config.from_dict(__import__("yaml").safe_load((out / "config.yaml").read_text())).train.max_steps == 3


def test_progress_total_follows_the_time_budget():
    """Under train.max_minutes the bar's total is what the time left allows at this run's pace
    (capped by max_steps), so a time-budgeted run with max_steps=1000000 shows a real ETA."""
    from specdistill.train.trainer import _budget_total

    # 10 steps in 60 s of a 10-minute budget: 540 s left at 6 s/step = 90 more steps
    assert _budget_total(10, 10, 1_000_000, 60.0, 10.0) == 100
    # resumed at step 500: the pace counts this run's steps only
    assert _budget_total(510, 10, 1_000_000, 60.0, 10.0) == 600
    # max_steps comes first when it is nearer; a spent budget leaves the steps done
    assert _budget_total(10, 10, 50, 60.0, 10.0) == 50
    assert _budget_total(10, 10, 1_000_000, 700.0, 10.0) == 10


def test_progress_bar_under_a_time_budget(tmp_path, tiny_target, monkeypatch):
    """A budgeted run with the bar on: the bar's total tracks the budget, not max_steps, and the run
    stops at the budget with a checkpoint. The clock is faked: 1 minute per step, budget 3 minutes."""
    import tqdm.auto

    import specdistill.train.trainer as trainer_mod

    clock = {"t": 1000.0}

    def fake_time():
        clock["t"] += 30.0  # the loop reads the clock twice per step
        return clock["t"]

    monkeypatch.setattr(trainer_mod.time, "time", fake_time)
    totals = []
    real_update = tqdm.auto.tqdm.update

    def spy(self, n=1):
        totals.append(self.total)
        return real_update(self, n)

    monkeypatch.setattr(tqdm.auto.tqdm, "update", spy)
    tr, _, _ = fit(tmp_path, tiny_target, max_steps=1_000_000, max_minutes=3, progress=True)
    assert 1 <= tr.step <= 4, tr.step
    assert totals and max(totals) < 100, totals  # never the 1,000,000 of max_steps
    assert totals[-1] == tr.step


def test_linear_lr_schedule_decays_linearly_to_the_floor():
    from specdistill.train.schedule import lr_factor

    assert lr_factor(0, 2, 12, 0.0, "linear") == 0.5
    assert lr_factor(2, 2, 12, 0.0, "linear") == 1.0
    assert abs(lr_factor(7, 2, 12, 0.0, "linear") - 0.5) < 1e-9
    assert lr_factor(12, 2, 12, 0.1, "linear") == pytest.approx(0.1)
    assert lr_factor(7, 2, 12, 0.0, "cosine") == pytest.approx(0.5)  # cosine midpoint agrees, quarter points differ
    assert lr_factor(4, 2, 12, 0.0, "linear") == pytest.approx(0.8)
    assert lr_factor(4, 2, 12, 0.0, "cosine") > 0.9
