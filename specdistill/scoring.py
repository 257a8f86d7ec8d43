"""`specdistill eval`: score a drafter on MT-bench / Spec-Bench questions against plain decoding.

    specdistill eval --target default --drafter pld --limit-per-category 3 --max-new-tokens 128
    specdistill eval --drafter checkpoints/eagle/export/native --temperature 0      # writes eval.json there

`score(target, drafter, out, ...)` is the library entry (recipes call it with the in-memory target, so
target.dtype, gguf_file, revision and device_map are those of the run); `main(args)` is the command.
The decoding and the figures are verify/evaluate.py's `run_eval`.
"""

from __future__ import annotations

import json
import logging
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from specdistill import fsutil
from specdistill.data.questions import load_questions
from specdistill.loading import load_proposer
from specdistill.verify.evaluate import format_table, parse_tree, plot, run_eval
from specdistill.verify.proposer import ProposerOptions

log = logging.getLogger(__name__)


def score(target, drafter: str, out: str | Path | None = None, *, questions: str | None = None,
          limit_per_category: int = 0, limit: int = 0, categories: str = "", max_new_tokens: int = 128,
          temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0, num_draft_tokens: int = 5,
          tree: str | None = None, draft_confidence: float = 0.0, baseline: bool = True, progress: bool = True,
          quiet: bool = False, adaptive: bool = False, acceptance: str = "standard") -> dict:
    """Decode the questions with `drafter` (a --drafter spec: path, pld, hf:, truncated:) and plainly, on
    `target`; write eval.json + eval.png to `out` (default: the drafter's directory, else cwd). With
    `adaptive` the draft length of each pass comes from verify/policy.AdaptivePolicy (0 = a plain step)."""
    t0 = time.time()
    torch.manual_seed(seed)
    target.eval()  # no dropout (e.g. a trained target's LoRA dropout) while decoding
    widths = parse_tree(tree)
    opts = ProposerOptions(num_draft_tokens=num_draft_tokens, tree=widths, temperature=temperature, top_p=top_p,
                           top_k=top_k, seed=seed, confidence_threshold=draft_confidence)
    proposer = load_proposer(drafter, target, opts)
    qset = load_questions(questions, limit_per_category, categories.split(",") if categories else None)
    for msg in qset.skipped[:20]:
        log.warning("skipped %s", msg)
    if limit:
        qset.questions = qset.questions[:limit]
    policy = None
    if adaptive:
        from specdistill.verify.policy import AdaptivePolicy, VerifyCost

        depth = len(widths) if widths else num_draft_tokens
        policy = AdaptivePolicy(VerifyCost.load_or_measure(target, max(8, depth)), max_tokens=depth)
    result = run_eval(target, proposer, qset, max_new_tokens=max_new_tokens, temperature=temperature,
                      top_p=top_p, top_k=top_k, seed=seed, baseline=baseline, progress=progress, policy=policy,
                      acceptance=acceptance)
    result["overall"]["lossless"] = acceptance == "standard"  # typical acceptance changes the output distribution
    drafter_path = Path(drafter).expanduser()
    out = Path(out) if out else (drafter_path if drafter_path.is_dir() else Path.cwd())
    out.mkdir(parents=True, exist_ok=True)
    import transformers

    result["settings"] = {
        "target": target.name, "drafter": drafter, "proposer": type(proposer).__name__,
        "questions": qset.path, "limit_per_category": limit_per_category, "limit": limit,
        "categories": categories, "max_new_tokens": max_new_tokens, "temperature": temperature,
        "top_p": top_p, "top_k": top_k, "seed": seed, "num_draft_tokens": num_draft_tokens,
        "tree": list(widths) if widths else None, "draft_confidence": draft_confidence, "baseline": baseline,
        "adaptive": policy.summary() if policy is not None else None, "acceptance": acceptance,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "command": shlex.join(sys.argv), "seconds": time.time() - t0,
    }
    result["skipped_lines"] = qset.skipped
    plot(result, out / "eval.png")  # the figure first: eval.json is the record publish requires
    fsutil.atomic_write_text(out / "eval.json", json.dumps(result, indent=1))
    if not quiet:
        print(format_table(result))
        print(f"wrote {out / 'eval.json'} and {out / 'eval.png'}")
    return result


def main(args) -> dict:
    from specdistill import targets

    if args.threads:
        torch.set_num_threads(args.threads)
    target = targets.load(args.target)
    return score(target, args.drafter, args.out, questions=args.questions, limit_per_category=args.limit_per_category,
                 limit=args.limit, categories=args.categories, max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                 num_draft_tokens=args.num_draft_tokens, tree=args.tree, draft_confidence=args.draft_confidence,
                 baseline=not args.no_baseline, progress=not args.no_progress, adaptive=args.adaptive,
                 acceptance=args.acceptance)
def add_arguments(p) -> None:
    p.add_argument("--target", default="default", help="target: default, HF id/dir or .gguf (as in target.name)")
    p.add_argument("--drafter", required=True,
                   help="export dir | checkpoint | pld | hf:<model dir or id> | truncated:<n layers>")
    p.add_argument("--questions", default=None, help="MT-bench/Spec-Bench JSONL (default: shipped Spec-Bench)")
    p.add_argument("--limit-per-category", type=int, default=0, help="first N questions of each category (0 = all)")
    p.add_argument("--limit", type=int, default=0, help="at most N questions in total (0 = all)")
    p.add_argument("--categories", default="", help="comma-separated categories to keep")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-draft-tokens", type=int, default=5, help="draft length / tree depth")
    p.add_argument("--draft-confidence", type=float, default=0.0,
                   help="dynamic draft length: a draft-model or EAGLE chain stops at the first token whose draft "
                        "probability is below this; an EAGLE tree keeps only nodes whose path probability "
                        "reaches it (0 = off)")
    p.add_argument("--tree", default=None, help="tree drafts: branching per depth, e.g. 3,2,1 (draft models: depth = len, "
                   "--num-draft-tokens ignored; pld: the first number = matches merged into a trie)")
    p.add_argument("--adaptive", action="store_true",
                   help="adaptive policy: each pass drafts as many tokens as the measured verify cost and the "
                        "drafter's running acceptance say pay, none (a plain step) when drafting does not; "
                        "lossless (it only sets draft lengths)")
    p.add_argument("--acceptance", choices=("standard", "typical"), default="standard",
                   help="typical = Medusa's lossy typical acceptance (eval.json: lossless false, no identity claim)")
    p.add_argument("--no-baseline", action="store_true", help="skip plain decoding (no speed-up, no identity check)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=None, help="output dir (default: the drafter's dir if it is one, else cwd)")


def register(subparsers) -> None:
    """Add `specdistill eval` to the CLI."""
    p = subparsers.add_parser("eval", help="score a drafter: tau, alpha, speed-up, losslessness",
                              description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(func=_cmd)


def _cmd(args) -> int:
    """Exit status 1 when a temperature-0 run was not identical to plain greedy decoding (a lossy drafter
    path is a bug, and CI should see it)."""
    result = main(args)
    return 1 if result["overall"].get("identical_to_greedy") is False else 0
