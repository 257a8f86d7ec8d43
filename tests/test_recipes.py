"""Every recipe runs end to end on CPU through its YAML + overrides (litgpt test_full style):
3 steps, then a resumed run to 5, exports that pass their contracts, eval.json beside the export."""

from __future__ import annotations

import json
import runpy

import pytest
import torch
from conftest import write_tiny_run_inputs
from safetensors.torch import load_file

from specdistill import config
from specdistill.train import checkpoint

ROOT = config.REPO_ROOT


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    write_tiny_run_inputs(root)
    return root


def overrides(tiny, out, steps):
    return [f"target.name={tiny / 'target'}", f"data.source={tiny / 'convs.jsonl'}",
            f"data.prepared_dir={tiny / 'prepared'}", "data.max_length=64", "data.val_fraction=0.1",
            "data.min_loss_tokens=2", "drafter.layer_ids=[1,2,3]", "drafter.draft_vocab_size=48",
            f"train.output_dir={out}", f"train.max_steps={steps}", "train.micro_batch_size=2", "train.grad_accum=1",
            "train.save_every=3", "train.eval_every=0", "train.trackers=[none]", "train.progress=false",
            "train.mixed_precision=no", "train.max_minutes=0", "train.log_every=1",
            f"eval.questions={tiny / 'q.jsonl'}", "eval.limit_per_category=0", "eval.max_new_tokens=8"]


@pytest.mark.parametrize("recipe", ["eagle", "hass"])
def test_recipe_trains_resumes_exports_scores(tiny, tmp_path, recipe):
    main = runpy.run_path(str(ROOT / "recipes" / "eagle.py"), run_name="recipe")["main"]
    out = tmp_path / recipe
    main(overrides(tiny, out, 3), recipe=recipe)
    assert checkpoint.latest(out).name == "step_3"
    first = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    main(overrides(tiny, out, 5) + ["eval.draft_confidence=0.2"], recipe=recipe)  # resumes at step 3
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and len(first) == 3
    assert checkpoint.latest(out).name == "step_5"
    for fmt in ("native", "sglang", "vllm"):
        d = out / "export" / fmt
        assert (d / "config.json").exists() and (d / "model.safetensors").exists(), fmt
        ev = json.loads((d / "eval.json").read_text())
        assert ev["overall"]["identical_to_greedy"] is True and ev["settings"]["draft_confidence"] == 0.2
    if recipe == "hass":
        assert config.load("hass").drafter.hass_topk > 0
    else:  # warm start from the export: with lr 0 the new run exports exactly the weights it started from
        warm = tmp_path / "warm"
        main(overrides(tiny, warm, 1) + [f"train.init_from={out / 'export' / 'native'}", "train.lr=0"], recipe=recipe)
        a = load_file(str(out / "export" / "native" / "model.safetensors"))
        b = load_file(str(warm / "export" / "native" / "model.safetensors"))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
        # resuming its own checkpoint, the run no longer needs (or reads) the init_from directory
        main(overrides(tiny, warm, 2) + [f"train.init_from={tmp_path / 'gone'}", "train.lr=0"], recipe=recipe)
        assert checkpoint.latest(warm).name == "step_2"


def test_demo_recipe_on_a_tiny_target(tiny, tmp_path, capsys):
    main = runpy.run_path(str(ROOT / "recipes" / "demo.py"), run_name="recipe")["main"]
    out = tmp_path / "demo"
    main(overrides(tiny, out, 2))
    text = capsys.readouterr().out
    assert "not scoring it against this target" in text
    assert "== summary" in text and "fresh" in text
    ev = json.loads((out / "export" / "native" / "eval.json").read_text())
    pol = ev["settings"]["adaptive"]  # the demo scores with the adaptive policy on (demo.yaml)
    assert pol and pol["passes"] >= 1
    assert f"adaptive, {1 - pol['plain_passes'] / pol['passes']:.0%} of passes" in text
