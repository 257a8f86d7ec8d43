"""Proposers that need no training: prompt lookup (n-gram matching) and an independent draft model.

Trained families (Medusa, EAGLE, CTC) ship their own proposers in their drafter modules and plug in
through `Proposer` (proposer.py); saved drafters load through `specdistill.loading`.
"""

from __future__ import annotations

import torch

from specdistill.verify import sampling
from specdistill.verify.proposer import DraftTree, Proposer, ProposerState


def _trie(continuations: list[list[int]]) -> DraftTree:
    """Merge token sequences sharing prefixes into one tree (nodes in insertion = topological order)."""
    tokens: list[int] = []
    parents: list[int] = []
    index: dict[tuple[int, int], int] = {}
    for seq in continuations:
        node = -1
        for t in seq:
            key = (node, t)
            if key not in index:
                index[key] = len(tokens)
                tokens.append(t)
                parents.append(node)
            node = index[key]
    return DraftTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))


class PromptLookupProposer(Proposer):
    """Prompt lookup decoding (Saxena 2023; "n-gram" drafting in vLLM/HF): copy what followed the
    latest earlier occurrence of the context's last n tokens, trying n = max_ngram .. min_ngram.

    With `branches > 1` the continuations of several distinct matches are merged into a tree.
    """

    def __init__(self, num_draft_tokens: int = 5, max_ngram: int = 3, min_ngram: int = 1, branches: int = 1):
        if num_draft_tokens < 1 or not 1 <= min_ngram <= max_ngram or branches < 1:
            raise ValueError(f"PromptLookupProposer: bad settings num_draft_tokens={num_draft_tokens} "
                             f"ngram={min_ngram}..{max_ngram} branches={branches}")
        self.k, self.max_ngram, self.min_ngram, self.branches = num_draft_tokens, max_ngram, min_ngram, branches

    def propose(self, state: ProposerState) -> DraftTree:
        toks = state.tokens
        L = toks.numel()
        k = min(self.k, state.max_depth) if state.max_depth else self.k
        found: list[list[int]] = []
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            windows = toks[:L - 1].unfold(0, n, 1)  # windows[i] = toks[i:i+n], all end before the last token
            hits = (windows == toks[L - n:]).all(dim=1).nonzero().flatten().tolist()
            for start in reversed(hits):  # most recent first
                cont = toks[start + n:start + n + k].tolist()
                if cont and cont not in found:
                    found.append(cont)
                    if len(found) >= self.branches:
                        return _trie(found)
            if found:
                break
        return _trie(found) if found else DraftTree.empty()


def check_same_vocabulary(target, draft_model, draft_tokenizer=None, name: str = "draft") -> None:
    """A draft must speak the target's token ids; raise a ValueError saying what differs."""
    tv = target.vocab_size
    dv = draft_model.get_output_embeddings().weight.shape[0]
    if dv != tv:
        raise ValueError(f"{name}: vocabulary size {dv} differs from the target's {tv}; "
                         "a draft model must share the target's tokenizer")
    if draft_tokenizer is not None and target.tokenizer is not None:
        a, b = target.tokenizer.get_vocab(), draft_tokenizer.get_vocab()
        if a != b:
            diff = sorted(set(a.items()) ^ set(b.items()))[:5]
            raise ValueError(f"{name}: tokenizer differs from the target's ({len(a)} vs {len(b)} entries; "
                             f"first differences {diff}); a draft model must share the target's tokenizer")


