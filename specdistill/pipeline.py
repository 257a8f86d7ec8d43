"""The steps recipes share, as plain functions, so every recipe stays a short visible list of calls.

    cfg = config.load("eagle", argv)
    target = targets.load(cfg.target)
    drafter = drafters.build(cfg.drafter, target)
    run = pipeline.training_data(cfg, target, drafter)       # online or offline features
    Trainer(cfg, target, drafter, run.train, run.val, run.collate, run.target_fn).fit()
    pipeline.export_and_score(cfg, drafter, target)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    train: Any
    val: Any
    collate: Any = None
    target_fn: Any = None
    summary: dict | None = None


def training_data(cfg, target, drafter) -> TrainingData:
    """Prepared conversations (online target features) or the offline feature cache, plus the
    draft-vocabulary map for drafters with a reduced vocabulary (built from the training labels, or
    taken with the weights of `train.init_from`)."""
    from specdistill import data

    train, val, summary = data.build(cfg.data, target.tokenizer)
    from specdistill.train import checkpoint

    resuming = cfg.train.resume and checkpoint.latest(cfg.train.output_dir) is not None
    if cfg.train.init_from and not resuming:
        from specdistill import export

        export.init_weights(drafter, cfg.train.init_from, target)  # its draft vocabulary comes along
    elif not cfg.train.init_from:
        fit_vocab(drafter, train, summary, target)
    if cfg.train.features == "offline":
        from specdistill.data import features

        layers = drafter.spec.target_layers(drafter.cfg, target.config)
        ftrain = features.open_for(cfg.data, target, layers, "train")
        fval = features.open_for(cfg.data, target, layers, "val")
        return TrainingData(ftrain, fval, features.make_collate(ftrain), features.offline_target_fn(ftrain, target),
                            summary)
    return TrainingData(train, val, data.make_collate(target.tokenizer.pad_token_id), None, summary)


def fit_vocab(drafter, train_ds, summary: dict, target) -> None:
    """Install d2t/t2d from label-token frequencies when the drafter uses a reduced vocabulary."""
    vd = getattr(drafter, "draft_vocab_size", None)
    if vd is None or not hasattr(drafter, "set_vocab_map") or vd >= target.vocab_size:
        return
    from specdistill.data import vocab

    vm = vocab.build(train_ds, target.vocab_size, vd, data_key=Path(summary["prepared_dir"]).name,
                     tokenizer=target.tokenizer)
    drafter.set_vocab_map(vm.d2t, vm.t2d)
    log.info("draft vocabulary: %d of %d tokens, covering %.1f%% of training labels", vd, target.vocab_size,
             100 * vm.coverage)


def export_root(cfg) -> Path:
    """Where a run's exports go: export.out_dir, else <train.output_dir>/export (one folder per format)."""
    return Path(cfg.export.out_dir or Path(cfg.train.output_dir) / "export")


def export_and_score(cfg, drafter, target, is_main: bool = True) -> dict[str, Path]:
    """Write every export format under <output_dir>/export/<format>/ and, unless
    eval.limit_per_category < 0, score the native export on Spec-Bench (eval.json beside it)."""
    from specdistill import export

    if not is_main:
        return {}
    written = export.write(drafter, cfg.export, export_root(cfg), target)
    for fmt, path in written.items():
        print(f"exported {fmt}: {path}")
    if cfg.eval.limit_per_category >= 0 and "native" in written:
        score(cfg, written["native"])
        # The engine exports hold the same weights: the card of each carries the same measurement.
        measured = (written["native"] / "eval.json").read_text()
        for fmt, path in written.items():
            if fmt != "native":
                (path / "eval.json").write_text(measured)
    return written


def score(cfg, drafter_dir: Path, out_dir: Path | None = None) -> dict:
    """Score an export directory exactly as `specdistill eval --drafter <dir>` does; eval.json and the
    plot go to `out_dir` (default: the export directory itself, where `publish` looks for them)."""
    import argparse

    from specdistill.verify import evaluate

    e = cfg.eval
    argv = ["--target", cfg.target.name, "--drafter", str(drafter_dir), "--limit-per-category",
            str(e.limit_per_category), "--max-new-tokens", str(e.max_new_tokens), "--num-draft-tokens",
            str(e.num_draft_tokens), "--out", str(out_dir or drafter_dir)]
    if e.questions != "spec_bench":
        argv += ["--questions", e.questions]
    if e.draft_confidence:
        argv += ["--draft-confidence", str(e.draft_confidence)]
    ap = argparse.ArgumentParser(prog="specdistill eval")
    evaluate.add_arguments(ap)
    return evaluate.main(ap.parse_args(argv))


def compare(results: dict[str, dict]) -> str:
    """A small side-by-side table of eval results (name -> eval.json dict)."""
    rows = [f"{'drafter':<12}{'tau':>7}{'speed-up':>10}{'identical':>11}  alpha by draft position"]
    for name, r in results.items():
        o = r.get("overall", r)
        alpha = " ".join("-" if a is None else f"{a:.2f}" for a in o.get("alpha", []))
        ident = o.get("identical_to_greedy")
        rows.append(f"{name:<12}{o.get('tau', float('nan')):>7.2f}{o.get('speedup', float('nan')):>9.2f}x"
                    f"{str(ident):>11}  {alpha}")
    return "\n".join(rows)


@dataclass
class TrainedRun:
    cfg: Any
    target: Any
    drafter: Any
    trainer: Any
    result: dict


def train_drafter(cfg) -> TrainedRun:
    """The training half every drafter recipe shares: seed, load the target, build the drafter,
    prepare the data (online or offline features), `Trainer.fit`. Recipes differ by their YAML."""
    from accelerate.utils import set_seed

    from specdistill import drafters, targets
    from specdistill.train import Trainer

    set_seed(cfg.train.seed)  # the drafter's initial weights must not depend on the process or run
    target = targets.load(cfg.target)
    drafter = drafters.build(cfg.drafter, target)
    run = training_data(cfg, target, drafter)
    trainer = Trainer(cfg, target, drafter, run.train, run.val, run.collate, run.target_fn)
    return TrainedRun(cfg, target, drafter, trainer, trainer.fit())
