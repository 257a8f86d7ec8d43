"""What drafting a k-token EAGLE chain costs against a target step, on the embedded target; prints JSON.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/drafting_cost.py --threads 1 \
        > benchmarks/results/drafting_cost.json
    # before/after: also time an earlier EagleProposer, interleaved in the same process
    git show 66269c2:specdistill/drafters/eagle_proposer.py > /tmp/old_eagle_proposer.py
    python benchmarks/drafting_cost.py --threads 1 --baseline-module /tmp/old_eagle_proposer.py

Drafter: the shipped reference EAGLE-3 drafter (reference/eagle3-smollm2-135m). Context: a Spec-Bench
prompt prefilled through the target. Timed, interleaved round by round (medians over `--reps`):
  chain      propose() of a k-token chain with nothing new to commit (drafting alone)
  step       propose() after 2 newly accepted positions (commit of their target features + the chain),
             what one speculative pass pays for drafting
  target     one cached target pass over 1 token (a plain step) and over k+1 tokens (the verification)
Fractions are step / plain target step. Draft tokens of the baseline module are checked to be identical.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_module(path: str):
    spec = importlib.util.spec_from_file_location("baseline_eagle_proposer", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtypes", default="auto,float32")
    ap.add_argument("--baseline-module", default="", help="a file defining an earlier EagleProposer to time alongside")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import DynamicCache

    from specdistill import targets
    from specdistill.data.questions import load_questions
    from specdistill.drafters.eagle_proposer import EagleProposer
    from specdistill.loading import load_drafter
    from specdistill.train.logging import stdout_to_stderr
    from specdistill.verify.evaluate import encode_chat
    from specdistill.verify.proposer import ProposerState

    t_start = time.time()
    with stdout_to_stderr():
        target = targets.load("default")
        drafter = load_drafter(ROOT / "reference" / "eagle3-smollm2-135m", target)
        q = load_questions(None, 1).questions[0]
    ids = torch.tensor(encode_chat(target.tokenizer, [{"role": "user", "content": q.turns[0]}]))
    P = ids.numel()
    layers = tuple(drafter.layer_ids)
    with torch.inference_mode():
        full = target.forward(ids[None], layers=layers)
    hid = {i: full.hidden_states[i][0] for i in layers}  # (P, H) per layer
    base = _load_module(args.baseline_module).EagleProposer if args.baseline_module else None

    def time_propose(prop, new: int) -> tuple[float, list]:
        """Commit up to P-1-new untimed, then time propose() over `new` fresh positions + the chain."""
        prop.reset()
        upto = P - 1 - new
        prop.propose(ProposerState(ids[:upto + 1], {i: h[:upto] for i, h in hid.items()}))
        st = ProposerState(ids, {i: h[upto:P - 1] for i, h in hid.items()} if new else {})
        t0 = time.perf_counter()
        tree = prop.propose(st)
        return time.perf_counter() - t0, tree.tokens.tolist()

    impls = {}
    for dt in args.dtypes.split(","):
        impls[f"new/{dt}"] = EagleProposer(drafter, mode="chain", k=args.k, dtype=dt)
        if base is not None:
            impls[f"baseline/{dt}"] = base(drafter, mode="chain", k=args.k, dtype=dt)
    times: dict[str, list[float]] = {f"{n}/{w}": [] for n in impls for w in ("chain", "step")}
    times.update({"target/plain_step": [], "target/verify_k+1": []})
    tokens: dict[str, list] = {}
    model = target.model

    def target_pass(n: int) -> float:
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            model.model(input_ids=ids[None, :P - n], cache=cache, use_cache=True)
            t0 = time.perf_counter()
            h = model.model(input_ids=ids[None, P - n:], cache=cache, use_cache=True).last_hidden_state
            model.lm_head(h[0])
            return time.perf_counter() - t0

    for r in range(args.reps + 2):  # two warm-up rounds
        for name, prop in impls.items():
            for what, new in (("chain", 0), ("step", 2)):
                dt, toks = time_propose(prop, new)
                if r >= 2:
                    times[f"{name}/{what}"].append(dt)
                tokens.setdefault(f"{name}/{what}", toks)
        a, b = target_pass(1), target_pass(args.k + 1)
        if r >= 2:
            times["target/plain_step"].append(a)
            times["target/verify_k+1"].append(b)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    plain = med["target/plain_step"]
    out = {
        "benchmark": "drafting_cost",
        "command": "python " + shlex.join(["benchmarks/drafting_cost.py", *sys.argv[1:]]),
        "drafter": "reference/eagle3-smollm2-135m", "k": args.k, "context_tokens": P, "reps": args.reps,
        "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
        "bf16_cpu": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "median_ms": med, "min_ms": {k: min(v) * 1e3 for k, v in times.items()},
        "fraction_of_plain_step": {k: v / plain for k, v in med.items() if not k.startswith("target/")},
        "draft_tokens_identical_to_baseline": ({k: tokens[k] == tokens[k.replace("new/", "baseline/")]
                                                for k in tokens if k.startswith("new/")} if base else None),
        "goal_ms": 5.0,
        "seconds": time.time() - t_start,
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
