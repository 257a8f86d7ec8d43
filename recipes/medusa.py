"""Medusa heads on the target's last hidden state: train, export (native, vLLM MedusaModel, FasterDecoding), score.

accelerate launch recipes/medusa.py                                  # Medusa-1, embedded target + ShareGPT
accelerate launch recipes/medusa.py drafter.variant=medusa2          # Medusa-2: LoRA on the target, joint
specdistill train medusa train.max_minutes=4 drafter.labels=soft     # one process, from an installed wheel
Papers and config keys: docs/papers.md#medusa. Every key: `specdistill config medusa`.
"""

import sys

from specdistill import config, pipeline

RECIPE = "medusa"


def main(argv=None, recipe=RECIPE):
    cfg = config.load(recipe, sys.argv[1:] if argv is None else argv)
    if cfg.drafter.variant == "medusa2" and cfg.drafter.ramp_steps == 0:
        # The sine ramp s(t) runs over the whole run; the drafter counts loss calls (micro-batches).
        cfg.drafter.ramp_steps = cfg.train.max_steps * cfg.train.grad_accum
    run = pipeline.train_drafter(cfg)  # seed, target, drafter (+ LoRA for medusa2), data, Trainer.fit
    pipeline.export_and_score(cfg, run.drafter, run.target, run.trainer.accelerator.is_main_process)


if __name__ == "__main__":
    main()
