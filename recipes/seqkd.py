"""Seq-KD (Kim & Rush 2016, arXiv 1606.07947): a small draft LM fine-tuned with cross-entropy on the
target's own answers; exported as a standard HF draft model (HF assisted generation, vLLM draft_model,
SGLang STANDALONE) and scored.

specdistill data regenerate --target default --limit 64 --max-new-tokens 128   # the target's answers
accelerate launch recipes/seqkd.py data.source=data/regenerated/<file printed above>.jsonl
accelerate launch recipes/seqkd.py                     # default data: plain CE on the dataset's answers
The Trainer runs no target forward (drafter.loss=ce: the labels are the target's text). Papers and
config keys: docs/papers.md#small-lm. Every key: `specdistill config seqkd`.
"""

import sys

from specdistill import config, pipeline
from specdistill.export import hf_draft

RECIPE = "seqkd"


def main(argv=None, recipe=RECIPE):
    cfg = config.load(recipe, sys.argv[1:] if argv is None else argv)
    run = pipeline.train_drafter(cfg)  # seed, target, drafter (pruned target layers), data, Trainer.fit
    written = pipeline.export_and_score(cfg, run.drafter, run.target, run.trainer.accelerator.is_main_process)
    if "hf_draft" in written:  # the measured draft length goes into generation_config.json
        hf_draft.sync_generation_config(written["hf_draft"])


if __name__ == "__main__":
    main()
