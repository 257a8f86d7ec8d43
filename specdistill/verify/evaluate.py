"""Score a proposer on MT-bench / Spec-Bench questions against plain decoding (`run_eval`); the
`specdistill eval` command around it is specdistill/scoring.py.

Every question is decoded with the drafter and (unless --no-baseline) plainly by the same verifier
code, interleaved, in this process: that is the speed-up's baseline. At temperature 0 the two
outputs must be identical token for token (`identical_to_greedy`). Multi-turn questions feed each
run's own answers back as assistant turns through the target's chat template.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

from specdistill import fsutil
from specdistill.data.questions import QuestionSet
from specdistill.verify import metrics
from specdistill.verify.verifier import GenerationResult, Verifier, eos_ids

log = logging.getLogger(__name__)


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt ids for `messages` + the assistant generation prompt, via the target's own template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the target's tokenizer has no chat template; eval needs one to build prompts")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _answer_text(tokenizer, tokens: list[int], eos: set[int]) -> str:
    if tokens and tokens[-1] in eos:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def _figures(spec: list[GenerationResult], base: list[GenerationResult]) -> dict:
    out = metrics.summarize(spec)
    if base:
        out["baseline"] = metrics.summarize(base)
        out["speedup"] = metrics.speedup(base, spec)
    return out


def run_eval(target, proposer, questions, max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int = 0, baseline: bool = True,
             progress: bool = True, warmup: bool = True, policy=None, acceptance: str = "standard") -> dict:
    """Decode every question with `proposer` (and plainly as the baseline); return all figures.

    `questions` is a QuestionSet or a list of Question. The result is what eval.json holds, minus
    the command-line settings the CLI adds. `policy` (verify/policy.AdaptivePolicy) sets the draft lengths.
    """
    qs = questions.questions if isinstance(questions, QuestionSet) else list(questions)
    if not qs:
        raise ValueError("run_eval: no questions to evaluate")
    tok = target.tokenizer
    ver = Verifier(target, acceptance=acceptance)  # typical: lossy, never compared to greedy
    eos = eos_ids(target, None)
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
    if warmup:  # first calls pay for allocator growth and lazy init; keep them out of the timings
        ids = encode_chat(tok, [{"role": "user", "content": qs[0].turns[0]}])
        ver.generate(ids, None, max_new_tokens=8, seed=seed)
        ver.generate(ids, proposer, max_new_tokens=8, seed=seed, policy=policy)

    total = sum(len(q.turns) for q in qs)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="eval", unit="turn")
    records, all_spec, all_base = [], [], []
    by_cat: dict[str, tuple[list, list]] = {}
    turn_index = 0
    for q in qs:
        spec_msgs: list[dict] = []
        base_msgs: list[dict] = []
        turns = []
        for turn in q.turns:
            s = seed + turn_index
            turn_index += 1
            spec_msgs.append({"role": "user", "content": turn})
            base_msgs.append({"role": "user", "content": turn})
            b = None
            if baseline:
                b = ver.generate(encode_chat(tok, base_msgs), None, seed=s, **kw)
                base_msgs.append({"role": "assistant", "content": _answer_text(tok, b.tokens, eos)})
            r = ver.generate(encode_chat(tok, spec_msgs), proposer, seed=s, policy=policy, **kw)
            spec_msgs.append({"role": "assistant", "content": _answer_text(tok, r.tokens, eos)})
            all_spec.append(r)
            cat = by_cat.setdefault(q.category, ([], []))
            cat[0].append(r)
            if b is not None:
                all_base.append(b)
                cat[1].append(b)
            turns.append({
                "prompt_tokens": r.prompt_len, "new_tokens": len(r.tokens), "target_passes": r.steps,
                "tau": r.tau, "accepted_per_step": r.accepted_per_step, "wall_time_s": r.wall_time,
                "draft_time_s": r.draft_time, "verify_time_s": r.verify_time, "stop_reason": r.stop_reason,
                "baseline_wall_time_s": b.wall_time if b else None,
                "identical_to_greedy": (r.tokens == b.tokens) if (b is not None and temperature == 0
                                                                   and acceptance == "standard") else None,
                "answer": spec_msgs[-1]["content"],
            })
            if bar is not None:
                bar.update(1)
                bar.set_postfix(tau=f"{metrics.summarize(all_spec)['tau']:.2f}")
        ident = [t["identical_to_greedy"] for t in turns]
        records.append({"question_id": q.question_id, "category": q.category, "turns": turns,
                        "identical_to_greedy": all(ident) if None not in ident else None})
    if bar is not None:
        bar.close()

    overall = _figures(all_spec, all_base)
    compared = [r["identical_to_greedy"] for r in records if r["identical_to_greedy"] is not None]
    overall["identical_to_greedy"] = all(compared) if compared else None
    overall["identical_questions"] = f"{sum(compared)}/{len(compared)}" if compared else None
    cats = {}
    for c, (s, b) in by_cat.items():
        cats[c] = _figures(s, b)
        cats[c]["questions"] = sum(r["category"] == c for r in records)
    return {"overall": overall, "categories": cats, "questions": records}


def format_table(result: dict) -> str:
    """Per-category table for the terminal."""
    head = f"{'category':<18}{'n':>4}{'tau':>7}{'tok/s':>9}{'base tok/s':>12}{'speed-up':>10}{'identical':>11}"
    lines = [head, "-" * len(head)]
    ident_by_cat: dict[str, list] = {}
    for r in result["questions"]:
        ident_by_cat.setdefault(r["category"], []).append(r["identical_to_greedy"])

    def row(name, f, ident):
        base = f.get("baseline", {}).get("tokens_per_s")
        vals = [v for v in ident if v is not None]
        same = f"{sum(vals)}/{len(vals)}" if vals else "-"
        base_s = f"{base:.1f}" if base else "-"
        speed = f"{f['speedup']:.2f}x" if "speedup" in f else "-"
        n = f.get("questions", f["generations"])
        return f"{name:<18}{n:>4}{f['tau']:>7.2f}{f['tokens_per_s']:>9.1f}{base_s:>12}{speed:>10}{same:>11}"

    for c, f in result["categories"].items():
        lines.append(row(c, f, ident_by_cat.get(c, [])))
    lines.append("-" * len(head))
    allq = [v for vs in ident_by_cat.values() for v in vs]
    overall = dict(result["overall"], questions=len(result["questions"]))
    lines.append(row("overall", overall, allq))
    alpha = ", ".join("-" if a is None else f"{a:.2f}" for a in result["overall"]["alpha"])
    lines.append(f"alpha by draft position: [{alpha}]")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Acceptance rate by draft position and tau per category, as a PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    alpha = [0.0 if a is None else a for a in result["overall"]["alpha"]]
    a1.bar(range(1, len(alpha) + 1), alpha, color="tab:blue")
    a1.set_xlabel("draft position i")
    a1.set_ylabel("alpha_i (conditional acceptance)")
    a1.set_ylim(0, 1)
    a1.set_title("acceptance by draft position")
    cats = list(result["categories"])
    a2.barh(cats, [result["categories"][c]["tau"] for c in cats], color="tab:orange")
    a2.axvline(result["overall"]["tau"], color="k", ls="--", lw=1, label=f"overall {result['overall']['tau']:.2f}")
    a2.set_xlabel("tau (new tokens per target pass)")
    a2.set_title("tau per category")
    a2.legend(loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    fsutil.atomic_write_bytes(path, buf.getvalue())


def parse_tree(spec: str | None) -> tuple[int, ...] | None:
    if not spec:
        return None
    try:
        widths = tuple(int(x) for x in spec.replace("x", ",").split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--tree {spec!r}: expected comma-separated branching factors, e.g. 3,2,1") from None
    if not widths or min(widths) < 1:
        raise ValueError(f"--tree {spec!r}: branching factors must be >= 1")
    return widths
