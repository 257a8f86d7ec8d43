"""EAGLE-3, Medusa-1, Medusa-2, Hydra and CTC trained for the same wall-clock budget, scored alike; prints JSON.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/family_quality.py --minutes 4 --per-category 1 \\
        --max-new-tokens 40 --threads 1            # -> benchmarks/results/family_quality_4min.json
    python benchmarks/family_quality.py --minutes 4 --families medusa1,hydra --reuse   # resume / a subset

Every family runs its recipe in this process (benchmarks/eagle_quality.py's `train`, with
recipes/{eagle,medusa,ctc}.py) on the same data with the same overrides: train.max_minutes=M (the
training loop's own clock; target loading and data preparation are not counted), train.max_steps=1000000,
train.min_lr_ratio=1.0 (constant lr after warm-up), train.warmup_steps=5 (the YAMLs' 50 would not end
within a few minutes), train.eval_every=0 + train.eval_batches=4 (one final validation pass: it measures
the Medusa heads' top-r accuracies, the sparse tree's input), eval.limit_per_category=-1 (train + export
only); everything else is each family's YAML (eagle3 = recipe eagle as shipped; medusa2 = drafter.variant=
medusa2 train.lr=3e-4 drafter.ramp_steps=--ramp-steps, as benchmarks/medusa_quality.py; hydra =
drafter.variant=hydra).

Each native export is then scored by `specdistill eval` (eagle_quality's `score`: greedy, the first
--per-category questions of every Spec-Bench category, all turns, each question also decoded plainly in
the same eval = the speed-up's baseline) in two draft shapes of the same size for every family:
  chain : --depth draft tokens (EAGLE: its chain; Medusa/Hydra/CTC: `--tree 1,...,1`, i.e. head k's /
          the best candidate's top-1 at depth k)
  tree  : `--tree` widths (default 2,2,1,1: depth 4, 14 nodes): EAGLE's dynamic tree, the Medusa static
          sparse tree of that budget/depth/max-child built from the held-out accuracies, CTC candidates
          (product of the widths) merged into a trie
Reported per family and shape: tau overall and per category, alpha per draft position (= per head for
Medusa's chain), draft ms per target pass and as a fraction of a plain target step (1000 / baseline tokens
per s of that eval), speed-up, identical-to-greedy; per Medusa variant the heads' cost on one token vs a
cached one-token target step (medusa_quality's `draft_cost`; goal <= 0.05), held-out top-1 per head; for
medusa2 the target's drift (medusa_quality's `drift`). `comparison` sets the measured tau ratios
hydra/medusa1, ctc/medusa1, eagle3/medusa1 against the published figures (Vicuna-7B: Medusa-1 ~2.6,
CTC ~3.5, Hydra ~1.3x Medusa, EAGLE ~3.9).

Time on 2 busy CPU cores at the first command: 5 x (M + ~1.5) min of training and setup + 10 evals of
~1.5-5 min each (13 questions, 40 new tokens; each also decodes the baseline): ~1 h at M = 4.
--reuse skips a family whose <out>/<family>/export/native exists and reads back an eval run with the
same arguments (a crashed run resumes). stdout holds only the JSON, also written (atomically) to
<out>/family_quality.json and benchmarks/results/family_quality_<M>min.json (--results '' = not).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench(name: str):
    """benchmarks/<name>.py as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


