"""EAGLE-3 recipe ablation at equal label tokens: one change per arm, scored on target-generated text; prints JSON.

    python benchmarks/ablate.py                                   # every arm, ~80k label tokens each
    python benchmarks/ablate.py --tokens 50000 --arms baseline,frozen_head --threads 1
    python benchmarks/ablate.py --arm 'mine=train.lr=1e-4 drafter.freeze_lm_head=true'   # an extra arm
    python benchmarks/ablate.py --minutes 8 --subset-tokens 100000 --tau-questions 13 --threads 1 \
        --arms-dir arms-8min --json benchmarks/results/ablate_cheap_8min.json      # equal wall-clock

Data (the same for every arm): training conversations of the embedded ShareGPT (the prepared train split,
prepared order, minus the conversations of the self-distillation corpus) until their label tokens cover
one epoch of --tokens; their target features (layers 2/15/27 + the last hidden state) are computed once
into an offline cache under <out>/features (`specdistill data features` layout) and reused by every arm.
Validation: the first 24 conversations of the committed self-distillation corpus (data/samples/selfdistill/*.jsonl.gz: the target's own
greedy replies to ShareGPT prompts), cached the same way. The metric is teacher-forced top-1 agreement with
the target per training-time-test step j = 0, 1, 2 (step j reads the drafter's own j earlier outputs),
counted over every assistant token of that corpus, in fp32.

Each arm = recipes/configs/eagle.yaml + its overrides, the drafter built with the same seed and draft
vocabulary (the recipe's size of the subset's most frequent labels: 8,192 in results/ablate*.json and
learning_curve.json, 4,096 since ablate_cheap_6min.json), trained by the real Trainer (offline features, the
recipe's mixed precision) for the number of optimizer steps whose batches (the Trainer's seeded order)
first reach --tokens label tokens, so every arm of a seed sees identical batches. Label tokens/s =
label tokens / seconds from each step's feature read to the end of its optimizer step (the first step,
a warm-up, excluded), measured in this run. An arm whose <out>/arms/<name>/result.json exists is not
retrained (resumable); --force retrains. `<arm>_seed<N>` re-runs an arm with seed N (its own data order
and init); the spread of baseline, baseline_seed1, ... is the noise floor wins are judged against.

Equal wall-clock (--minutes M, issue 15's cheaper objectives): every arm trains for M minutes instead of to
--tokens (train.max_minutes; constant lr after warm-up so the stop time shapes nothing), so an arm that does
less work per label token sees more of them; the default arms are the recipe (baseline: 4,096 draft words since
benchmarks/results/ablate_cheap_6min.json, whose "baseline" was the 8,192 of then, now the vocab_8192 arm), 2 TTT
steps, and half of the loss positions at unrolled steps >= 1 (drafter.late_step_loss_fraction=0.5). Each arm's
draft vocabulary is the subset's most frequent labels; the JSON records every arm's resolved settings.
--tau-questions N also decodes each arm (chain of 4).

Learning curves (issue 15): `prepare(...)` builds the data once; `train_arm(setup, overrides, tokens,
seed, curve_tokens=[...])` trains one arm and calls `measure` at every label-token count of
curve_tokens, returning {"curve": [{"label_tokens", "step", "agreement", ...}], ...}.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SELFDISTILL = ROOT / "data/samples/selfdistill"

# speculators (vllm-project/speculators, src/speculators/train and models/eagle3) facts each arm isolates:
# lm_head frozen at the verifier's rows; AdamW lr 1e-4, weight_decay 0.01, torch's default betas
# (0.9, 0.999); linear decay to 0 with warmup = 1% of the total steps; clip_grad_norm_ 1.0; per-step
# loss = mean over that step's positions, steps weighted ttt_step_loss_decay**j with default 1.0;
# uniform noise U(-0.05, 0.05) (noise_std 0.05) on the verifier hidden states.
ARMS: dict[str, list[str]] = {
    "baseline": [],
    "frozen_head": ["drafter.freeze_lm_head=true"],
    "grad_clip_1": ["train.grad_clip=1.0"],
    "peer_schedule": ["train.lr_schedule=linear", "train.min_lr_ratio=0.0", "train.warmup_steps={warmup_1pct}"],
    "peer_lr": ["train.lr=1e-4"],
    "peer_adamw": ["train.betas=[0.9,0.999]", "train.weight_decay=0.01"],
    "peer_step_weighting": ["drafter.step_loss_decay=1.0", "drafter.step_loss_norm=per_step"],
    "feature_noise": ["drafter.feature_noise=0.05"],
    # not peer differences: the learning rate the other way, and the recipe's 50-step warmup as it fell at
    # the issue's ~84k tokens (72 steps); at fewer steps the Trainer cuts a warmup >= max_steps to max_steps // 10
    "lr_3e-4": ["train.lr=3e-4"],  # the recipe's lr before issue 16: the "baseline" of results/ablate.json
    "lr_6e-4": ["train.lr=6e-4"],
    "lr_1e-3": ["train.lr=1e-3"],  # the recipe's lr since issue 16
    "issue_warmup": ["train.warmup_steps={warmup_issue}"],
}
PER_TOKEN_ARMS = list(ARMS)  # the default arms of an equal-tokens run
# issue 15's cheaper objectives, meant for --minutes (equal wall-clock): less work per label token
ARMS |= {
    "ttt_2": ["drafter.ttt_steps=2"],
    "ttt_1": ["drafter.ttt_steps=1"],
    "vocab_4096": ["drafter.draft_vocab_size=4096"],  # the recipe's size since this sweep (= baseline now)
    "vocab_8192": ["drafter.draft_vocab_size=8192"],  # the recipe's size before it
    "late_rows_half": ["drafter.late_step_loss_fraction=0.5"],
    "late_rows_quarter": ["drafter.late_step_loss_fraction=0.25"],
}
CHEAP_ARMS = ("baseline", "vocab_8192", "ttt_2", "late_rows_half")  # --minutes' default arms
SEED_ARM = "baseline_seed1"  # the baseline with seed 1: the noise estimate (any <arm>_seed<N> works)


@dataclass
class Setup:
    target: object
    train: object          # FeatureDataset (offline cache) of the training subset
    val: object            # FeatureDataset of the target-generated validation text
    d2t: torch.Tensor
    t2d: torch.Tensor
    layers: list[int]
    info: dict
    train_labels: list[int]  # label tokens of each training sample, in cache order
    counts: object = None    # label-token counts of the training subset (draft vocabularies of other sizes)


def _label_tokens(sample) -> int:
    return int(sum(sample["loss_mask"][2:]))  # EagleDrafter.num_loss_tokens per row


VAL_CONVERSATIONS = 24  # the corpus's first records (its first run); it is append-only, so they never change


def _selfdistill_jsonl(out: Path) -> tuple[Path, set[str]]:
    """The validation text: the first VAL_CONVERSATIONS records of the committed corpus (later runs append
    conversations after them, which learning_curve.py's regenerated arm may train on)."""
    files = sorted(SELFDISTILL.glob("*.jsonl.gz"))
    if not files:
        raise SystemExit(f"no self-distillation corpus under {SELFDISTILL}")
    lines = []
    for f in files:
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            lines += [ln for ln in fh if ln.strip()]
    lines = lines[:VAL_CONVERSATIONS]
    path = out / "selfdistill_val.jsonl"
    from specdistill import fsutil

    fsutil.atomic_write_text(path, "".join(lines))
    return path, {json.loads(ln)["id"] for ln in lines}


def covering(samples, tokens: int) -> tuple[list[dict], int]:
    """Samples, in order, until their label tokens cover one epoch of `tokens` (with a margin: drop_last
    and a short last batch must not end the epoch early); (samples, their label tokens)."""
    need = int(tokens * 1.04) + 4096
    chosen, have = [], 0
    for s in samples:
        chosen.append({"input_ids": s["input_ids"], "loss_mask": s["loss_mask"]})
        have += _label_tokens(s)
        if have >= need:
            break
    return chosen, have


def emit(result: dict, json_path: str) -> None:
    """The benchmark's JSON: written atomically to `json_path` (if given) and printed."""
    from specdistill import fsutil

    text = json.dumps(result, indent=1)
    if json_path:
        fsutil.atomic_write_text(json_path, text + "\n")
    print(text)


def prepare(out: Path, tokens: int, target_name: str = "default", limit: int = 800) -> Setup:
    """Target, training subset covering `tokens` label tokens (one epoch), validation corpus, both cached
    as offline features under out/features, and the draft vocabulary of the subset."""
    from specdistill import targets
    from specdistill.config import DataConfig
    from specdistill.data import build, features, vocab

    out.mkdir(parents=True, exist_ok=True)
    target = targets.load(target_name)
    val_path, val_ids = _selfdistill_jsonl(out)
    train_ds, _, _ = build(DataConfig(limit=limit), target.tokenizer, verbose=False)
    skipped = 0

    def not_val():
        nonlocal skipped
        for i in range(len(train_ds)):
            if train_ds.conversation_id(i) in val_ids:
                skipped += 1
                continue
            yield train_ds[i]

    chosen, have = covering(not_val(), tokens)
    if have < tokens:
        print(f"[ablate] only {have} label tokens in the training split; arms will run > 1 epoch", file=sys.stderr)
    vtr, vva, _ = build(DataConfig(source=str(val_path), val_fraction=0.0), target.tokenizer, verbose=False)
    val = [vtr[i] for i in range(len(vtr))] + [vva[i] for i in range(len(vva))]
    layers = features.default_layers(target)  # + h_N at loss positions (the cache always keeps it)
    cache = out / "features"
    t0 = time.perf_counter()
    features.build_cache(target, {"train": chosen, "val": val}, layers, cache, batch_size=4)
    counts = vocab.count_tokens(chosen, target.vocab_size)
    d2t, t2d = vocab.vocab_map_from_counts(counts, 8192)
    info = {"train_samples": len(chosen), "train_label_tokens_epoch": have, "train_skipped_val_conversations": skipped,
            "val_conversations": len({json.loads(ln)["id"] for ln in val_path.read_text().splitlines()}),
            "val_samples": len(val), "val_assistant_tokens": sum(_label_tokens(s) for s in val),
            "draft_vocab_coverage": round(vocab.coverage(counts, t2d), 4),
            "feature_cache_s": round(time.perf_counter() - t0, 1), "feature_layers": layers}
    return Setup(target, features.open_cache(cache, "train"), features.open_cache(cache, "val"), d2t, t2d, layers,
                 info, [_label_tokens(s) for s in chosen], counts)


def steps_for_tokens(label_tokens: list[int], tokens: int, micro_batch_size: int, seed: int) -> tuple[int, int]:
    """(optimizer steps, label tokens) over samples with these label tokens, in the Trainer's seeded shuffled order (Trainer._loader: randperm
    with seed * 1_000_003 + epoch, drop_last) first reaching `tokens`. The Trainer's tokens_seen is
    checked against it after training."""
    label = list(label_tokens)
    n = len(label)
    steps, seen, epoch = 0, 0, 0
    while seen < tokens:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
        for b in range(n // micro_batch_size):
            seen += sum(label[i] for i in order[b * micro_batch_size:(b + 1) * micro_batch_size])
            steps += 1
            if seen >= tokens:
                return steps, seen
        epoch += 1
    return steps, seen


@torch.no_grad()
def measure(drafter, setup: Setup, batch_size: int = 4) -> dict:
    """Teacher-forced top-1 agreement with the target per TTT step over every assistant token of the
    validation cache (fp32, eval mode), and the mean token loss at step 0."""
    from specdistill.data import features

    was = drafter.training
    drafter.eval()
    collate = features.make_collate(setup.val)
    tfn = features.offline_target_fn(setup.val, setup.target)
    correct, total, loss0 = {}, {}, 0.0
    try:
        for a in range(0, len(setup.val), batch_size):
            b = collate([setup.val[i] for i in range(a, min(a + batch_size, len(setup.val)))])
            out = drafter.loss(b, tfn(b))
            for k, v in out.metrics.items():
                if k.startswith("correct_step"):
                    j = int(k.removeprefix("correct_step"))
                    correct[j] = correct.get(j, 0) + int(v)
                    total[j] = total.get(j, 0) + int(out.metrics[f"tokens_step{j}"])
            loss0 += float(out.metrics.get("loss_token_step0", 0.0))
    finally:
        drafter.train(was)
    steps = sorted(total)
    return {"agreement": [round(correct[j] / max(total[j], 1), 4) for j in steps],
            "tokens": [total[j] for j in steps], "val_loss_step0": round(loss0 / max(total.get(0, 1), 1), 4)}


@torch.no_grad()
def decode_tau(drafter, target, n_questions: int, max_new_tokens: int) -> dict:
    """Greedy chain-of-4 decode of the first turns of the first n Spec-Bench questions (no baseline)."""
    from specdistill.data.questions import load_questions
    from specdistill.verify.evaluate import run_eval
    from specdistill.verify.proposer import ProposerOptions

    qset = load_questions(None)
    qset.questions = [type(q)(q.question_id, q.category, q.turns[:1]) for q in qset.questions[:n_questions]]
    was = drafter.training
    drafter.eval()
    try:
        res = run_eval(target, drafter.proposer(target, ProposerOptions(num_draft_tokens=4)), qset,
                       max_new_tokens=max_new_tokens, baseline=False, progress=False)
    finally:
        drafter.train(was)
    o = res["overall"]
    return {"tau": round(o["tau"], 4), "alpha": [None if a is None else round(a, 4) for a in o["alpha"]],
            "questions": n_questions, "max_new_tokens": max_new_tokens}


def _resolve(overrides: list[str], steps: int) -> list[str]:
    """Placeholders: {warmup_1pct} = speculators' warmup (1% of the steps); {warmup_issue} = the issue-16 run's
    share (50 warmup steps of its 72, the recipe's warmup_steps=50 at ~84k label tokens) of these steps."""
    return [o.format(warmup_1pct=steps // 100, warmup_issue=round(steps * 50 / 72)) for o in overrides]


def train_arm(setup: Setup, overrides: list[str], tokens: int, seed: int, out_dir: Path,
              mixed_precision: str = "", curve_tokens: list[int] | tuple = (), keep: dict | None = None,
              minutes: float = 0.0) -> dict:
    """Train the EAGLE-3 recipe + `overrides` for the steps reaching `tokens` label tokens (or, with
    `minutes` > 0, for that much wall time: train.max_minutes, whatever the tokens); measure at the end
    (and after each step whose cumulative label tokens first reach a value of curve_tokens); `keep`, when
    given, receives the trained drafter under "drafter"."""
    from accelerate.utils import set_seed

    import specdistill.drafters.eagle  # noqa: F401  (registers the family)
    from specdistill import config, drafters
    from specdistill.data import features
    from specdistill.train import Trainer

    probe = config.load("eagle", overrides[:0])
    mb = probe.train.micro_batch_size
    if minutes > 0:  # wall-clock budget: the step count is whatever fits (the lr schedule should not depend on it)
        steps, planned = 1_000_000, None
    else:
        steps, planned = steps_for_tokens(setup.train_labels, tokens, mb, seed)
    ov = _resolve(overrides, steps)
    run = ["train.features=offline", f"train.output_dir={out_dir}", f"train.max_steps={steps}", f"train.seed={seed}",
           "train.eval_every=0", "train.save_every=0", "train.progress=false", "train.trackers=[none]",
           "train.resume=false", "train.log_every=10"]
    if minutes > 0:
        run.append(f"train.max_minutes={minutes}")
    if mixed_precision:
        run.append(f"train.mixed_precision={mixed_precision}")
    cfg = config.load("eagle", run + ov)
    set_seed(seed)
    drafter = drafters.build(cfg.drafter, setup.target)
    d2t, t2d = setup.d2t, setup.t2d
    if drafter.draft_vocab_size != d2t.numel():  # an arm with another draft vocabulary: the subset's top words
        from specdistill.data import vocab

        d2t, t2d = vocab.vocab_map_from_counts(setup.counts, drafter.draft_vocab_size)
    drafter.set_vocab_map(d2t, t2d)
    tr = Trainer(cfg, setup.target, drafter, setup.train, None, collate_fn=features.make_collate(setup.train),
                 target_fn=features.offline_target_fn(setup.train, setup.target))
    inner, opt_step = tr.target_fn, tr.optimizer.step
    starts, ends, step_tokens, curve = [], [], [], []
    pending = sorted(int(t) for t in curve_tokens)
    label_seen = [0]

    def timed_target(b):
        starts.append(time.perf_counter())
        step_tokens.append(int(drafter.num_loss_tokens(b)))
        return inner(b)

    def timed_opt(*a, **k):
        r = opt_step(*a, **k)
        ends.append(time.perf_counter())
        label_seen[0] += step_tokens[-1]
        while pending and label_seen[0] >= pending[0]:  # outside the timed window
            pending.pop(0)
            curve.append({**measure(drafter, setup), "label_tokens": label_seen[0], "step": len(ends)})
        return r

    tr.target_fn, tr.optimizer.step = timed_target, timed_opt
    res = tr.fit()
    if keep is not None:  # the trained drafter, for a caller that also decodes with it
        keep["drafter"] = drafter
    if planned is None:
        steps, planned = len(ends), res["tokens_seen"]
    elif res["tokens_seen"] != planned:
        raise RuntimeError(f"Trainer saw {res['tokens_seen']} label tokens, planned {planned}: the order replica "
                           "in steps_for_tokens no longer matches Trainer._loader")
    secs = [e - s for s, e in zip(starts, ends)]
    timed_tok = sum(step_tokens[1:len(secs)])
    tok_s = timed_tok / max(sum(secs[1:]), 1e-9)
    from specdistill.train import topology

    t, d = cfg.train, cfg.drafter
    resolved = {"lr": t.lr, "betas": list(t.betas), "weight_decay": t.weight_decay, "grad_clip": t.grad_clip,
                "warmup_steps": t.warmup_steps, "lr_schedule": t.lr_schedule, "min_lr_ratio": t.min_lr_ratio,
                "freeze_lm_head": d.freeze_lm_head, "step_loss_decay": d.step_loss_decay,
                "step_loss_norm": d.step_loss_norm, "feature_noise": d.feature_noise, "ttt_steps": d.unroll_steps(),
                "draft_vocab_size": drafter.draft_vocab_size, "late_step_loss_fraction": d.late_step_loss_fraction}
    return {"overrides": ov, "config": resolved, "seed": seed, "steps": steps, "label_tokens": planned,
            "label_tokens_per_s": round(tok_s, 1), "train_s": round(sum(secs), 1),
            "mixed_precision": topology.resolve_precision(cfg.train.mixed_precision),
            "final_train_loss": round(res["losses"][-1], 4), **measure(drafter, setup),
            **({"curve": curve} if curve_tokens else {})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=80_000, help="label tokens per arm")
    ap.add_argument("--arms", default=",".join([*PER_TOKEN_ARMS, SEED_ARM]), help="comma-separated arm names")
    ap.add_argument("--arm", action="append", default=[], metavar="NAME=OVERRIDES",
                    help="an extra arm: name=space-separated key=value overrides of the EAGLE recipe (repeatable)")
    ap.add_argument("--subset-tokens", type=int, default=0,
                    help="label tokens of the training subset (one epoch; 0 = --tokens): less = arms run several epochs")
    ap.add_argument("--arms-dir", default="arms", help="folder under --out for the arm runs (keep one per --tokens)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", default="default")
    ap.add_argument("--limit", type=int, default=800, help="ShareGPT conversations prepared (data.limit) to draw from")
    ap.add_argument("--mixed-precision", default="", help="override train.mixed_precision ('' = the recipe's)")
    ap.add_argument("--out", default="checkpoints/ablate", help="feature caches, arm runs and results")
    ap.add_argument("--json", default="benchmarks/results/ablate.json")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="retrain arms whose result exists")
    ap.add_argument("--minutes", type=float, default=0.0,
                    help="equal wall-clock instead of equal tokens: train each arm this many minutes (constant lr "
                         "after warm-up, train.min_lr_ratio=1.0, so the stop time does not shape the schedule); "
                         "default arms: " + ",".join(CHEAP_ARMS))
    ap.add_argument("--tau-questions", type=int, default=0,
                    help="also decode each trained arm on the first turns of this many Spec-Bench questions (chain of 4)")
    ap.add_argument("--tau-tokens", type=int, default=48)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    if args.minutes > 0 and not any(a == "--arms" or a.startswith("--arms=") for a in argv):
        args.arms = ",".join(CHEAP_ARMS)
    if args.threads:
        torch.set_num_threads(args.threads)
    arms = {k: list(v) for k, v in ARMS.items()}
    for spec in args.arm:
        name, _, ov = spec.partition("=")
        arms[name.strip()] = shlex.split(ov)
    names = [a.strip() for a in args.arms.split(",") if a.strip()] + [s.partition("=")[0].strip() for s in args.arm]
    names = list(dict.fromkeys(names))
    seeds = {n: args.seed for n in arms}
    for n in names:  # <arm>_seed<N>: that arm again with seed N (its own init and data order)
        m = re.fullmatch(r"(.+)_seed(\d+)", n)
        if m and m.group(1) in arms and n not in arms:
            arms[n], seeds[n] = arms[m.group(1)], int(m.group(2))
    unknown = [n for n in names if n not in arms]
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; known: {', '.join(arms)}")
    from specdistill import fsutil
    from specdistill.train.logging import stdout_to_stderr

    out = Path(args.out)
    with stdout_to_stderr():
        setup = prepare(out, args.subset_tokens or args.tokens, args.target, args.limit)
        print(f"[ablate] data {setup.info}", file=sys.stderr, flush=True)
        results = {}
        for name in names:
            rpath = out / args.arms_dir / name / "result.json"
            budget = {"minutes_requested": args.minutes} if args.minutes > 0 else {"tokens_requested": args.tokens}
            budget["tau_questions"] = args.tau_questions
            if rpath.exists() and not args.force:
                r = json.loads(rpath.read_text())
                if all(r.get(k, 0) == v for k, v in budget.items()):
                    results[name] = r
                    print(f"[ablate] {name}: reused {rpath}", file=sys.stderr, flush=True)
                    continue
            seed = seeds[name]
            t0 = time.perf_counter()
            ov = arms[name] + (["train.min_lr_ratio=1.0"] if args.minutes > 0 else [])
            keep: dict = {}
            r = train_arm(setup, ov, args.tokens, seed, out / args.arms_dir / name / "run", args.mixed_precision,
                          keep=keep, minutes=args.minutes)
            r.update(budget, wall_s=round(time.perf_counter() - t0, 1))
            if args.tau_questions:
                r["decode"] = decode_tau(keep["drafter"], setup.target, args.tau_questions, args.tau_tokens)
            fsutil.atomic_write_text(rpath, json.dumps(r, indent=1))
            results[name] = r
            print(f"[ablate] {name}: agreement {r['agreement']} tok/s {r['label_tokens_per_s']}", file=sys.stderr,
                  flush=True)
    base = results.get("baseline")
    noise = None
    reps = [r["agreement"] for n, r in results.items() if n == "baseline" or re.fullmatch(r"baseline_seed\d+", n)]
    if len(reps) > 1:  # the baseline under other seeds: spread and sample std per TTT step
        cols = list(zip(*reps))
        noise = {"runs": len(reps), "range": [round(max(c) - min(c), 4) for c in cols],
                 "std": [round(statistics.stdev(c), 4) for c in cols]}
    for r in results.values():
        if base and r is not base:
            r["delta_vs_baseline"] = [round(a - b, 4) for a, b in zip(r["agreement"], base["agreement"])]
            r["tok_s_ratio_vs_baseline"] = round(r["label_tokens_per_s"] / base["label_tokens_per_s"], 3)
    # Binomial standard error of an agreement p over n tokens (independent-token approximation).
    se = [round(math.sqrt(p * (1 - p) / max(n, 1)), 4) for p, n in zip(base["agreement"], base["tokens"])] if base else None
    result = {"command": shlex.join(["python", "benchmarks/ablate.py", *argv]), "target": setup.target.name,
              **({"minutes_per_arm": args.minutes} if args.minutes > 0 else {"tokens_per_arm": args.tokens}),
              "data": setup.info, "torch_threads": torch.get_num_threads(),
              "noise_baseline_seeds": noise, "baseline_binomial_se": se, "arms": results}
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
