"""OSD simulation: query logs of one Spec-Bench category stream in rounds; retrain + gate each round; prints JSON.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/osd_simulation.py --out /tmp/osd --threads 1 \\
        > benchmarks/results/osd_simulation.json

The drafter in service starts as the shipped reference EAGLE-3 drafter (reference/eagle3-smollm2-135m,
copied; `serving` is a symlink to the copy so promotions swap it). Each round appends --per-round
prompts of the streamed category (--category, after the first --eval-questions, which are the fixed
evaluation set and never logged) to <out>/logs/q.jsonl as {"prompt": ...}, runs one
`specdistill retrain` round (specdistill/online/retrain.py: ingest, target-regenerated answers,
warm-started training for --steps, gate on held-out log prompts) and then scores the drafter in
service, greedy, tau only (no baseline decode), on the fixed evaluation questions of the streamed
category and on the first question of each --others category. Round 0 is the reference drafter.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/osd_simulation")
    ap.add_argument("--category", default="math_reasoning")
    ap.add_argument("--others", default="writing,coding,translation,qa")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-round", type=int, default=12)
    ap.add_argument("--eval-questions", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=48, help="gate and round evaluation")
    ap.add_argument("--regen-tokens", type=int, default=96, help="new tokens per regenerated answer")
    ap.add_argument("--drafter", default=str(ROOT / "reference" / "eagle3-smollm2-135m"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--extra", action="append", default=[], help="key=value for every retrain round")
    args = ap.parse_args()

    import torch

    from specdistill import scoring, targets
    from specdistill.data.questions import load_questions
    from specdistill.fsutil import fresh_owned_dir
    from specdistill.online import retrain
    from specdistill.train.logging import stdout_to_stderr

    torch.set_num_threads(args.threads)
    out = fresh_owned_dir(args.out, ".specdistill_osd_simulation")  # an earlier simulation's dir, or a new one
    (out / "logs").mkdir(parents=True)
    v0 = out / "drafter_v0"
    shutil.copytree(args.drafter, v0)
    serving = out / "serving"
    serving.symlink_to(v0.name)
    qs = load_questions().questions
    stream = [q for q in qs if q.category == args.category]
    others = args.others.split(",")
    eval_stream = stream[:args.eval_questions]
    feed = stream[args.eval_questions:]
    need = args.rounds * args.per_round
    if len(feed) < need:
        raise SystemExit(f"{args.category}: {len(feed)} questions to stream, {need} needed")
    eval_files = {}
    for name, items in (("streamed", eval_stream),
                        ("others", [next(q for q in qs if q.category == c) for c in others])):
        p = out / f"eval_{name}.jsonl"
        p.write_text("".join(json.dumps({"question_id": q.question_id, "category": q.category, "turns": q.turns})
                             + "\n" for q in items))
        eval_files[name] = p
    overrides = [f"online.logs={out / 'logs'}", f"online.serving={serving}", f"train.max_steps={args.steps}",
                 "train.max_minutes=10", "train.lr=2e-4", f"eval.max_new_tokens={args.max_new_tokens}",
                 f"online.max_new_tokens={args.regen_tokens}", "online.min_new_records=6",
                 "online.holdout_fraction=0.25", "online.holdout_min=3", "online.holdout_size=4",
                 f"train.threads={args.threads}", *args.extra]

    with stdout_to_stderr():
        target = targets.load("default")

        def taus(tag: str) -> dict:
            res = {}
            for name, p in eval_files.items():
                r = scoring.score(target, str(serving.resolve()), out / "evals" / f"{tag}_{name}", questions=str(p),
                                  max_new_tokens=args.max_new_tokens, num_draft_tokens=4, baseline=False,
                                  progress=False, quiet=True)
                res[name] = round(r["overall"]["tau"], 4)
            return res

        t0 = time.time()
        rounds = [{"round": 0, "serving": "reference", "tau": taus("round0"), "seconds": round(time.time() - t0, 1)}]
        last = rounds[0]["tau"]
        for k in range(1, args.rounds + 1):
            t1 = time.time()
            batch = feed[(k - 1) * args.per_round:k * args.per_round]
            with open(out / "logs" / "q.jsonl", "a") as f:
                for q in batch:
                    f.write(json.dumps({"prompt": q.turns[0], "id": q.question_id}) + "\n")
            cfg, ocfg = retrain.load(overrides)
            rep = retrain.run(cfg, ocfg)
            t2 = time.time()
            now = taus(f"round{k}") if rep["decision"] == "promoted" else last
            last = now
            rounds.append({"round": k, "logged": len(batch), "decision": rep["decision"], "reason": rep.get("reason"),
                           "gate": rep.get("scores"), "train_steps": (rep.get("train") or {}).get("steps"),
                           "buffer": rep.get("buffer"), "retrain_seconds": round(t2 - t1, 1),
                           "serving": Path(rep["serving_after"]).name, "tau": now,
                           "seconds": round(time.time() - t1, 1)})
            print(json.dumps(rounds[-1], default=str), file=sys.stderr, flush=True)
    result = {
        "benchmark": "osd_simulation", "command": shlex.join([sys.executable, *sys.argv]),
        "target": "SmolLM2-135M-Instruct (embedded)", "initial_drafter": args.drafter, "category": args.category,
        "others": others, "eval_questions_streamed": len(eval_stream), "steps_per_round": args.steps,
        "threads": args.threads, "rounds": rounds,
        "promotions": sum(r.get("decision") == "promoted" for r in rounds),
        "rejections": sum(r.get("decision") == "rejected" for r in rounds),
        "tau_change_streamed": round(rounds[-1]["tau"]["streamed"] - rounds[0]["tau"]["streamed"], 4),
        "tau_change_others": round(rounds[-1]["tau"]["others"] - rounds[0]["tau"]["others"], 4),
        "published_anchor": "OSD (arXiv 2310.07177): acceptance +0.1 to +0.65 (alpha, not tau)",
        "wall_seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
