"""Our verifier against HF `generate` on the embedded target, same prompts, one process; prints JSON.

    python benchmarks/verifier.py                                   # 3 Spec-Bench questions per category
    python benchmarks/verifier.py --per-category 1 --categories writing,coding,translation --max-new-tokens 64

Pairs (greedy; first turn of each question through the chat template):
  plain : our plain decoding            vs HF generate()
  pld   : our PromptLookupProposer      vs HF generate(prompt_lookup_num_tokens=k)
  draft : our DraftModelProposer        vs HF generate(assistant_model=...)   (draft = target's first 4 layers)
Runs are interleaved prompt by prompt (alternating which of a pair goes first) so machine-load
drift hits every method alike. `ratio` is our
tokens/s over HF's with the same drafter; `identical_to_plain` checks every output against our plain
greedy output. HF's tau is counted with a forward hook on the target.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from specdistill import targets
from specdistill.data.questions import load_questions
from specdistill.verify.evaluate import encode_chat
from specdistill.verify.loading import truncated_model
from specdistill.verify.proposers import DraftModelProposer, PromptLookupProposer
from specdistill.verify.verifier import Verifier, eos_ids


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-category", type=int, default=3)
    ap.add_argument("--categories", default="", help="comma-separated; default all 13")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--pld-tokens", type=int, default=10, help="k for both prompt-lookup implementations")
    ap.add_argument("--pld-ngram", type=int, default=2, help="max n-gram size for both (HF default 2)")
    ap.add_argument("--draft-layers", type=int, default=4)
    ap.add_argument("--draft-tokens", type=int, default=20, help="HF assisted default: 20")
    ap.add_argument("--draft-confidence", type=float, default=0.4, help="HF assisted default: 0.4")
    ap.add_argument("--pairs", default="plain,pld,draft")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--hf-blas", action="store_true",
                    help="run HF's side with torch's BLAS (cpu_kernels off), as HF users run it; ours keeps the kernel")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    target = targets.load("default")
    model, tok = target.model, target.tokenizer
    eos = sorted(eos_ids(target))
    qs = load_questions(None, args.per_category, args.categories.split(",") if args.categories else None).questions
    prompts = [encode_chat(tok, [{"role": "user", "content": q.turns[0]}]) for q in qs]
    ver = Verifier(target)
    draft = truncated_model(target, args.draft_layers)
    pairs = args.pairs.split(",")
    N = args.max_new_tokens

    passes = [0]
    model.register_forward_hook(lambda *a: passes.__setitem__(0, passes[0] + 1))

    from specdistill import cpu_kernels

    kernel_linears = cpu_kernels.enabled_count(model)

    def hf(ids, **kw):
        x = torch.tensor([ids])
        if args.hf_blas:
            cpu_kernels.disable(model)
            cpu_kernels.disable(draft)
        try:
            return _hf(x, ids, **kw)
        finally:
            if args.hf_blas and kernel_linears:
                cpu_kernels.enable(model)
                cpu_kernels.enable(draft)

    def _hf(x, ids, **kw):
        with torch.inference_mode():
            passes[0] = 0
            t = time.perf_counter()
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=N, do_sample=False,
                                 eos_token_id=eos, pad_token_id=tok.pad_token_id, **kw)
            wall = time.perf_counter() - t
        return out[0, len(ids):].tolist(), wall, passes[0]

    def ours(ids, proposer):
        r = ver.generate(ids, proposer, max_new_tokens=N, eos_token_ids=eos)
        return r.tokens, r.wall_time, r.steps

    runners = {
        "plain": (lambda ids: ours(ids, None), lambda ids: hf(ids)),
        "pld": (lambda ids: ours(ids, PromptLookupProposer(args.pld_tokens, max_ngram=args.pld_ngram)),
                lambda ids: hf(ids, prompt_lookup_num_tokens=args.pld_tokens, max_matching_ngram_size=args.pld_ngram)),
        "draft": (lambda ids: ours(ids, DraftModelProposer(draft, args.draft_tokens,
                                                           confidence_threshold=args.draft_confidence)),
                  lambda ids: hf(ids, assistant_model=draft, num_assistant_tokens=args.draft_tokens,
                                 assistant_confidence_threshold=args.draft_confidence,
                                 num_assistant_tokens_schedule="constant")),
    }
    # Warm-up (allocator, lazy init) on a short run of every method.
    for name in pairs:
        for run in runners[name]:
            saved, N = N, 8
            run(prompts[0])
            N = saved

    acc = {f"{n}_{w}": {"tokens": 0, "wall": 0.0, "passes": 0, "identical": True} for n in pairs for w in ("ours", "hf")}
    for i, ids in enumerate(prompts):
        reference = None
        for name in pairs:
            order = [("ours", runners[name][0]), ("hf", runners[name][1])]
            for who, run in (order if i % 2 == 0 else order[::-1]):  # alternate who runs first
                toks, wall, steps = run(ids)
                if reference is None:
                    reference = toks  # the first output of this prompt; every method must match it
                a = acc[f"{name}_{who}"]
                a["tokens"] += len(toks)
                a["wall"] += wall
                a["passes"] += steps
                a["identical"] &= toks == reference

    def fig(a):
        return {"tokens_per_s": round(a["tokens"] / a["wall"], 3), "tau": round(a["tokens"] / a["passes"], 3),
                "wall_s": round(a["wall"], 2), "new_tokens": a["tokens"], "identical_to_plain": a["identical"]}

    plain_wall = acc.get("plain_ours", {}).get("wall")
    result = {"settings": {**vars(args), "questions": len(prompts), "kernel_linears": kernel_linears,
                           "torch_threads": torch.get_num_threads(),
                           "torch": torch.__version__, "machine": platform.machine()}, "pairs": {}}
    for name in pairs:
        o, h = acc[f"{name}_ours"], acc[f"{name}_hf"]
        entry = {"ours": fig(o), "hf": fig(h), "ratio_ours_over_hf": round(h["wall"] / o["wall"], 3)}
        if plain_wall and name != "plain":
            entry["ours"]["speedup_vs_our_plain"] = round(plain_wall / o["wall"], 3)
            entry["hf"]["speedup_vs_our_plain"] = round(plain_wall / h["wall"], 3)
        result["pairs"][name] = entry
    result["all_identical_to_plain"] = all(a["identical"] for a in acc.values())
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
