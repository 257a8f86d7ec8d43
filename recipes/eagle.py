"""EAGLE-1 / EAGLE-3 feature drafter: train, export (native, SGLang, vLLM), score.

accelerate launch recipes/eagle.py                                   # EAGLE-3, embedded target + ShareGPT
accelerate launch recipes/eagle.py drafter.variant=eagle1 train.max_steps=2000
./launch.sh eagle --cpu --nproc 2 train.micro_batch_size=2           # 2 CPU processes (gloo DDP)
Papers and config keys: docs/papers.md#eagle. Every key: `specdistill config eagle`.
"""

import sys

from accelerate.utils import set_seed

from specdistill import config, drafters, pipeline, targets
from specdistill.train import Trainer

RECIPE = "eagle"


def main(argv=None, recipe=RECIPE):
    cfg = config.load(recipe, sys.argv[1:] if argv is None else argv)
    set_seed(cfg.train.seed)  # the drafter's initial weights must not depend on the process or run
    target = targets.load(cfg.target)
    drafter = drafters.build(cfg.drafter, target)
    run = pipeline.training_data(cfg, target, drafter)
    trainer = Trainer(cfg, target, drafter, run.train, run.val, run.collate, run.target_fn)
    trainer.fit()
    pipeline.export_and_score(cfg, drafter, target, trainer.accelerator.is_main_process)


if __name__ == "__main__":
    main()
