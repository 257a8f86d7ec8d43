"""Acceptance rules: greedy prefix matching and lossless speculative sampling over a draft tree.

Lossless sampling follows the rejection rule of Leviathan et al. 2023 (Algorithm 1) and Chen et al.
2023 (Algorithm 2): accept a drafted token x ~ q with probability min(1, p(x) / q(x)); on rejection
sample from the residual norm(max(0, p - q)). For trees, SpecInfer's multi-step speculative sampling
(Miao et al. 2024, Algorithm 2), equivalently recursive rejection sampling (Jeon et al. 2024), tries
the children of a node in order: after rejecting child i the target distribution becomes the
residual norm(max(0, p_i - q_i)) and the next child is tested against it; if all children are
rejected the bonus token is sampled from the last residual. This is lossless provided each child's
`DraftTree.probs` row is the distribution it was drawn from given its parent *and its earlier
siblings* (the same q for i.i.d. siblings; q renormalised without earlier picks when siblings are
drawn without replacement). A deterministic draft (`probs=None`) has one-hot q, so rejection
zeroes the token out of p: the rule then simply samples from p while skipping rejected tokens.
"""

from __future__ import annotations

import torch


def warp(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """Probabilities of the sampling distribution: softmax(logits / T) restricted by top-k, top-p.

    top-p keeps the smallest set of most-likely tokens whose mass reaches top_p (Holtzman et al. 2020),
    the same rule as HF's TopPLogitsWarper. Works on (..., V).
    """
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p
        drop_sorted = before >= top_p  # the most likely token always stays (before == 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def accept_greedy(argmax: list[int], tokens: list[int], kids: dict[int, list[int]]) -> tuple[list[int], int]:
    """Longest root-to-node path whose tokens equal the target's argmax; returns (path, bonus token).

    argmax[r] is the target's choice after row r (row 0 = root, row i+1 = node i).
    """
    path: list[int] = []
    node, row = -1, 0
    while True:
        want = argmax[row]
        nxt = next((c for c in kids[node] if tokens[c] == want), None)
        if nxt is None:
            return path, want
        path.append(nxt)
        node, row = nxt, nxt + 1


def accept_sampling(probs: torch.Tensor, tokens: list[int], kids: dict[int, list[int]],
                    draft_probs: torch.Tensor | None, generator: torch.Generator | None) -> tuple[list[int], int]:
    """Multi-branch rejection sampling (module docstring); probs (n+1, V) are the target's warped rows."""
    path: list[int] = []
    node, row = -1, 0
    while True:
        p = probs[row]
        moved = False
        for c in kids[node]:
            x = tokens[c]
            px = float(p[x])
            if draft_probs is None:
                qx = 1.0
            else:
                qx = float(draft_probs[c, x])
                if qx <= 0.0:
                    raise ValueError(f"DraftTree.probs[{c}] gives probability 0 to its own token {x}; "
                                     "probs must be the distribution the token was drawn from")
            if px >= qx or float(torch.rand((), generator=generator)) < px / qx:
                path.append(c)
                node, row = c, c + 1
                moved = True
                break
            if draft_probs is None:
                p = p.clone()
                p[x] = 0.0
            else:
                p = torch.clamp(p - draft_probs[c].to(p), min=0.0)
            total = float(p.sum())
            if total <= 0.0:
                # Only reachable through rounding when p == q (then the token is always accepted).
                p = probs[row]
            else:
                p = p / total
        if not moved:
            return path, int(torch.multinomial(p, 1, generator=generator))


def accept_typical(probs: torch.Tensor, tokens: list[int], kids: dict[int, list[int]], threshold: float = 0.09,
                   alpha: float = 0.3, generator: torch.Generator | None = None) -> tuple[list[int], int]:
    """Medusa's typical acceptance (Cai et al. 2024, arXiv 2401.10774, Sec. 2.3.1), a LOSSY rule: a drafted
    token x is accepted iff p(x) > min(threshold, alpha * exp(-H(p))), H the entropy of the target's row
    (released code: log(p + 1e-5)); among a node's accepted children the most likely one is followed. The
    bonus token is the argmax of the last row (generator None) or a sample from it. Defaults: the
    released code's posterior_threshold 0.09 and posterior_alpha 0.3. Not the target's distribution."""
    path: list[int] = []
    node, row = -1, 0
    while True:
        p = probs[row]
        ent = -(p * torch.log(p + 1e-5)).sum()
        bar = min(threshold, alpha * float(torch.exp(-ent)))
        ok = [c for c in kids[node] if float(p[tokens[c]]) > bar]
        if not ok:
            bonus = int(p.argmax()) if generator is None else int(torch.multinomial(p, 1, generator=generator))
            return path, bonus
        nxt = max(ok, key=lambda c: (float(p[tokens[c]]), -c))
        path.append(nxt)
        node, row = nxt, nxt + 1
