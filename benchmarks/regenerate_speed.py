"""`data regenerate` throughput on the embedded target, engine against engine in one process on the same
ShareGPT conversations; prints JSON.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/regenerate_speed.py --threads 1 --max-new-tokens 32 \
        --conversations 64 --batch 64 > benchmarks/results/regenerate_speed_prefix.json
    python benchmarks/regenerate_speed.py --engines hf,static --hf-batch 16   # the HF-generate engine too (slow)
    python benchmarks/regenerate_speed.py --engines static,static@bfloat16   # fp32 vs a bf16 copy of the target

Engines (--engines, in order; the first is the "before" of the speed-up): `hf` (rounds of padded HF
generate), `static_noreuse` (static engine, every turn's whole conversation prefilled again), `static`
(static engine with prefix reuse: a later turn extends the row's cached tokens). Each regenerates the
first --conversations conversations (the hf engine its own first --hf-conversations, at --hf-batch);
`<engine>@bfloat16` runs an engine on a bfloat16 copy of the target (`data regenerate --dtype bfloat16`);
rates are generated tokens per process CPU second (the robust figure on a shared machine with one
thread) and per wall second; the static engines also report how their time splits between prefill
and decode steps. Then every engine regenerates a common set of --check conversations and the greedy
records are compared with the first engine's.
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

ENGINES = {"hf": ("hf", False), "static_noreuse": ("static", False), "static": ("static", True)}


def split(name: str) -> tuple[str, str]:
    """'static@bfloat16' -> ('static', 'bfloat16'); no '@' = float32."""
    eng, _, dtype = name.partition("@")
    return eng, dtype or "float32"


def common_prefix_share(a: dict, b: dict) -> tuple[int, int]:
    """(characters of b's assistant turns that match a's from the start of each turn, characters of b's turns)."""
    same = 0
    ta = [m["value"] for m in a["conversations"] if m["from"] == "gpt"]
    tb = [m["value"] for m in b["conversations"] if m["from"] == "gpt"]
    for x, y in zip(ta, tb):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        same += n
    total = sum(len(y) for y in tb)
    return same, total


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", default="static_noreuse,static",
                    help=f"comma list of {', '.join(ENGINES)}; <engine>@bfloat16 runs it on a bf16 copy of the target")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--hf-conversations", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64, help="rows of the static engines")
    ap.add_argument("--conversations", type=int, default=128, help="conversations each static engine regenerates")
    ap.add_argument("--check", type=int, default=8, help="conversations every engine regenerates for the equality check")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    if not engines or any(split(e)[0] not in ENGINES or split(e)[1] not in ("float32", "bfloat16") for e in engines):
        ap.error(f"--engines: pick from {', '.join(ENGINES)}")
    torch.set_num_threads(args.threads)

    from specdistill import targets
    from specdistill.data import regenerate as rg
    from specdistill.data.sources import iter_conversations
    from specdistill.data.stats import SkipCounter
    from specdistill.train.logging import stdout_to_stderr

    t_start = time.time()
    with stdout_to_stderr():
        models = {dt: targets.load(targets.TargetConfig(name="default", dtype=dt))
                  for dt in dict.fromkeys(split(e)[1] for e in engines)}
    target = next(iter(models.values()))
    n_all = max(args.hf_conversations, args.conversations) + args.check
    convs = list(itertools.islice(iter_conversations("default", SkipCounter()), n_all))
    kw = {"max_new_tokens": args.max_new_tokens, "max_prompt_tokens": 512}
    runs, recs = {}, {}
    with tempfile.TemporaryDirectory() as d:
        for name in engines:
            (eng, reuse), dtype = ENGINES[split(name)[0]], split(name)[1]
            bs, n = (args.hf_batch, args.hf_conversations) if eng == "hf" else (args.batch, args.conversations)
            c0 = time.process_time()
            s = rg.regenerate(convs[:n], models[dtype], Path(d) / f"{name}.jsonl", batch_size=bs, engine=eng,
                              reuse_prefix=reuse, **kw)
            c = time.process_time() - c0
            keep = ("engine", "written", "turns", "generated_tokens", "seconds", "tokens_per_second", "finish_length",
                    "prefill_tokens", "reused_prefix_tokens", "prefill_seconds", "decode_seconds")
            runs[name] = {k: round(s[k], 2) if isinstance(s[k], float) else s[k] for k in keep if k in s} | {
                "reuse_prefix": reuse, "dtype": dtype, "batch_size": bs, "cpu_seconds": round(c, 2),
                "tokens_per_cpu_second": round(s["generated_tokens"] / c, 2)}
            print(f"{name}: {json.dumps(runs[name])}", file=sys.stderr, flush=True)
        check = convs[n_all - args.check:]
        for name in engines:
            (eng, reuse), dtype = ENGINES[split(name)[0]], split(name)[1]
            p = Path(d) / f"check-{name}.jsonl"
            bs = args.hf_batch if eng == "hf" else args.batch
            rg.regenerate(check, models[dtype], p, batch_size=min(bs, args.check), engine=eng, reuse_prefix=reuse, **kw)
            recs[name] = sorted((json.loads(x) for x in p.read_text().splitlines() if x.strip()), key=lambda r: r["id"])
    first, last = runs[engines[0]], runs[engines[-1]]
    res = {
        "benchmark": "regenerate_speed",
        "command": "python " + shlex.join(["benchmarks/regenerate_speed.py", *sys.argv[1:]]),
        "target": target.name,
        "torch_threads": torch.get_num_threads(), "machine": platform.machine(), **kw,
        "runs": runs,
        "before": engines[0], "after": engines[-1],
        "speedup_cpu": round(last["tokens_per_cpu_second"] / first["tokens_per_cpu_second"], 3),
        "speedup_wall": round(last["tokens_per_second"] / first["tokens_per_second"], 3),
        "greedy_records_equal_to_first": {
            n: f"{sum(a == b for a, b in zip(recs[engines[0]], recs[n]))}/{len(recs[n])}" for n in engines[1:]},
        # characters of each engine's check answers equal to the first engine's, from each turn's start
        "check_prefix_chars_equal_to_first": {
            n: "{}/{}".format(*map(sum, zip(*(common_prefix_share(a, b) for a, b in zip(recs[engines[0]], recs[n])))))
            for n in engines[1:]},
        "goal_tokens_per_second": 250, "goal_met_cpu": last["tokens_per_cpu_second"] >= 250,
        "seconds": round(time.time() - t_start, 1),
    }
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
