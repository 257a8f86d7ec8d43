"""benchmarks/eagle_quality.py end to end on a tiny random 4-layer llama saved to a dir: three variants
trained for 3 s each, an equal-steps regenerated-data run, every export and pld scored (chain and
tree), one JSON document on stdout and in --out."""

from __future__ import annotations

import json
import runpy

from conftest import write_tiny_run_inputs

from specdistill import config

ROOT = config.REPO_ROOT


def test_eagle_quality_smoke(tmp_path, capsys):
    _, convs, questions = write_tiny_run_inputs(tmp_path)
    regen = tmp_path / "regen.jsonl"  # stands in for `specdistill data regenerate` output
    regen.write_text(convs.read_text())
    extra = [f"data.prepared_dir={tmp_path / 'prepared'}", "data.max_length=64", "data.val_fraction=0.1",
             "data.min_loss_tokens=2", "eagle3:drafter.layer_ids=[1,2,3]", "hass:drafter.layer_ids=[1,2,3]",
             "eagle3:drafter.draft_vocab_size=48", "hass:drafter.draft_vocab_size=48", "train.micro_batch_size=2", "train.mixed_precision=no",
             "train.trackers=[none]", "train.progress=false", "train.eval_every=0", "train.save_every=0",
             "train.warmup_steps=2"]
    out = tmp_path / "bench"
    argv = ["--minutes", "0.05", "--target", str(tmp_path / "target"), "--data", str(convs),
            "--questions", str(questions), "--per-category", "1", "--max-new-tokens", "8", "--out", str(out), "--threads", "1",
            "--regenerated-source", str(regen)] + [f"--extra={e}" for e in extra]
    main = runpy.run_path(str(ROOT / "benchmarks" / "eagle_quality.py"), run_name="bench")["main"]
    capsys.readouterr()  # library import chatter from building the target above
    doc = main(argv)

    printed = json.loads(capsys.readouterr().out)  # stdout is exactly the JSON document
    assert printed == json.loads((out / "eagle_quality.json").read_text()) == json.loads(json.dumps(doc))
    res = doc["results"]
    assert set(res) == {"eagle1", "eagle3", "hass", "eagle3_regenerated", "pld"}
    for name, r in res.items():
        for mode in ("chain", "tree"):
            f = r[mode]
            assert f["identical_to_greedy"] is True, (name, mode)
            assert f["tau"] >= 1.0 and f["speedup"] > 0 and set(f["categories"]) == {"math"}
            assert len(f["alpha"]) >= 1
            assert (out / name / f"eval_{mode}" / "eval.json").exists()
        if name != "pld":
            assert r["training"]["steps"] >= 1 and r["training"]["tokens_seen"] > 0
    assert res["eagle3_regenerated"]["training"]["steps"] == res["eagle3"]["training"]["steps"]
    g = doc["goals"]
    for mode in ("chain", "tree"):
        assert set(g[mode]) == {"eagle3_tau_ge_1.4x_eagle1", "eagle3_tau_ge_2x_pld", "hass_tau_ge_eagle3"}
        assert all(isinstance(v, bool) for v in g[mode].values())
    # 0.05 minutes cannot decide a goal stated at 60 minutes unless it was met anyway
    assert g["speedup_ge_2.0x_at_60min"] in (None, True)
    assert doc["all_identical_to_greedy"] is True
    assert doc["command"].startswith("python benchmarks/eagle_quality.py --minutes 0.05")

    # --reuse: nothing is retrained and no eval is decoded again; the document's figures are the same
    import specdistill.scoring as scoring

    calls = []
    orig = scoring.main
    scoring.main = lambda a: (calls.append(a), orig(a))[1]
    try:
        again = main(argv + ["--reuse", "--variants", "eagle3", "--no-pld"])
    finally:
        scoring.main = orig
    assert calls == []
    assert again["results"]["eagle3"]["chain"] == res["eagle3"]["chain"]
    assert again["results"]["eagle3"]["training"]["reused"] is True
