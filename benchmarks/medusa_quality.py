"""Medusa-1 and Medusa-2 trained for the same wall-clock budget on the embedded target, scored on Spec-Bench; prints JSON.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/medusa_quality.py --minutes 4 --per-category 1 \\
        --max-new-tokens 40 --threads 1 > benchmarks/results/medusa_quality_4min.json

Each variant runs `recipes/medusa.py` in this process with train.max_minutes=M, train.max_steps=1000000,
train.min_lr_ratio=1.0 (constant lr after warm-up), eval.limit_per_category=-1 (train + export only);
its final validation pass measures the heads' top-r accuracies that build the static sparse tree.
Then the native export is scored (greedy, Spec-Bench first --per-category questions per category, all
turns, the plain decode of each as the baseline) twice: as the sparse tree (drafter.tree_budget nodes)
and as a chain (top-1 of each head). Reported per variant: tau per category, alpha per draft position
(= per head for the chain), per-head held-out top-1 accuracy, the heads' draft cost per step as a
fraction of a target decode step (measured: the K heads on one token vs a cached one-token target
step; and by multiply-accumulate count), speed-up, and for medusa2 the target's drift (next-token
argmax agreement of the adapted target with the original on held-out batches; 1.0 before training).
"""

from __future__ import annotations

import argparse
import json
import runpy
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "medusa1": [],
    # Medusa-2 in a few minutes: adapters at 3e-4 (heads x4 = 1.2e-3); the ramp spans the expected steps.
    "medusa2": ["drafter.variant=medusa2", "train.lr=3.0e-4"],
    "hydra": ["drafter.variant=hydra"],
}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, required=True)
    ap.add_argument("--variants", default="medusa1,medusa2")
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ramp-steps", type=int, default=10, help="medusa2 drafter.ramp_steps (loss calls)")
    ap.add_argument("--target", default="default", help="target.name")
    ap.add_argument("--data", default="default", help="data.source")
    ap.add_argument("--questions", default=None, help="question file (default: the shipped Spec-Bench)")
    ap.add_argument("--out", default="checkpoints/medusa_quality")
    ap.add_argument("--extra", action="append", default=[], help="recipe override for every variant")
    ap.add_argument("--cost-vocab", default="2048,4096,8192,0",
                    help="head vocabularies whose draft cost (untrained heads: cost does not depend on the weights) "
                         "is measured too; 0 = full")
    ap.add_argument("--cost-only", action="store_true", help="only the draft-cost sweep (no training)")
    ap.add_argument("--modes", default="tree,chain", help="draft shapes to score ('' = train and measure only)")
    ap.add_argument("--reuse", action="store_true", help="a variant whose <out>/<variant>/export/native exists is not "
                    "retrained; an eval.json already beside an export is read back instead of re-scored")
    return ap.parse_args(argv)


def training_state(run_dir: Path) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val/loss" in r]
    out = {"steps": max((r["step"] for r in rows), default=0),  # the final validation row carries the last step
           "last_logged_loss": round(train[-1]["loss"], 4) if train else None}
    if val:
        v = val[-1]
        out["val_top1_vs_data_labels"] = [
            round(v[f"val/correct_head{k}"] / v[f"val/tokens_head{k}"], 4)
            for k in range(1, 10) if f"val/correct_head{k}" in v and v.get(f"val/tokens_head{k}")]
    return out


@torch.no_grad()
def draft_cost(drafter, target, reps: int = 200, dtype: str = "float32") -> dict:
    """The K heads on one token vs one cached single-token target decode step (same threads)."""
    from transformers import DynamicCache

    x = torch.randn(1, target.hidden_size)
    prop = drafter.proposer(target, None, mode="chain", depth=drafter.cfg.num_heads, dtype=dtype)
    hid = {drafter.num_target_layers: x}
    from specdistill.verify.proposer import ProposerState

    state = ProposerState(torch.tensor([1, 2, 3]), hid)
    for _ in range(10):
        prop.propose(state)
    t0 = time.perf_counter()
    for _ in range(reps):
        prop.propose(state)
    heads_s = (time.perf_counter() - t0) / reps
    ids = torch.randint(0, target.vocab_size, (1, 256))
    cache = DynamicCache(config=target.model.config)
    target.model(input_ids=ids, past_key_values=cache, use_cache=True)
    steps = 30
    t0 = time.perf_counter()
    for i in range(steps):
        target.model(input_ids=ids[:, i:i + 1], past_key_values=cache, use_cache=True)
    target_s = (time.perf_counter() - t0) / steps
    h, v, vd = target.hidden_size, target.vocab_size, drafter.draft_vocab_size
    k, layers = drafter.cfg.num_heads, drafter.cfg.num_layers
    head_macs = k * (layers * h * h + vd * h)
    target_macs = sum(p.numel() for n, p in target.model.named_parameters() if "embed_tokens" not in n)
    if target.model.config.tie_word_embeddings:
        target_macs += v * h
    return {"heads_ms": round(1000 * heads_s, 3), "target_step_ms": round(1000 * target_s, 3),
            "measured_fraction": round(heads_s / target_s, 4),
            "macs_fraction": round(head_macs / target_macs, 4), "goal_fraction": 0.05}


