"""The README's main job: score the shipped reference EAGLE-3 drafter for the embedded target, then
train a fresh EAGLE-3 drafter for `train.max_minutes`, export it (native, SGLang, vLLM) and score it
the same way (Spec-Bench subset, greedy, speed-up over plain decoding in the same process).

./launch.sh demo                              # about 15 minutes on 2 CPU cores
./launch.sh demo train.max_minutes=3 eval.limit_per_category=1
"""

import json
import sys
from pathlib import Path

from specdistill import config, pipeline

REFERENCE = config.REPO_ROOT / "reference" / "eagle3-smollm2-135m"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = config.load("demo", argv)
    results = {}
    if cfg.target.name != "default":
        print("== the shipped reference drafter is for target=default; not scoring it against this target")
    elif (REFERENCE / "config.json").exists():
        print(f"== scoring the shipped reference drafter {REFERENCE}")
        results["reference"] = pipeline.score(cfg, REFERENCE, Path(cfg.train.output_dir) / "reference_eval")
    else:
        print(f"== no shipped reference drafter at {REFERENCE}; skipping its score")
    print(f"== training a fresh EAGLE-3 drafter for {cfg.train.max_minutes} minutes")
    run = pipeline.train_drafter(cfg)  # the EAGLE-3 steps of recipes/eagle.py, with demo.yaml
    pipeline.export_and_score(cfg, run.drafter, run.target, run.trainer.accelerator.is_main_process)
    fresh = pipeline.export_root(cfg) / "native" / "eval.json"
    results["fresh"] = json.loads(fresh.read_text())
    print("\n== summary (greedy, same prompts, speed-up over plain decoding by the same verifier)")
    print(pipeline.compare(results))


if __name__ == "__main__":
    main()
