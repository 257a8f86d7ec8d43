"""CTC drafter (arXiv 2412.00061): train, export (native only: no engine serves CTC drafters), score.

accelerate launch recipes/ctc.py                                     # embedded target + ShareGPT sample
accelerate launch recipes/ctc.py drafter.ctc_frames=8 drafter.ctc_label_len=4 train.max_minutes=30
specdistill train ctc train.max_steps=2                              # one process, from an installed wheel
Papers and config keys: docs/papers.md#ctc. Every key: `specdistill config ctc`.
"""

import sys

from specdistill import config, pipeline

RECIPE = "ctc"


def main(argv=None, recipe=RECIPE):
    cfg = config.load(recipe, sys.argv[1:] if argv is None else argv)
    run = pipeline.train_drafter(cfg)  # seed, target, drafter (fit: draft vocabulary), data, Trainer.fit
    pipeline.export_and_score(cfg, run.drafter, run.target, run.trainer.accelerator.is_main_process)


if __name__ == "__main__":
    main()
