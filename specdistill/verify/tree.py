"""Tree bookkeeping for verification: depths, ancestor masks, position ids, depth truncation.

A `DraftTree` (proposer.py) is a list of nodes in topological order below a root (the last committed
token). Verifying it in one target forward needs (SpecInfer, Miao et al. 2024, sec. 4.2):
  - position ids: root position + depth of the node,
  - an attention mask where each node sees the committed prefix, the root and its own ancestors.
"""

from __future__ import annotations

import torch

from specdistill.verify.proposer import DraftTree


def validate(tree: DraftTree, vocab_size: int) -> None:
    """Raise a ValueError naming the broken field when a proposer returns a malformed tree."""
    n = len(tree)
    if tree.tokens.dim() != 1 or tree.parents.shape != tree.tokens.shape:
        raise ValueError(f"DraftTree: tokens {tuple(tree.tokens.shape)} and parents "
                         f"{tuple(tree.parents.shape)} must be equal-length 1-D tensors")
    if n == 0:
        return
    idx = torch.arange(n)
    if bool((tree.parents >= idx).any()) or bool((tree.parents < -1).any()):
        raise ValueError("DraftTree.parents must satisfy -1 <= parents[i] < i (topological order)")
    if bool((tree.tokens < 0).any()) or bool((tree.tokens >= vocab_size).any()):
        raise ValueError(f"DraftTree.tokens has ids outside the target vocabulary [0, {vocab_size})")
    if tree.probs is not None and tuple(tree.probs.shape) != (n, vocab_size):
        raise ValueError(f"DraftTree.probs has shape {tuple(tree.probs.shape)}, expected ({n}, {vocab_size})")


def depths(parents: list[int]) -> list[int]:
    """Depth of every node; children of the root have depth 1."""
    out: list[int] = []
    for p in parents:
        out.append(1 if p < 0 else out[p] + 1)
    return out


def children(parents: list[int]) -> dict[int, list[int]]:
    """Node -> its children in proposal order (-1 is the root)."""
    kids: dict[int, list[int]] = {-1: []}
    for i, p in enumerate(parents):
        kids.setdefault(p, []).append(i)
        kids.setdefault(i, [])
    return kids


def truncate_depth(tree: DraftTree, max_depth: int) -> DraftTree:
    """Drop nodes deeper than `max_depth` (used so a draft never outruns max_new_tokens)."""
    n = len(tree)
    if n == 0:
        return tree
    if max_depth <= 0:
        return DraftTree.empty()
    par = tree.parents.tolist()
    dep = depths(par)
    if max(dep) <= max_depth:
        return tree
    keep = [i for i in range(n) if dep[i] <= max_depth]
    # Ancestors have smaller depth, so every kept node's parent is kept too; re-index parents.
    new_index = {old: new for new, old in enumerate(keep)}
    parents = torch.tensor([new_index[par[i]] if par[i] >= 0 else -1 for i in keep], dtype=torch.long)
    keep_t = torch.tensor(keep, dtype=torch.long)
    probs = tree.probs[keep_t] if tree.probs is not None else None
    return DraftTree(tree.tokens[keep_t], parents, probs)


def tree_attention(parents: list[int], past: int, pending: int, dtype=torch.bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask and position ids for one verification forward.

    The forward's input is `pending` committed tokens not yet in the KV cache (the last one is the
    tree's root) followed by the n draft nodes; `past` tokens are already cached.
    Returns mask (1, 1, pending + n, past + pending + n), True = may attend, and position ids
    (1, pending + n).
    """
    n = len(parents)
    q = pending + n
    mask = torch.zeros(1, 1, q, past + q, dtype=torch.bool)
    # Committed part: plain causal attention.
    mask[0, 0, :, :past] = True
    mask[0, 0, :pending, past:past + pending] = torch.ones(pending, pending, dtype=torch.bool).tril()
    # Draft part: every node sees all committed tokens, itself and its ancestors.
    mask[0, 0, pending:, past:past + pending] = True
    anc = torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            anc[i] = anc[p]
        anc[i, i] = True
    mask[0, 0, pending:, past + pending:] = anc
    dep = depths(parents)
    pos = torch.arange(past, past + pending).tolist() + [past + pending - 1 + d for d in dep]
    return mask, torch.tensor([pos], dtype=torch.long)