def drift(overrides: list[str], target) -> dict:
    """Medusa-2's drift: next-token argmax agreement of the adapted `target` with the original (adapters
    disabled) on the first 16 held-out sequences of the run's data (1.0 before training)."""
    from specdistill import config, data
    from specdistill.data import make_collate
    from specdistill.drafters.medusa import target_drift

    cfg = config.load("medusa", overrides)
    _, val, _ = data.build(cfg.data, target.tokenizer)
    col = make_collate(target.tokenizer.pad_token_id)
    batches = [col([val[i] for i in range(j, min(j + 4, len(val)))]) for j in range(0, min(len(val), 16), 4)]
    return {"before": 1.0, "after": round(target_drift(target, batches), 4), "positions_batches": len(batches)}


def cost_sweep(args) -> dict:
    from specdistill import drafters, targets
    from specdistill.drafters.medusa import MedusaConfig
    from specdistill.train.logging import stdout_to_stderr

    with stdout_to_stderr():
        target = targets.load(args.target)
        out = {}
        for vd in [int(v) for v in args.cost_vocab.split(",") if v.strip()]:
            for k in (3, 4):
                d = drafters.build(MedusaConfig(draft_vocab_size=vd, num_heads=k), target).eval()
                d.vocab_map_ready.fill_(True)  # cost only: the first Vd ids stand in for a fitted map
                for dt in ("float32", "bfloat16"):
                    out[f"heads{k}_vocab{vd or target.vocab_size}_{dt}"] = draft_cost(d, target, dtype=dt)
        return out


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from specdistill.train.logging import stdout_to_stderr

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    results = {"command": "python benchmarks/medusa_quality.py " + shlex.join(sys.argv[1:] if argv is None else argv),
               "minutes": args.minutes, "variants": {}}
    recipe = runpy.run_path(str(ROOT / "recipes" / "medusa.py"), run_name="recipe")["main"]
    if args.cost_vocab:
        results["draft_cost_by_head_vocab"] = cost_sweep(args)
    for name in [v for v in args.variants.split(",") if v and not args.cost_only]:
        run_dir = out / name
        ov = [f"train.output_dir={run_dir}", f"target.name={args.target}", f"data.source={args.data}",
              "train.micro_batch_size=2", "train.warmup_steps=5", f"train.max_minutes={args.minutes}", "train.max_steps=1000000",
              "train.min_lr_ratio=1.0", "train.eval_every=0", "train.eval_batches=4", "train.save_every=1000000",
              "train.progress=false", "eval.limit_per_category=-1", *VARIANTS[name], *args.extra]
        if name == "medusa2":
            ov.append(f"drafter.ramp_steps={args.ramp_steps}")
        with stdout_to_stderr():
            t0 = time.perf_counter()
            reused = args.reuse and (run_dir / "export" / "native").is_dir()
            if not reused:
                recipe(ov)
            train_s = None if reused else time.perf_counter() - t0
            from specdistill import loading, scoring, targets
            from specdistill.export import native

            target = targets.load(args.target)
            drafter = loading.load_drafter(run_dir / "export" / "native", target)  # adapters go back on the target
            rec = {"overrides": ov, "reused": reused, "train_wall_s": train_s and round(train_s, 1), **training_state(run_dir),
                   "held_out_accuracy": [[round(a, 4) for a in row[:3]] for row in (drafter.head_accuracy() or [])],
                   "tree_paths": [list(p) for p in drafter.sparse_tree()], "draft_cost": draft_cost(drafter, target),
                   "draft_cost_bfloat16_heads": draft_cost(drafter, target, dtype="bfloat16")}
            if name == "medusa2":
                rec["drift_next_token_agreement"] = drift(ov, target)
            chain_dir = run_dir / "export" / "native_chain"
            modes = [m for m in args.modes.split(",") if m]
            if "chain" in modes and not (reused and chain_dir.is_dir()):
                drafter.cfg.draft_mode = "chain"
                native.write(drafter, target, chain_dir)
            for mode in modes:
                path = run_dir / "export" / ("native" if mode == "tree" else "native_chain")
                if reused and (path / "eval.json").is_file():
                    ev = json.loads((path / "eval.json").read_text())
                else:
                    ev = scoring.score(target, str(path), path, questions=args.questions,
                                       limit_per_category=args.per_category, max_new_tokens=args.max_new_tokens,
                                       num_draft_tokens=drafter.cfg.num_heads, progress=False, quiet=True)
                o = ev["overall"]
                rec[mode] = {"tau": round(o["tau"], 3), "speedup": round(o.get("speedup", 0.0), 3),
                             "alpha": [None if a is None else round(a, 3) for a in o.get("alpha", [])],
                             "identical_to_greedy": o.get("identical_to_greedy"),
                             "draft_ms_per_step": round(1000 * o["draft_time_s"] / max(o["target_passes"], 1), 2),
                             "tau_by_category": {c: round(v["tau"], 3) for c, v in ev["categories"].items()},
                             "lossless": o.get("lossless", True),
                             "eval_seconds": round(ev["settings"]["seconds"], 1)}
        results["variants"][name] = rec
        print(f"[bench] {name}: {json.dumps(rec)[:400]}", file=sys.stderr)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
