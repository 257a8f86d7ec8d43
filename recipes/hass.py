"""HASS (harmonized speculative sampling) on the EAGLE family: top-K distillation + context alignment.

accelerate launch recipes/hass.py                                    # EAGLE-3 + HASS, embedded defaults
accelerate launch recipes/hass.py drafter.hass_topk=10 drafter.hass_align_steps=2
The steps are those of recipes/eagle.py (pipeline.train_drafter); only the YAML
(recipes/configs/hass.yaml) differs. Papers and config keys: docs/papers.md#hass. Every key:
`specdistill config hass`.
"""

import sys

from specdistill import config, pipeline

RECIPE = "hass"


def main(argv=None, recipe=RECIPE):
    cfg = config.load(recipe, sys.argv[1:] if argv is None else argv)
    run = pipeline.train_drafter(cfg)  # seed, target, drafter, data, Trainer.fit
    pipeline.export_and_score(cfg, run.drafter, run.target, run.trainer.accelerator.is_main_process)


if __name__ == "__main__":
    main()
