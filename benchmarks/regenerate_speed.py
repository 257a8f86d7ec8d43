"""`data regenerate` throughput on the embedded target: the HF-generate engine (the previous default,
batch 16) against the static engine (batch 64), same process, same ShareGPT conversations; prints JSON.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/regenerate_speed.py --threads 1 \
        > benchmarks/results/regenerate_speed.json

Each engine regenerates its own first `--conversations` conversations (the static engine needs more
rows in flight to show its batch; rates are generated tokens per process CPU second, the robust figure
on a shared machine with one thread, and per wall second of the call), then
both are run on a common set of `--check` conversations to confirm the greedy records are equal.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--hf-conversations", type=int, default=16)
    ap.add_argument("--static-batch", type=int, default=64)
    ap.add_argument("--static-conversations", type=int, default=128)
    ap.add_argument("--check", type=int, default=8, help="conversations both engines regenerate for the equality check")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from specdistill import targets
    from specdistill.data import regenerate as rg
    from specdistill.data.sources import iter_conversations
    from specdistill.data.stats import SkipCounter
    from specdistill.train.logging import stdout_to_stderr

    t_start = time.time()
    with stdout_to_stderr():
        target = targets.load("default")
    n_all = max(args.hf_conversations, args.static_conversations) + args.check
    convs = list(itertools.islice(iter_conversations("default", SkipCounter()), n_all))
    kw = {"max_new_tokens": args.max_new_tokens, "max_prompt_tokens": 512}
    out = {}
    with tempfile.TemporaryDirectory() as d:
        runs = {"hf": (args.hf_batch, args.hf_conversations), "static": (args.static_batch, args.static_conversations)}
        for eng, (bs, n) in runs.items():
            c0 = time.process_time()
            s = rg.regenerate(convs[:n], target, Path(d) / f"{eng}.jsonl", batch_size=bs, engine=eng, **kw)
            c = time.process_time() - c0
            out[eng] = {k: s[k] for k in ("engine", "written", "turns", "generated_tokens", "seconds",
                                          "tokens_per_second", "finish_length")} | {
                "batch_size": bs, "cpu_seconds": round(c, 2),
                "tokens_per_cpu_second": round(s["generated_tokens"] / c, 2)}
            print(f"{eng}: {json.dumps(out[eng])}", file=sys.stderr, flush=True)
        check = convs[n_all - args.check:]
        recs = {}
        for eng, bs in (("hf", args.hf_batch), ("static", args.static_batch)):
            p = Path(d) / f"check-{eng}.jsonl"
            rg.regenerate(check, target, p, batch_size=min(bs, args.check), engine=eng, **kw)
            recs[eng] = sorted((json.loads(x) for x in p.read_text().splitlines() if x.strip()), key=lambda r: r["id"])
    same = [a == b for a, b in zip(recs["hf"], recs["static"])]
    res = {
        "benchmark": "regenerate_speed",
        "command": "python " + shlex.join(["benchmarks/regenerate_speed.py", *sys.argv[1:]]),
        "target": target.name, "dtype": str(next(target.model.parameters()).dtype),
        "torch_threads": torch.get_num_threads(), "machine": platform.machine(), **kw,
        "before_hf_generate": out["hf"], "after_static": out["static"],
        "speedup_cpu": out["static"]["tokens_per_cpu_second"] / out["hf"]["tokens_per_cpu_second"],
        "speedup_wall": out["static"]["tokens_per_second"] / out["hf"]["tokens_per_second"],
        "greedy_records_equal": f"{sum(same)}/{len(same)}",
        "goal_tokens_per_second": 250, "goal_met_cpu": out["static"]["tokens_per_cpu_second"] >= 250,
        "seconds": time.time() - t_start,
    }
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
