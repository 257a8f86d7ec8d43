"""The one set of speculative-decoding metrics (DESIGN.md "Metrics").

- tau: new tokens / target verification passes, the bonus token counted (Spec-Bench's "mean
  accepted tokens"). Every target forward that commits tokens is a pass, the prefill included.
- alpha_i: acceptance rate at draft position i given positions 1..i-1 were accepted:
  #(passes that accepted >= i draft tokens) / #(passes whose draft reached position i on the
  accepted path). For a tree, "reached" means the deepest accepted node still had children.
- tokens/s: new tokens / wall time. speed-up: plain wall time / speculative wall time, same target,
  prompts, max_new_tokens and process.
"""

from __future__ import annotations

from collections.abc import Iterable

from specdistill.verify.verifier import GenerationResult


def alpha(results: Iterable[GenerationResult], max_pos: int | None = None) -> list[float | None]:
    """alpha_1..alpha_K (None where no pass reached that position)."""
    results = list(results)
    offered = [o for r in results for o in r.draft_offered_per_step]
    accepted = [a for r in results for a in r.draft_accepted_per_step]
    depth = max(offered, default=0) if max_pos is None else max_pos
    out: list[float | None] = []
    for i in range(1, depth + 1):
        reached = sum(o >= i for o in offered)
        out.append(sum(a >= i for a in accepted) / reached if reached else None)
    return out


def summarize(results: Iterable[GenerationResult]) -> dict:
    """Aggregate figures of a set of generations (sums first, then ratios: token-weighted)."""
    results = list(results)
    tokens = sum(len(r.tokens) for r in results)
    steps = sum(r.steps for r in results)
    wall = sum(r.wall_time for r in results)
    drafted = sum(sum(r.draft_size_per_step) for r in results)
    accepted = sum(sum(r.draft_accepted_per_step) for r in results)
    return {
        "generations": len(results),
        "new_tokens": tokens,
        "target_passes": steps,
        "tau": tokens / steps if steps else 0.0,
        "alpha": alpha(results),
        "draft_tokens": drafted,
        "draft_tokens_accepted": accepted,
        "draft_efficiency": accepted / drafted if drafted else None,
        "wall_time_s": wall,
        "draft_time_s": sum(r.draft_time for r in results),
        "verify_time_s": sum(r.verify_time for r in results),
        "tokens_per_s": tokens / wall if wall else 0.0,
    }


def speedup(plain: Iterable[GenerationResult], spec: Iterable[GenerationResult]) -> float:
    """Wall time of plain decoding / wall time with the drafter on the same prompts."""
    p = sum(r.wall_time for r in plain)
    s = sum(r.wall_time for r in spec)
    return p / s if s else 0.0
