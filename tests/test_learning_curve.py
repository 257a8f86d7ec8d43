"""benchmarks/learning_curve.py's pure parts: the log-spaced checkpoints and the log-linear fit."""

from __future__ import annotations

import math
import runpy

import pytest

from specdistill import config

LC = runpy.run_path(str(config.REPO_ROOT / "benchmarks" / "learning_curve.py"), run_name="lc")


def test_checkpoints_double_up_to_the_budget():
    assert LC["checkpoints"](44_000, 2_750) == [2_750, 5_500, 11_000, 22_000, 44_000]
    assert LC["checkpoints"](1_000, 2_750) == [1_000]


def test_fit_recovers_a_log_linear_curve_and_solves_the_goals():
    # step 0: 0.1 + 0.05 ln(T / 1000); step 1 flat at 0.05; one early point left out of the fit
    pts = [{"label_tokens": t, "agreement": [0.1 + 0.05 * math.log(t / 1000), 0.05]} for t in (2_000, 4_000, 8_000, 16_000)]
    pts.insert(0, {"label_tokens": 500, "agreement": [0.9, 0.9]})
    f = LC["fit"](pts, 1_000, label_tok_s=100.0)
    assert f["points"] == 4
    c0, c1 = f["coefficients"]
    assert c0["b"] == pytest.approx(0.05, abs=1e-5) and c1["b"] == pytest.approx(0.0, abs=1e-5)
    t5 = 1000 * math.exp(0.4 / 0.05)
    assert f["alpha1_goal_tokens"]["0.5"]["label_tokens"] == pytest.approx(t5, rel=1e-2)
    assert f["alpha1_goal_tokens"]["0.5"]["cpu_hours_one_thread"] == pytest.approx(t5 / 100 / 3600, rel=2e-2)
    assert f["next_factor"]["agreement_predicted"][0] == pytest.approx(0.1 + 0.05 * math.log(160), abs=1e-3)


def test_fit_says_when_it_cannot_extrapolate():
    flat = [{"label_tokens": t, "agreement": [0.2 - 1e-4 * i]} for i, t in enumerate((1_000, 2_000, 4_000))]
    f = LC["fit"](flat, 0, label_tok_s=100.0)
    assert f["alpha1_goal_tokens"]["0.6"]["label_tokens"] is None  # not rising: no token count reaches it
    assert "error" in LC["fit"](flat[:1], 0, label_tok_s=None)
