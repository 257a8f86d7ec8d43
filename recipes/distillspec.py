"""DistillSpec (Zhou et al. 2024, arXiv 2310.08461) / GKD (Agarwal et al. 2024, arXiv 2306.13649): a small
draft LM trained to match the target's full-vocabulary distribution on the continuation tokens, with a
fraction `drafter.lmbda` of rows continued by the draft itself (on-policy); exported as a standard HF
draft model (HF assisted generation, vLLM draft_model, SGLang STANDALONE) and scored.

accelerate launch recipes/distillspec.py                                    # TVD, lmbda 0.5, embedded target
accelerate launch recipes/distillspec.py drafter.loss=jsd drafter.beta=0.5 drafter.lmbda=0
accelerate launch recipes/distillspec.py train.init_from=<a seqkd export/native>   # Seq-KD first, then this
Losses: forward_kl | reverse_kl | jsd (TRL endpoints) | tvd. Papers and config keys:
docs/papers.md#small-lm. Every key: `specdistill config distillspec`.
"""

import sys

from specdistill import config, pipeline
from specdistill.export import hf_draft

RECIPE = "distillspec"


def main(argv=None, recipe=RECIPE):
    cfg = config.load(recipe, sys.argv[1:] if argv is None else argv)
    run = pipeline.train_drafter(cfg)  # seed, target, drafter, data, Trainer.fit (rollout step when lmbda > 0)
    written = pipeline.export_and_score(cfg, run.drafter, run.target, run.trainer.accelerator.is_main_process)
    if "hf_draft" in written:  # the measured draft length goes into generation_config.json
        hf_draft.sync_generation_config(written["hf_draft"])


if __name__ == "__main__":
    main()
