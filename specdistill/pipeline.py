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
        from specdistill import loading

        loading.init_weights(drafter, cfg.train.init_from, target)  # data-derived state comes along
    elif not cfg.train.init_from:
        # Data-derived state (EAGLE: the draft vocabulary); a resumed run gets it back with its weights.
        drafter.fit(train, target, data_key=Path(summary["prepared_dir"]).name)
    if cfg.train.features == "offline":
        from specdistill.data import features

        layers = list(drafter.spec.needs(drafter.cfg, target.config).layers)
        ftrain = features.open_for(cfg.data, target, layers, "train")
        fval = features.open_for(cfg.data, target, layers, "val")
        return TrainingData(ftrain, fval, features.make_collate(ftrain), features.offline_target_fn(ftrain, target),
                            summary)
    return TrainingData(train, val, data.make_collate(target.tokenizer.pad_token_id), None, summary)


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
        score(cfg, written["native"], target=target)
        # The engine exports hold the same weights: the card of each carries the same measurement.
        measured = (written["native"] / "eval.json").read_text()
        for fmt, path in written.items():
            if fmt != "native":
                (path / "eval.json").write_text(measured)
    return written


def score(cfg, drafter_dir: Path, out_dir: Path | None = None, target=None) -> dict:
    """Score an export directory as `specdistill eval --drafter <dir>` does, on `target` (the run's
    in-memory target, so its dtype, GGUF file, revision and device map are the run's; loaded from
    `cfg.target` when None); eval.json and the plot go to `out_dir` (default: the export directory
    itself, where `publish` looks for them)."""
    from specdistill import scoring, targets

    e = cfg.eval
    target = target if target is not None else targets.load(cfg.target)
    return scoring.score(target, str(drafter_dir), out_dir or drafter_dir,
                         questions=None if e.questions == "spec_bench" else e.questions,
                         limit_per_category=e.limit_per_category, max_new_tokens=e.max_new_tokens,
                         num_draft_tokens=e.num_draft_tokens, draft_confidence=e.draft_confidence,
                         adaptive=e.adaptive)


def compare(results: dict[str, dict]) -> str:
    """A small side-by-side table of eval results (name -> eval.json dict). The last column says how the
    draft length was chosen: a fixed chain of k, or the adaptive policy and the share of passes it drafted."""
    rows = [f"{'drafter':<12}{'tau':>7}{'speed-up':>10}{'identical':>11}  {'drafting':<26}alpha by draft position"]
    for name, r in results.items():
        o = r.get("overall", r)
        alpha = " ".join("-" if a is None else f"{a:.2f}" for a in o.get("alpha", []))
        ident = o.get("identical_to_greedy")
        st = r.get("settings") or {}
        pol = st.get("adaptive")
        if pol:
            how = f"adaptive, {1 - pol['plain_passes'] / max(pol['passes'], 1):.0%} of passes"
        else:
            how = f"chain of {st['num_draft_tokens']}" if st.get("num_draft_tokens") else "-"
        rows.append(f"{name:<12}{o.get('tau', float('nan')):>7.2f}{o.get('speedup', float('nan')):>9.2f}x"
                    f"{str(ident):>11}  {how:<26}{alpha}")
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
