"""CTC drafter trained for a wall-clock budget on the embedded target, scored on the Spec-Bench subset; prints JSON.

    nice -n 10 python benchmarks/ctc_quality.py --minutes 4 --threads 1 --per-category 1 --max-new-tokens 40
    python benchmarks/ctc_quality.py --minutes 10 --extra drafter.ctc_frames=8 --extra drafter.ctc_label_len=4

Runs `recipes/ctc.py` in this process with train.max_minutes=M (the training loop's own clock; target
loading and data preparation are not counted), train.max_steps=1000000, train.min_lr_ratio=1.0 (a
constant lr after warm-up, as benchmarks/eagle_quality.py) and eval.limit_per_category=-1 (train and
export only). Then `specdistill eval` scores the native export greedily on the first --per-category
questions of every Spec-Bench category, in two draft shapes:
  trie  : no --tree: the family's drafting, drafter.num_candidates CTC candidates merged into a trie,
          depth --depth
  chain : --tree 1,...,1 (--depth ones): the best CTC candidate only
Each eval also decodes every question plainly (interleaved): the speed-up's baseline. Reported per
shape: tau overall and per category, alpha per draft position, draft ms per target pass and as a
fraction of a plain target step (1000 / baseline tokens per s), speed-up, identical_to_greedy.
Reference (FAMILIES.md B, from the released code's answer files): Vicuna-7B MT-bench 3.50 tok/step, 2.86x.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import runpy
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _eagle_bench():
    """benchmarks/eagle_quality.py as a module: its `figures` and `training_state` are reused."""
    spec = importlib.util.spec_from_file_location("eagle_quality", ROOT / "benchmarks" / "eagle_quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, required=True, help="training wall-clock budget")
    ap.add_argument("--target", default="default")
    ap.add_argument("--data", default="default")
    ap.add_argument("--questions", default="spec_bench")
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--depth", type=int, default=4, help="draft depth (trie and chain)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="checkpoints/ctc_quality")
    ap.add_argument("--reuse", action="store_true", help="score an existing <out>/ctc/export/native, do not train")
    ap.add_argument("--extra", action="append", default=[], metavar="KEY=VALUE", help="recipe override; repeatable")
    args = ap.parse_args(argv)
    if args.minutes <= 0:
        ap.error("--minutes must be > 0")
    return args


def train(run_dir: Path, overrides: list[str], reuse: bool, eb) -> dict:
    native = run_dir / "export" / "native"
    if reuse and native.exists():
        return {"reused": True, "export": str(native), "overrides": overrides, **eb.training_state(run_dir)}
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SystemExit(f"{run_dir} is not empty: a time-budgeted run must start fresh (another --out, or --reuse)")
    main = runpy.run_path(str(ROOT / "recipes" / "ctc.py"), run_name="recipe")["main"]
    print(f"[bench] training ctc: recipes/ctc.py {shlex.join(overrides)}", file=sys.stderr)
    t0 = time.perf_counter()
    main(overrides)
    if not native.exists():
        raise RuntimeError(f"the recipe wrote no native export under {native}")
    return {"reused": False, "export": str(native), "overrides": overrides,
            "recipe_wall_s": round(time.perf_counter() - t0, 1), **eb.training_state(run_dir)}


def score(drafter: str, args, out_dir: Path, tree: str | None, eb) -> dict:
    from specdistill import scoring

    argv = ["--target", args.target, "--drafter", drafter, "--limit-per-category", str(args.per_category),
            "--max-new-tokens", str(args.max_new_tokens), "--num-draft-tokens", str(args.depth),
            "--temperature", "0", "--out", str(out_dir), "--no-progress"]
    if tree:
        argv += ["--tree", tree]
    if args.questions != "spec_bench":
        argv += ["--questions", args.questions]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    ap = argparse.ArgumentParser(prog="specdistill eval")
    scoring.add_arguments(ap)
    print(f"[bench] specdistill eval {shlex.join(argv)}", file=sys.stderr)
    raw = scoring.main(ap.parse_args(argv))
    res = eb.figures(raw)
    base = res.get("baseline_tokens_per_s")
    if base and res.get("draft_ms_per_target_pass") is not None:
        res["draft_cost_fraction_of_target_step"] = round(res["draft_ms_per_target_pass"] / (1000.0 / base), 3)
    res["eval_argv"] = argv
    return res


def run(args, argv) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    eb = _eagle_bench()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    common = [f"target.name={args.target}", f"data.source={args.data}", f"train.max_minutes={args.minutes}",
              "train.max_steps=1000000", "train.min_lr_ratio=1.0", "eval.limit_per_category=-1",
              f"train.output_dir={out / 'ctc'}", "train.run_name=bench-ctc"]
    trained = train(out / "ctc", common + list(args.extra), args.reuse, eb)
    shapes = {"trie": None, "chain": ",".join(["1"] * args.depth)}
    results = {name: score(trained["export"], args, out / "ctc" / f"eval_{name}", tree, eb)
               for name, tree in shapes.items()}

    doc = {
        "benchmark": "ctc_quality",
        "command": shlex.join(["python", "benchmarks/ctc_quality.py", *argv]),
        "settings": {
            "minutes": args.minutes, "target": args.target, "data": args.data, "questions": args.questions,
            "per_category": args.per_category, "max_new_tokens": args.max_new_tokens, "depth": args.depth,
            "temperature": 0.0, "extra": args.extra, "common_overrides": common,
            **eb.run_environment(out),
        },
        "training": trained,
        "results": results,
        "published_reference": {"source": "FAMILIES.md B (released code's answer files, Vicuna-7B MT-bench)",
                                "tokens_per_step": 3.50, "speedup": 2.86},
        "all_identical_to_greedy": all(r["identical_to_greedy"] is True for r in results.values()),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    (out / "ctc_quality.json").write_text(json.dumps(doc, indent=1))
    print(f"[bench] wrote {out / 'ctc_quality.json'}", file=sys.stderr)
    return doc


def main(argv=None) -> dict:
    return _eagle_bench().json_main(parse_args, run, argv)


if __name__ == "__main__":
    main()