class DraftModelProposer(Proposer):
    """An independent small causal LM drafting `num_draft_tokens` tokens (Leviathan et al. 2023).

    Keeps its own KV cache over the committed tokens; after a rejection it crops the cache back to
    the longest prefix still committed, so accepted tokens are never recomputed. With temperature > 0
    it samples from its own warped distribution and reports it in `DraftTree.probs`.

    `confidence_threshold` > 0 ends a draft at the first token whose draft probability is below it (the dynamic draft length of HF assisted generation): low-confidence
    tokens are mostly rejected, so drafting them only costs time. The stopping rule looks at draft
    quantities only, so sampling stays lossless.

    With `tree=(w1, w2, ...)` it drafts a tree instead: the w_d most likely children of every node
    at depth d-1 (sampled without replacement when temperature > 0), one draft forward per depth
    with a tree attention mask (SpecInfer's expansion-based token tree, Miao et al. 2024, sec. 3).

    `draft_ids` (Vd,) for a draft whose head covers only a subset of the target vocabulary (small_lm
    with drafter.draft_vocab_size): row i of its logits is target token draft_ids[i]; the logits are
    scattered into the target's `vocab_size` with -inf elsewhere, so every drafted id is a target id and
    the draft distribution is exactly zero outside the subset.
    """

    def __init__(self, model, num_draft_tokens: int = 5, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, confidence_threshold: float = 0.0,
                 tree: tuple[int, ...] | None = None, draft_ids: torch.Tensor | None = None, vocab_size: int = 0):
        if num_draft_tokens < 1:
            raise ValueError(f"DraftModelProposer: num_draft_tokens must be >= 1, got {num_draft_tokens}")
        self.model = model.eval()
        self.k = num_draft_tokens
        self.tree = tuple(tree) if tree else None
        if self.tree and min(self.tree) < 1:
            raise ValueError(f"DraftModelProposer: tree widths must be >= 1, got {self.tree}")
        self.confidence_threshold = confidence_threshold
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.device = next(model.parameters()).device
        if draft_ids is not None and vocab_size < 1:
            raise ValueError("DraftModelProposer: draft_ids needs the target's vocab_size")
        self.draft_ids = None if draft_ids is None else draft_ids.to(self.device)
        self.vocab_size = vocab_size
        self.cache = None
        self.fed = torch.empty(0, dtype=torch.long)  # tokens whose K/V are in self.cache

    def reset(self, prompt_ids: torch.Tensor) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        self.fed = torch.empty(0, dtype=torch.long)

    def _step(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model.model(input_ids=ids[None].to(self.device), cache=self.cache, use_cache=True)
        return self._head(out.last_hidden_state[0, -1])

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over the target vocabulary (..., V) from the draft's last hidden states (..., H)."""
        z = self.model.lm_head(h)
        if self.draft_ids is None:
            return z
        return z.new_full((*z.shape[:-1], self.vocab_size), float("-inf")).index_copy_(-1, self.draft_ids, z)

    @torch.inference_mode()
    def propose(self, state: ProposerState) -> DraftTree:
        if self.cache is None:
            self.reset(state.tokens)
        toks = state.tokens
        L = toks.numel()
        m = min(self.fed.numel(), L - 1)  # always feed at least the last token to get fresh logits
        diff = (self.fed[:m] != toks[:m]).nonzero()
        keep = int(diff[0]) if diff.numel() else m
        if keep < self.fed.numel():
            self.cache.crop(keep - self.fed.numel())
        logits = self._step(toks[keep:])
        if self.tree:
            return self._propose_tree(toks, logits, state.max_depth)
        drafted: list[int] = []
        fed: list[int] = []
        rows = []
        k = min(self.k, state.max_depth) if state.max_depth else self.k
        for j in range(k):
            if self.temperature > 0:
                q = sampling.warp(logits, self.temperature, self.top_p, self.top_k)
                x = int(torch.multinomial(q, 1, generator=self.generator))
                rows.append(q)
                conf = float(q[x])
            else:
                x = int(logits.argmax())
                conf = float(torch.softmax(logits.float(), -1)[x]) if self.confidence_threshold > 0 else 1.0
            drafted.append(x)
            if conf < self.confidence_threshold:
                break  # keep this token (it may still be right) but draft no further
            if j + 1 < k:
                logits = self._step(torch.tensor([x]))
                fed.append(x)
        self.fed = torch.cat([toks, torch.tensor(fed, dtype=torch.long)])
        probs = torch.stack(rows) if rows else None
        return DraftTree.chain(drafted, probs)

    def _pick(self, logits: torch.Tensor, width: int) -> tuple[list[int], list[torch.Tensor]]:
        """`width` distinct children: top-w (greedy) or sampled without replacement with their rows."""
        if self.temperature <= 0:
            return torch.topk(logits, min(width, logits.numel())).indices.tolist(), []
        q = sampling.warp(logits, self.temperature, self.top_p, self.top_k)
        picks, rows = [], []
        for _ in range(min(width, int((q > 0).sum()))):
            x = int(torch.multinomial(q, 1, generator=self.generator))
            picks.append(x)
            rows.append(q)
            q = q.clone()
            q[x] = 0.0
            q = q / q.sum()
        return picks, rows

    def _propose_tree(self, toks: torch.Tensor, root_logits: torch.Tensor, max_depth: int | None) -> DraftTree:
        L = toks.numel()  # the draft cache now holds all committed tokens
        tokens: list[int] = []
        parents: list[int] = []
        rows: list[torch.Tensor] = []
        ancestors: list[list[int]] = []  # per node: fed-order indices of itself and its ancestors
        frontier = [(-1, root_logits)]
        fed = 0
        widths = self.tree[:max_depth] if max_depth else self.tree
        for d, width in enumerate(widths):
            new = []
            for parent, logits in frontier:
                picks, prow = self._pick(logits, width)
                for j, x in enumerate(picks):
                    tokens.append(x)
                    parents.append(parent)
                    if prow:
                        rows.append(prow[j])
                    new.append(len(tokens) - 1)
            if d + 1 == len(widths) or not new:
                break
            # Feed this depth's nodes together; each sees the committed prefix and its own ancestors.
            q = len(new)
            mask = torch.zeros(1, 1, q, L + fed + q, dtype=torch.bool)
            mask[..., :L] = True
            for r, node in enumerate(new):
                anc = (ancestors[parents[node]] if parents[node] >= 0 else []) + [fed + r]
                while len(ancestors) <= node:
                    ancestors.append([])
                ancestors[node] = anc
                mask[0, 0, r, [L + a for a in anc]] = True
            pos = torch.full((1, q), L + d, dtype=torch.long)
            out = self.model.model(input_ids=torch.tensor([[tokens[n] for n in new]], device=self.device),
                                   attention_mask=mask.to(self.device), position_ids=pos.to(self.device),
                                   cache=self.cache, use_cache=True)
            logits = self._head(out.last_hidden_state[0])
            frontier = [(node, logits[r]) for r, node in enumerate(new)]
            fed += q
        if fed:
            self.cache.crop(-fed)  # drop the drafted nodes: the next call re-feeds what was accepted
        self.fed = toks.clone()
        probs = torch.stack(rows) if rows else None
        return DraftTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long), probs)
