"""EAGLE-3 learning curve on the embedded target: agreement with the target against label tokens seen,
ShareGPT vs the target's own regenerated text at the same budget, fitted and extrapolated; prints JSON.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/learning_curve.py --threads 1 \\
        --json benchmarks/results/learning_curve.json
    python benchmarks/learning_curve.py --tokens 40000 --arms sharegpt --tau-questions 13

Both arms use benchmarks/ablate.py's setup, so their numbers are comparable with the ablation's: the
EAGLE-3 recipe (recipes/configs/eagle.yaml with train.min_lr_ratio=1.0, i.e. constant lr after warm-up, so
each checkpoint is a point of one long run; offline features, the recipe's mixed precision, seed 0), the
recipe's draft vocabulary (8,192 words in results/learning_curve.json; 4,096 since ablate_cheap_6min.json),
and the same validation text: the committed self-distillation corpus
(the target's greedy answers; its conversations are never trained on). The metric is teacher-forced
top-1 agreement with the target per training-time-test step (0 = alpha_1's teacher-forced twin),
measured after the optimizer step whose cumulative label tokens first reach each log-spaced checkpoint.

Arms (same --tokens label-token budget, same checkpoints):
  sharegpt     ShareGPT training conversations (human answers), ablate.prepare's subset;
  regenerated  the target's own greedy answers (--regenerated, a `data regenerate` output such as the
               grown corpus), minus the validation conversations; repeated over epochs when it holds
               fewer label tokens than --tokens (the JSON says how many epochs).
With --tau-questions N the final drafter of each arm is also decoded on the first turns of the first N
Spec-Bench questions (greedy, chain of 4, --tau-tokens new tokens): decode tau and alpha per position.

Fit: agreement_j(T) = a_j + b_j ln T by least squares over the checkpoints at or above --fit-from tokens;
tokens_for[goal] = exp((goal - a_0) / b_0) for alpha_1 goals 0.5 and 0.6 (null when b_0 <= 0), and its
cost in CPU-hours at the arm's measured label tokens/s (one thread). A log-linear fit bends nowhere, so
it is optimistic far out; `next_factor` states what 10x the budget would buy on the fit. An arm whose
result exists in <out>/curve/<arm>/result.json with the same settings is not retrained.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablate  # noqa: E402  (benchmarks/ablate.py: prepare, train_arm, measure)

GOALS = (0.5, 0.6)


def checkpoints(tokens: int, first: int) -> list[int]:
    """Log-spaced label-token counts first, 2*first, 4*first, ... below `tokens`, then `tokens`."""
    out, t = [], max(1, first)
    while t < tokens:
        out.append(t)
        t *= 2
    return out + [tokens]


def fit(curve: list[dict], fit_from: int, label_tok_s: float | None) -> dict:
    """Least-squares agreement_j = a_j + b_j ln T per TTT step over the points with T >= fit_from; the
    tokens (and CPU-hours at label_tok_s) where step 0 reaches each of GOALS."""
    pts = [p for p in curve if p["label_tokens"] >= fit_from]
    if len(pts) < 2:
        return {"points": len(pts), "error": "fewer than 2 checkpoints to fit"}
    xs = [math.log(p["label_tokens"]) for p in pts]
    steps = len(pts[0]["agreement"])
    coef = []
    for j in range(steps):
        ys = [p["agreement"][j] for p in pts]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
        coef.append({"a": my - b * mx, "b": b, "per_doubling": b * math.log(2)})
    a0, b0 = coef[0]["a"], coef[0]["b"]
    goals = {}
    for g in GOALS:
        t = math.exp((g - a0) / b0) if b0 > 0 and (g - a0) / b0 < 700 else None
        goals[str(g)] = {"label_tokens": None if t is None else float(f"{t:.3g}"),
                         "cpu_hours_one_thread": None if t is None or not label_tok_s
                         else round(t / label_tok_s / 3600, 1)}
    last = pts[-1]["label_tokens"]
    nxt = [round(c["a"] + c["b"] * math.log(10 * last), 4) for c in coef]
    return {"points": len(pts), "from_tokens": fit_from,
            "coefficients": [{k: round(v, 5) for k, v in c.items()} for c in coef],
            "alpha1_goal_tokens": goals,
            "next_factor": {"tokens": 10 * last, "agreement_predicted": nxt,
                            "agreement_now": pts[-1]["agreement"]}}


def prepare_regenerated(out: Path, setup, path: str, tokens: int):
    """A training cache of the regenerated conversations (minus the validation ids) beside setup's, as many
    as one epoch of `tokens` label tokens needs."""
    from specdistill.config import DataConfig
    from specdistill.data import build, features, regenerate

    val_ids = {json.loads(ln)["id"] for ln in (out / "selfdistill_val.jsonl").read_text().splitlines() if ln.strip()}
    recs = [r for r in regenerate.read_records(path) if str(r["id"]) not in val_ids]
    if not recs:
        raise SystemExit(f"learning_curve: {path} holds no conversation outside the validation set")
    src = out / "regenerated_train.jsonl"
    from specdistill import fsutil

    fsutil.atomic_write_text(src, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    tr, va, _ = build(DataConfig(source=str(src), val_fraction=0.0), setup.target.tokenizer, verbose=False)
    samples, _ = ablate.covering((ds[i] for ds in (tr, va) for i in range(len(ds))), tokens)
    cache = out / "features_regenerated"
    features.build_cache(setup.target, {"train": samples}, setup.layers, cache, batch_size=4)
    labels = [ablate._label_tokens(s) for s in samples]
    info = {"conversations_available": len(recs), "samples": len(samples), "label_tokens_epoch": sum(labels),
            "path": str(path)}
    return features.open_cache(cache, "train"), labels, info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=44_000, help="label-token budget of every arm")
    ap.add_argument("--subset-tokens", type=int, default=40_000,
                    help="ablate.prepare's --tokens: the ShareGPT subset and feature cache it built (one epoch of "
                         "it must cover --tokens)")
    ap.add_argument("--first", type=int, default=2_750, help="first checkpoint (then doubling)")
    ap.add_argument("--fit-from", type=int, default=5_000, help="checkpoints below this are left out of the fit")
    ap.add_argument("--arms", default="sharegpt,regenerated")
    ap.add_argument("--regenerated", default="", help="regenerated corpus (.jsonl[.gz]); default: the committed one")
    ap.add_argument("--tau-questions", type=int, default=13, help="0 = no decode")
    ap.add_argument("--tau-tokens", type=int, default=48)
    ap.add_argument("--target", default="default")
    ap.add_argument("--limit", type=int, default=800)
    ap.add_argument("--out", default="checkpoints/ablate", help="shared with benchmarks/ablate.py (its caches)")
    ap.add_argument("--json", default="benchmarks/results/learning_curve.json")
    ap.add_argument("--threads", type=int, default=0)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from specdistill import fsutil
    from specdistill.train.logging import stdout_to_stderr

    out = Path(args.out)
    cps = checkpoints(args.tokens, args.first)
    arms = [a for a in args.arms.split(",") if a]
    if any(a not in ("sharegpt", "regenerated") for a in arms):
        raise SystemExit("--arms: sharegpt and/or regenerated")
    regen = args.regenerated or str(sorted(ablate.SELFDISTILL.glob("*.jsonl.gz"))[0])
    results = {}
    with stdout_to_stderr():
        setup = ablate.prepare(out, args.subset_tokens, args.target, args.limit)
        for arm in arms:
            settings = {"tokens": args.tokens, "checkpoints": cps, "tau_questions": args.tau_questions,
                        "tau_tokens": args.tau_tokens, "regenerated": regen if arm == "regenerated" else None}
            rpath = out / "curve" / arm / "result.json"
            if rpath.exists() and json.loads(rpath.read_text()).get("settings") == settings:
                results[arm] = json.loads(rpath.read_text())
                print(f"[curve] {arm}: reused {rpath}", file=sys.stderr, flush=True)
                continue
            arm_setup, data_info = setup, dict(setup.info)
            if arm == "regenerated":
                train, labels, data_info = prepare_regenerated(out, setup, regen, args.tokens)
                arm_setup = ablate.Setup(setup.target, train, setup.val, setup.d2t, setup.t2d, setup.layers,
                                         setup.info, labels)
                data_info["epochs_at_budget"] = round(args.tokens / max(data_info["label_tokens_epoch"], 1), 2)
            t0 = time.perf_counter()
            keep: dict = {}
            # constant lr after warm-up: each checkpoint is a point of one long run, not the end of a short
            # run whose schedule decayed to its own max_steps
            r = ablate.train_arm(arm_setup, ["train.min_lr_ratio=1.0"], args.tokens, 0, out / "curve" / arm / "run",
                                 curve_tokens=cps, keep=keep)
            r.update(settings=settings, data=data_info, wall_s=round(time.perf_counter() - t0, 1),
                     fit=fit(r["curve"], args.fit_from, r["label_tokens_per_s"]))
            if args.tau_questions:
                try:
                    r["decode"] = ablate.decode_tau(keep["drafter"], setup.target, args.tau_questions, args.tau_tokens)
                except Exception as e:  # the curve is the result; a failed decode must not lose it
                    r["decode"] = {"error": f"{type(e).__name__}: {e}"}
            fsutil.atomic_write_text(rpath, json.dumps(r, indent=1))
            results[arm] = r
            print(f"[curve] {arm}: {[(p['label_tokens'], p['agreement'][0]) for p in r['curve']]}", file=sys.stderr,
                  flush=True)
    res = {"benchmark": "learning_curve", "command": shlex.join(["python", "benchmarks/learning_curve.py", *argv]),
           "target": setup.target.name, "torch_threads": torch.get_num_threads(), "validation": {
               k: setup.info[k] for k in ("val_conversations", "val_assistant_tokens") if k in setup.info},
           "arms": results,
           "anchor_reference_v1": {
               "label_tokens_seen": 810_000, "recipe": "ShareGPT 437k + 373k of a regenerated/ShareGPT mix "
               "(reference/eagle3-smollm2-135m/TRAINING.md)", "teacher_forced_agreement": [0.255, 0.221, 0.182],
               "on": "the target's greedy text for the demo's 13 prompts (issue 15), not this validation set: its "
                     "regenerated stage covered these validation conversations"}}
    ablate.emit(res, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