EQ, MQ = _bench("eagle_quality"), _bench("medusa_quality")
FAMILIES = {  # name -> (recipe script, recipe, overrides of its YAML)
    "eagle3": ("eagle.py", "eagle", EQ.VARIANTS["eagle3"][1]),
    "medusa1": ("medusa.py", "medusa", MQ.VARIANTS["medusa1"]),
    "medusa2": ("medusa.py", "medusa", MQ.VARIANTS["medusa2"]),
    "hydra": ("medusa.py", "medusa", MQ.VARIANTS["hydra"]),
    "ctc": ("ctc.py", "ctc", []),
}
MEDUSA = ("medusa1", "medusa2", "hydra")
# Vicuna-7B, greedy (FAMILIES.md A/B/E and the papers): tokens per verify step.
PUBLISHED = {"medusa1_tau": 2.6, "ctc_tau": 3.5, "hydra_over_medusa1": 1.3, "eagle_tau": 3.9}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, required=True, help="training wall-clock budget per family")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--target", default="default", help="target.name (default: the embedded SmolLM2-135M)")
    ap.add_argument("--data", default="default", help="data.source of every training run")
    ap.add_argument("--questions", default="spec_bench")
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--depth", type=int, default=4, help="chain length (= the Medusa heads; <= drafter.num_heads)")
    ap.add_argument("--tree", default="2,2,1,1", help="tree widths per depth for every family ('' = chain only)")
    ap.add_argument("--ramp-steps", type=int, default=10, help="medusa2 drafter.ramp_steps (loss calls)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="checkpoints/family_quality")
    ap.add_argument("--results", default="benchmarks/results", help="also write family_quality_<M>min.json here")
    ap.add_argument("--reuse", action="store_true", help="keep finished trainings and identical evals")
    ap.add_argument("--extra", action="append", default=[], metavar="[FAMILY:]KEY=VALUE",
                    help="recipe override for every family (or one, with a family: prefix); repeatable")
    args = ap.parse_args(argv)
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    bad = [f for f in args.families if f not in FAMILIES]
    if bad or not args.families:
        ap.error(f"--families: unknown {bad}; choose from {list(FAMILIES)}")
    if args.minutes <= 0 or args.depth < 1:
        ap.error("--minutes must be > 0 and --depth >= 1")
    return args


def _ratio(a, b):
    return None if a is None or not b else round(a / b, 3)


def comparison(results: dict, modes: list[str]) -> dict:
    """Measured tau ratios against Medusa-1 next to the published ones, and the measured ordering."""
    pub = {"hydra_over_medusa1": PUBLISHED["hydra_over_medusa1"],
           "ctc_over_medusa1": round(PUBLISHED["ctc_tau"] / PUBLISHED["medusa1_tau"], 3),
           "eagle3_over_medusa1": round(PUBLISHED["eagle_tau"] / PUBLISHED["medusa1_tau"], 3)}
    out: dict = {"published": {**PUBLISHED, **pub, "order": ["eagle3", "ctc", "hydra", "medusa1"],
                               "source": "Vicuna-7B greedy, the papers / FAMILIES.md"}}
    for mode in modes:
        tau = {n: r.get(mode, {}).get("tau") for n, r in results.items()}
        ratios = {f"{n}_over_medusa1": _ratio(tau.get(n), tau.get("medusa1")) for n in ("hydra", "ctc", "eagle3")}
        out[mode] = {
            "tau": tau,
            "ratios": ratios,
            # true = the measured ratio reaches the published one (the published ordering holds that far)
            "reaches_published_ratio": {k: None if v is None else v >= pub[k] for k, v in ratios.items()},
            "order": sorted((n for n, t in tau.items() if t is not None), key=lambda n: -tau[n]),
        }
    return out


def _scored(fig: dict) -> dict:
    """eagle_quality's figures + the draft cost as a fraction of one plain target step of the same eval."""
    base, ms = fig.get("baseline_tokens_per_s"), fig.get("draft_ms_per_target_pass")
    fig["draft_cost_fraction_of_target_step"] = round(ms * base / 1000.0, 4) if base and ms is not None else None
    return fig


def medusa_extras(name: str, export: Path, overrides: list[str], args) -> dict:
    """The heads' measured cost vs a target step, held-out accuracies, the tree, medusa2's drift."""
    from specdistill import loading, targets

    target = targets.load(args.target)
    drafter = loading.load_drafter(export, target)  # medusa2: the adapters go back on the target
    rec = {"held_out_top1_per_head": [round(row[0], 4) for row in (drafter.head_accuracy() or [])],
           "static_tree_paths": [list(p) for p in drafter.sparse_tree()], "draft_vocab_size": drafter.draft_vocab_size}
    cost = MQ.draft_cost(drafter, target)
    cost["meets_goal"] = cost["measured_fraction"] <= cost["goal_fraction"]
    rec["heads_cost"] = cost
    if name == "medusa2":
        rec["drift_next_token_agreement"] = MQ.drift(overrides, target)
    return rec


def run(args, argv: list[str]) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    modes = ["chain"] + (["tree"] if args.tree else [])
    common = [f"target.name={args.target}", f"data.source={args.data}", f"train.max_minutes={args.minutes}",
              "train.max_steps=1000000", "train.min_lr_ratio=1.0", "train.warmup_steps=5", "train.eval_every=0",
              "train.eval_batches=4", "train.progress=false", "eval.limit_per_category=-1"]
    chain_tree = ",".join(["1"] * args.depth)
    results: dict[str, dict] = {}
    for name in args.families:
        script, recipe, own = FAMILIES[name]
        ov = common + own + (["drafter.ramp_steps=" + str(args.ramp_steps)] if name == "medusa2" else [])
        ov += [f"train.output_dir={out / name}", f"train.run_name=bench-{name}"] + EQ.extras_for(name, args.extra)
        t = EQ.train(name, recipe, ov, out / name, args.reuse, script=script)
        if name in MEDUSA:
            t["medusa_state"] = MQ.training_state(out / name)
        rec: dict = {"training": t}
        if name in MEDUSA:
            rec.update(medusa_extras(name, Path(t["export"]), ov, args))
        for mode in modes:
            native_chain = mode == "chain" and name == "eagle3"  # EAGLE's own chain; the others: --tree 1,...,1
            shape = {"chain_k": args.depth, **({"tree": chain_tree} if mode == "chain" and not native_chain else {})}
            sargs = SimpleNamespace(**{**vars(args), **shape})
            rec[mode] = _scored(EQ.score(t["export"], sargs, out / name / f"eval_{mode}", not native_chain))
        results[name] = rec
        print(f"[bench] {name}: " + json.dumps({m: rec[m]["tau"] for m in modes}), file=sys.stderr)

    doc = {
        "benchmark": "family_quality",
        "command": shlex.join(["python", "benchmarks/family_quality.py", *argv]),
        "settings": {
            "minutes": args.minutes, "families": args.families, "target": args.target, "data": args.data,
            "questions": args.questions, "per_category": args.per_category, "max_new_tokens": args.max_new_tokens,
            "temperature": 0.0, "depth": args.depth, "chain_tree_arg": chain_tree, "tree": args.tree or None,
            "common_overrides": common, "extra": args.extra, "reuse": args.reuse,
            **EQ.run_environment(out),
        },
        "results": results,
        "comparison": comparison(results, modes),
        "all_identical_to_greedy": all(r[m]["identical_to_greedy"] is True for r in results.values() for m in modes),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    from specdistill import fsutil

    text = json.dumps(doc, indent=1)
    fsutil.atomic_write_text(out / "family_quality.json", text)
    if args.results:
        dest = Path(args.results) / f"family_quality_{args.minutes:g}min.json"
        dest.parent.mkdir(parents=True, exist_ok=True)
        fsutil.atomic_write_text(dest, text)
        print(f"[bench] wrote {dest}", file=sys.stderr)
    return doc


def main(argv=None) -> dict:
    return EQ.json_main(parse_args, run, argv)


if __name__ == "__main__":
    main()
