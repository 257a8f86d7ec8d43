"""EAGLE-1 / EAGLE-3 feature drafter: train, export (native, SGLang, vLLM), score.

accelerate launch recipes/eagle.py                                   # EAGLE-3, embedded target + ShareGPT
accelerate launch recipes/eagle.py drafter.variant=eagle1 train.max_steps=2000
./launch.sh eagle --cpu --nproc 2 --zero 2                           # 2 CPU processes, DeepSpeed ZeRO-2
specdistill train eagle train.max_steps=2                            # one process, from an installed wheel
Papers and config keys: docs/papers.md#eagle. Every key: `specdistill config eagle`.
"""

import sys

from specdistill import config, pipeline

RECIPE = "eagle"


def main(argv=None, recipe=RECIPE):
    cfg = config.load(recipe, sys.argv[1:] if argv is None else argv)
    run = pipeline.train_drafter(cfg)  # seed, target, drafter, data, Trainer.fit
    pipeline.export_and_score(cfg, run.drafter, run.target, run.trainer.accelerator.is_main_process)


if __name__ == "__main__":
    main()
