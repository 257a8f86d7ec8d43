"""Small draft LMs on the embedded SmolLM2-135M target: untrained pruned vs Seq-KD vs DistillSpec; prints JSON.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/small_draft.py --minutes 3 --out /tmp/small_draft \\
        > benchmarks/results/small_draft.json

Every condition starts from the same 4-layer pruned draft (target layers 0-3 + final norm + tied
embedding/head, copied) and trains for the same wall clock (--minutes of the Trainer's own clock, 1 thread)
on the same target-regenerated answers (`data regenerate`, --regen conversations, greedy):
  untrained            the pruned draft as is
  seqkd                CE on the regenerated answers (recipes/configs/seqkd.yaml)
  distillspec_<loss>_l<lmbda>   divergence to the target over the full vocabulary (distillspec.yaml)
  <condition>@v<N>     the same with drafter.draft_vocab_size=N: an output layer over the N most frequent
                       label tokens (native export only; the draft cost is measured for it too)
Each export is scored by `specdistill eval` (chain of --k draft tokens) at every --temperatures value
(0 = greedy, token-identical; > 0 = lossless speculative sampling, seed 0) on the Spec-Bench subset
(--per-category questions of every category, --max-new-tokens), which also decodes plainly for the
speed-up; the figures at T go under "eval" (greedy) and "eval_t<T>". Then: the draft's cost per token as a fraction of a target decode step (one cached
single-token forward each, median), and HF assisted generation (`generate(assistant_model=...)`,
num_assistant_tokens = --k, constant) with the untrained and the best distilled hf_draft exports side
by side in one run, against plain greedy `generate`, on the first --hf-prompts Spec-Bench questions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _train(recipe: str, out: Path, data_source: str, minutes: float, extra: list[str]):
    from specdistill import config, export, pipeline

    cfg = config.load(recipe, [f"data.source={data_source}", "data.max_length=256", "data.val_fraction=0.05",
                               f"train.output_dir={out}", "train.max_steps=1000000", f"train.max_minutes={minutes}",
                               "train.min_lr_ratio=1.0", "train.warmup_steps=5", "train.lr=1.0e-4",
                               "train.eval_every=0", "train.save_every=1000000", "train.trackers=[none]",
                               "train.progress=false", "train.resume=false", "train.log_every=10",
                               "export.dtype=float32", "eval.limit_per_category=-1", *extra])
    t0 = time.time()
    run = pipeline.train_drafter(cfg)
    written = export.write(run.drafter, cfg.export, out / "export", run.target)
    return written, {"steps": int(run.result["step"]), "tokens_seen": int(run.result.get("tokens_seen") or 0),
                     "wall_s": round(time.time() - t0, 1), "overrides": extra}


def _eval_key(t: float) -> str:
    return "eval" if t == 0 else f"eval_t{t:g}"


def _score(target, drafter_dir: Path, args, temperature: float = 0.0) -> dict:
    from specdistill import scoring

    r = scoring.score(target, str(drafter_dir), drafter_dir.parents[1] / f"eval_t{temperature:g}",
                      limit_per_category=args.per_category, limit=args.limit, max_new_tokens=args.max_new_tokens,
                      num_draft_tokens=args.k, temperature=temperature, seed=0, progress=False, quiet=True)
    o = r["overall"]
    keep = {k: o.get(k) for k in ("tau", "speedup", "alpha", "identical_to_greedy", "lossless", "tokens_per_s",
                                  "generations", "new_tokens", "draft_time_s", "verify_time_s", "wall_time_s")}
    keep["temperature"] = temperature
    keep["baseline"] = o.get("baseline")
    return keep


@torch.no_grad()
def _step_ms(model, ctx: int = 200, reps: int = 30) -> float:
    from transformers import DynamicCache

    ids = torch.randint(100, 1000, (1, ctx))
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, past_key_values=cache, use_cache=True)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - t)
        cache.crop(-1)  # back to the ctx-token prefix
    return statistics.median(times) * 1000


@torch.no_grad()
def _hf_assisted(target, drafts: dict[str, Path], args) -> dict:
    from transformers import AutoModelForCausalLM

    from specdistill.data.questions import load_questions

    tok = target.tokenizer
    qs = load_questions(None, 1).questions[:args.hf_prompts]
    encs = []
    for q in qs:
        e = tok.apply_chat_template([{"role": "user", "content": q.turns[0]}], add_generation_prompt=True,
                                    return_tensors="pt")
        encs.append(e["input_ids"] if hasattr(e, "keys") else e)
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    models = {n: AutoModelForCausalLM.from_pretrained(str(p)).eval() for n, p in drafts.items()}
    for m in models.values():
        m.generation_config.num_assistant_tokens = args.k
        m.generation_config.num_assistant_tokens_schedule = "constant"
    wall = {"plain": 0.0, **{n: 0.0 for n in models}}
    same = {n: True for n in models}
    tokens = 0
    target.model.generate(encs[0], **{**kw, "max_new_tokens": 4})  # warm-up
    for e in encs:  # interleaved: each prompt plain, then with each draft
        t = time.perf_counter()
        ref = target.model.generate(e, **kw)
        wall["plain"] += time.perf_counter() - t
        tokens += ref.shape[1] - e.shape[1]
        for n, m in models.items():
            t = time.perf_counter()
            got = target.model.generate(e, assistant_model=m, **kw)
            wall[n] += time.perf_counter() - t
            same[n] = same[n] and torch.equal(got, ref)
    return {"prompts": len(encs), "new_tokens": tokens, "num_assistant_tokens": args.k,
            "tokens_per_s": {n: round(tokens / w, 2) for n, w in wall.items()},
            "speedup_vs_plain_generate": {n: round(wall["plain"] / wall[n], 3) for n in models},
            "identical_to_greedy": same}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=3.0, help="training wall clock per condition")
    p.add_argument("--out", default="/tmp/small_draft")
    p.add_argument("--regen", type=int, default=40, help="conversations regenerated by the target")
    p.add_argument("--regen-tokens", type=int, default=96)
    p.add_argument("--per-category", type=int, default=1)
    p.add_argument("--limit", type=int, default=0, help="at most this many questions of the subset (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--k", type=int, default=3, help="draft length (chain) for eval and HF")
    p.add_argument("--hf-prompts", type=int, default=4)
    p.add_argument("--conditions", default="seqkd,fkl_l0,tvd_l0,tvd_l0.5",
                   help="seqkd, <fkl|rkl|jsd|tvd>_l<lmbda>, each optionally @v<N> (reduced draft vocabulary)")
    p.add_argument("--temperatures", default="0", help="comma-separated decode temperatures (0 = greedy)")
    p.add_argument("--reuse", action="store_true", help="keep the conditions an earlier run in --out finished")
    args = p.parse_args()
    torch.set_num_threads(1)
    from specdistill import drafters, export, targets
    from specdistill.config import ExportConfig
    from specdistill.data.regenerate import regenerate
    from specdistill.data.sources import iter_conversations
    from specdistill.data.stats import SkipCounter
    from specdistill.drafters.small_lm import SmallLMConfig
    from specdistill.train.logging import stdout_to_stderr

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"command": "OMP_NUM_THREADS=1 nice -n 10 python benchmarks/small_draft.py " + " ".join(sys.argv[1:]),
                 "target": "SmolLM2-135M-Instruct (embedded, fp32)",
                 "draft": "pruned target layers 0-3, full vocab (@v<N>: an N-token output layer)",
                 "threads": 1, "settings": vars(args), "conditions": {}}

    prev = json.loads((out / "small_draft.json").read_text()) if args.reuse and (out / "small_draft.json").is_file() else {}

    def dump():
        (out / "small_draft.json").write_text(json.dumps(res, indent=1))

    temps = [float(t) for t in args.temperatures.split(",") if t]

    def reused(cond: str) -> dict | None:
        """--reuse: an earlier run's condition whose exports are still there (its figures are kept)."""
        d = out / cond / "export"
        wants = ["native"] + ([] if "@v" in cond else ["hf_draft"])
        if cond in prev.get("conditions", {}) and all((d / f).is_dir() for f in wants):
            res["conditions"][cond] = prev["conditions"][cond]
            return {f: d / f for f in wants}
        return None

    def scored(cond: str, w: dict) -> None:
        """Every --temperatures figure the condition does not have yet."""
        for t in temps:
            if _eval_key(t) not in res["conditions"][cond]:
                res["conditions"][cond][_eval_key(t)] = _score(target, w["native"], args, t)
                dump()

    with stdout_to_stderr():
        target = targets.load("default")
        t0 = time.time()
        regen = out / "regenerated.jsonl"
        if prev.get("regenerate"):
            res["regenerate"] = prev["regenerate"]
        st = regenerate(iter_conversations("default", SkipCounter()), target, regen, max_new_tokens=args.regen_tokens,
                        limit=args.regen, batch_size=8)
        res.setdefault("regenerate", {"conversations": st["total_written"], "seconds": round(time.time() - t0, 1),
                                      "max_new_tokens": args.regen_tokens})
        base = drafters.build(SmallLMConfig(keep_layers=[0, 1, 2, 3]), target)
        w = reused("untrained")
        if w is None:
            w = export.write(base, ExportConfig(formats=["native", "hf_draft"], dtype="float32"),
                             out / "untrained" / "export", target)
            res["conditions"]["untrained"] = {"train": None}
        scored("untrained", w)
        dirs = {"untrained": w}
        dump()
        c = [x for x in args.conditions.split(",") if x]
        names = {"fkl": "forward_kl", "rkl": "reverse_kl", "jsd": "jsd", "tvd": "tvd"}
        for cond in c:
            w = reused(cond)
            if w is not None:
                dirs[cond] = w
                scored(cond, w)
                continue
            base_cond, _, vocab = cond.partition("@v")
            if base_cond == "seqkd":
                recipe, extra = "seqkd", []
            else:
                loss, lm = base_cond.split("_l")
                recipe, extra = "distillspec", [f"drafter.loss={names[loss]}", f"drafter.lmbda={float(lm)}"]
            if vocab:
                extra.append(f"drafter.draft_vocab_size={int(vocab)}")
            w, tr = _train(recipe, out / cond, str(regen), args.minutes, extra)
            dirs[cond] = w
            res["conditions"][cond] = {"train": tr}
            scored(cond, w)
        # draft cost per token
        tgt_ms = _step_ms(target.model)
        d_ms = _step_ms(base.lm.eval())
        res["draft_cost"] = {"target_step_ms": round(tgt_ms, 2), "draft_step_ms": round(d_ms, 2),
                             "fraction_of_target_step": round(d_ms / tgt_ms, 3), "context": 200,
                             "by_hand_FAMILIES_C6": 0.316}
        for cond in [k for k in dirs if "@v" in k]:  # the reduced output layer is the point of the variant
            r_ms = _step_ms(export.load_native(dirs[cond]["native"], target).lm.eval())
            res["draft_cost"][cond] = {"draft_step_ms": round(r_ms, 2), "fraction_of_target_step": round(r_ms / tgt_ms, 3)}
        dump()
        trained = [k for k in res["conditions"] if k != "untrained" and "hf_draft" in dirs[k]]
        best = max(trained, key=lambda k: res["conditions"][k][_eval_key(temps[0])]["tau"] or 0) if trained else None
        hf = {"untrained": dirs["untrained"]["hf_draft"]}
        if best:
            hf[best] = dirs[best]["hf_draft"]
        res["hf_assisted_generation"] = _hf_assisted(target, hf, args)
        dump()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
