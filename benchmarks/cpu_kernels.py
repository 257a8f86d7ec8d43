"""What the small-batch CPU kernel (specdistill/cpu_kernels.py) changes on the embedded target; prints JSON.

    OMP_NUM_THREADS=1 python benchmarks/cpu_kernels.py --threads 1 > benchmarks/results/cpu_kernels.json

1. The verify-cost curve: one cached target pass over 1 .. 9 tokens (after 128 context tokens), median
   of 5, with torch's BLAS and with the kernel, alternating `--rounds` times in one process so machine
   load hits both alike; `ratio_*` = pass over n tokens / pass over 1 token.
2. Plain greedy decoding of the first turn of the first Spec-Bench question of each category: process
   CPU time with BLAS and with the kernel (alternating per prompt), and whether the tokens are identical
   (the kernel rounds differently from BLAS, as BLAS's GEMV and GEMM differ from each other).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time

import torch


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=8, help="curve up to 1 + this many tokens")
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from specdistill import cpu_kernels, targets
    from specdistill.data.questions import load_questions
    from specdistill.train.logging import stdout_to_stderr
    from specdistill.verify.evaluate import encode_chat
    from specdistill.verify.policy import VerifyCost, _cpu_name
    from specdistill.verify.verifier import Verifier

    t_start = time.time()
    with stdout_to_stderr():
        target = targets.load("default")
    model = target.model
    n_kernel = cpu_kernels.enabled_count(model)
    if not n_kernel:
        raise SystemExit(f"the kernel is not in use here: {cpu_kernels._why_not or cpu_kernels.unavailable_reason()}")

    def curve(on: bool) -> list[float]:
        (cpu_kernels.enable if on else cpu_kernels.disable)(model)
        return VerifyCost.measure(target, args.max_tokens).seconds[1:]

    curves = {"blas": [], "kernel": []}
    for r in range(args.rounds):
        for name in (["blas", "kernel"] if r % 2 == 0 else ["kernel", "blas"]):
            curves[name].append(curve(name == "kernel"))
            print(f"round {r} {name}: " + " ".join(f"{s * 1e3:.1f}" for s in curves[name][-1]), file=sys.stderr)
    med = {k: [sorted(c[i] for c in v)[len(v) // 2] for i in range(len(v[0]))] for k, v in curves.items()}

    qs = load_questions(None, args.per_category).questions
    prompts = [encode_chat(target.tokenizer, [{"role": "user", "content": q.turns[0]}]) for q in qs]
    ver = Verifier(target)
    cpu = {"blas": 0.0, "kernel": 0.0}
    toks = {"blas": 0, "kernel": 0}
    identical = 0
    first_diff = []
    cpu_kernels.enable(model)
    ver.generate(prompts[0], None, max_new_tokens=8)
    for i, ids in enumerate(prompts):
        out = {}
        for name in (["blas", "kernel"] if i % 2 == 0 else ["kernel", "blas"]):
            (cpu_kernels.enable if name == "kernel" else cpu_kernels.disable)(model)
            c0 = time.process_time()
            out[name] = ver.generate(ids, None, max_new_tokens=args.max_new_tokens).tokens
            cpu[name] += time.process_time() - c0
            toks[name] += len(out[name])
        same = out["blas"] == out["kernel"]
        identical += same
        if not same:
            first_diff.append(next((j for j, (a, b) in enumerate(zip(out["blas"], out["kernel"])) if a != b),
                                   min(len(out["blas"]), len(out["kernel"]))))
    cpu_kernels.enable(model)
    res = {
        "benchmark": "cpu_kernels",
        "command": "python " + shlex.join(["benchmarks/cpu_kernels.py", *sys.argv[1:]]),
        "target": target.name, "dtype": str(next(model.parameters()).dtype), "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(), "cpu": _cpu_name(), "linears_on_kernel": n_kernel,
        "verify_cost_ms": {k: [round(s * 1e3, 2) for s in v] for k, v in med.items()},
        "verify_cost_ratio": {k: [round(s / v[0], 3) for s in v] for k, v in med.items()},
        "verify_cost_rounds_ms": {k: [[round(s * 1e3, 2) for s in c] for c in v] for k, v in curves.items()},
        "plain_decoding": {
            "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
            "cpu_s": cpu, "tokens": toks,
            "tokens_per_cpu_s": {k: toks[k] / cpu[k] for k in cpu},
            "kernel_speedup_cpu": cpu["blas"] / cpu["kernel"],
            "identical_outputs": f"{identical}/{len(prompts)}",
            "first_divergence_at": first_diff,
        },
        "seconds": round(time.time() - t_start, 1),
    }
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
