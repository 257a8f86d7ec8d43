"""The EAGLE family's drafting side: `EagleProposer` (chain and EAGLE-2 dynamic tree) over an
`EagleDrafter`, and the mapping of the verifier's `ProposerOptions` onto its arguments."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from specdistill.drafters.layers import rms_norm
from specdistill.verify.proposer import DraftTree, Proposer, ProposerOptions, ProposerState

if TYPE_CHECKING:
    from specdistill.drafters.eagle import EagleDrafter


def proposer_args(options: ProposerOptions) -> dict:
    """ProposerOptions -> EagleProposer arguments (chain: k; tree: depth, topk, budget = the number of
    nodes of the full tree with that branching; both: min_prob from the confidence threshold)."""
    conf = {"min_prob": float(options.confidence_threshold)} if options.confidence_threshold else {}
    if not options.tree:
        return {"mode": "chain", "k": int(options.num_draft_tokens), **conf}
    tree = [int(b) for b in options.tree]
    budget, width = 0, 1
    for b in tree:
        width *= b
        budget += width
    return {"mode": "tree", "depth": len(tree), "topk": max(tree), "budget": budget, **conf}


def make_proposer(drafter: EagleDrafter, options: ProposerOptions | None = None, **overrides) -> EagleProposer:
    """`EagleDrafter.proposer`: the options' mapping (None = EagleProposer's own defaults), then the
    EAGLE keyword overrides (mode, k, topk, budget, depth, min_prob, dtype) on top."""
    args = proposer_args(options) if options is not None else {}
    args.update(overrides)
    return EagleProposer(drafter, **args)


class EagleProposer(Proposer):
    """Chain or EAGLE-2 dynamic tree (Li et al. 2024, arXiv 2406.16858, Sec. 4) over a drafter KV cache.

    The cache holds the drafter's keys for committed positions (computed from *target* features the
    verifier hands over); draft positions are appended while drafting and cut off afterwards.
    Drafting is deterministic (top-1 chain, top-k tree), so `DraftTree.probs` is None: the verifier's
    rejection rule for one-hot drafts (accept x with prob p(x), else drop x from p) stays lossless.

    mode="chain": k draft tokens. mode="tree": depth d; at each depth the `topk` frontier nodes with
    the highest cumulative log-prob are expanded into their `topk` best children; finally every
    generated node is reranked by cumulative log-prob and the best `budget` are kept (EAGLE-2's
    "expansion" and "reranking" phases). Ancestors always outrank descendants, so the kept set is a tree.
    """

    def __init__(self, drafter: EagleDrafter, mode: str = "chain", k: int = 5, topk: int = 4,
                 budget: int = 16, depth: int = 5, dtype: str = "auto", min_prob: float = 0.0):
        if mode not in ("chain", "tree"):
            raise ValueError(f"EagleProposer mode ({mode!r}) must be chain or tree")
        if not 0.0 <= min_prob < 1.0:
            raise ValueError(f"EagleProposer min_prob ({min_prob}) must be in [0, 1)")
        # Dynamic draft length: a chain stops at the first token whose draft probability is below
        # min_prob, a tree keeps only nodes whose cumulative (path) probability reaches it. A weak
        # drafter then drafts only where it is confident, and an empty draft is a plain decode step.
        self.min_logp = math.log(min_prob) if min_prob > 0 else -math.inf
        if k < 1 or topk < 1 or budget < 1 or depth < 1:
            raise ValueError(f"EagleProposer: k ({k}), topk ({topk}), budget ({budget}), depth ({depth}) must be >= 1")
        self.drafter = _drafting_copy(drafter, dtype)
        self.mode, self.k, self.topk, self.budget, self.depth = mode, k, topk, budget, depth
        self.target_layers = tuple(drafter.layer_ids)
        self._prepare()
        self.reset(None)

    def reset(self, prompt_ids=None) -> None:
        self.committed = 0  # drafter indices in the cache (index t covers (f_t, x_{t+1}))
        self.last_out: torch.Tensor | None = None  # (H,) drafter output at the last committed index
        self.n = 0  # positions held in the KV buffers: committed ones, then the current draft's

    def _prepare(self) -> None:
        """Drafting-time tensors built once per proposer: the projections of each draft layer fused into
        one matmul each (q|k|v and gate|up: the same dot products, one weight read and one call), the
        RoPE table, and the KV buffers (grown by doubling; positions are written in place, never cat)."""
        d = self.drafter
        self._layers = []
        for layer in [d.midlayer, *d.layers]:
            at, mlp = layer.self_attn, layer.mlp
            self._layers.append({
                "fused": layer.fused,
                "in_norm": layer.input_layernorm.weight if hasattr(layer, "input_layernorm") else None,
                "hidden_norm": layer.hidden_norm.weight if layer.fused else None,
                "post_norm": layer.post_attention_layernorm.weight,
                "wqkv": torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight]).contiguous(),
                "wo": at.o_proj.weight, "wgu": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous(),
                "wd": mlp.down_proj.weight, "act": mlp.act_fn, "inter": mlp.gate_proj.weight.shape[0],
                "heads": at.heads, "kv_heads": at.kv_heads, "head_dim": at.head_dim,
            })
        self._eps = d.eps
        self._positions = torch.arange(0)
        self._cap = 0
        self._kbuf: list[torch.Tensor] = []
        self._vbuf: list[torch.Tensor] = []
        self._cos = self._sin = None

    def _ensure(self, need: int) -> None:
        """KV buffers and RoPE table for at least `need` positions (doubling, existing entries kept)."""
        if need <= self._cap:
            return
        w = self._param()
        cap = max(256, self._cap)
        while cap < need:
            cap *= 2
        kb, vb = [], []
        for i, spec in enumerate(self._layers):
            shape = (1, spec["kv_heads"], cap, spec["head_dim"])
            k = torch.empty(shape, dtype=w.dtype, device=w.device)
            v = torch.empty(shape, dtype=w.dtype, device=w.device)
            if self._cap:
                k[:, :, :self.n] = self._kbuf[i][:, :, :self.n]
                v[:, :, :self.n] = self._vbuf[i][:, :, :self.n]
            kb.append(k)
            vb.append(v)
        self._kbuf, self._vbuf, self._cap = kb, vb, cap
        probe = torch.empty(1, dtype=w.dtype, device=w.device)
        cos, sin = self.drafter.rotary(probe, torch.arange(cap, device=w.device)[None])
        self._cos, self._sin = cos[0], sin[0]  # (cap, d), exactly what the rotary module gives per position

    def _param(self):
        """A parameter in the drafting dtype (the KV buffers', RoPE's and activations' dtype); the bf16
        weights of cpu_kernels.Bf16WeightLinear layers are storage only, so they are skipped."""
        p = getattr(self, "_dtype_param", None)
        if p is None:
            from specdistill import cpu_kernels

            skip = {id(m.weight) for m in self.drafter.modules() if isinstance(m, cpu_kernels.Bf16WeightLinear)}
            p = self._dtype_param = next(q for q in self.drafter.parameters() if id(q) not in skip)
        return p

    def _run(self, hidden, emb, positions, mask, causal=False):
        """All draft layers on the n new positions `hidden` (1, n, H) at `positions` (n,); their keys and
        values are written at cache slots self.n .. self.n+n-1, which the queries see with `mask`
        (n, self.n+n; None = all of them, or causal over the new block when `causal`)."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        n = hidden.shape[1]
        p0 = self.n
        self._ensure(p0 + n)
        cos, sin = self._cos[positions][None], self._sin[positions][None]
        eps = self._eps
        for i, L in enumerate(self._layers):
            residual = hidden
            if L["fused"]:
                x = torch.cat([rms_norm(emb.to(hidden.dtype), L["in_norm"], eps),
                               rms_norm(hidden, L["hidden_norm"], eps)], -1)
            elif L["in_norm"] is not None:
                x = rms_norm(hidden, L["in_norm"], eps)
            else:
                x = hidden
            nh, nkv, hd = L["heads"], L["kv_heads"], L["head_dim"]
            qkv = _linear(x, L["wqkv"])
            q = qkv[..., :nh * hd].view(1, n, nh, hd).transpose(1, 2)
            k = qkv[..., nh * hd:(nh + nkv) * hd].view(1, n, nkv, hd).transpose(1, 2)
            v = qkv[..., (nh + nkv) * hd:].view(1, n, nkv, hd).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            kb, vb = self._kbuf[i], self._vbuf[i]
            kb[:, :, p0:p0 + n] = k
            vb[:, :, p0:p0 + n] = v
            a = F.scaled_dot_product_attention(q, kb[:, :, :p0 + n], vb[:, :, :p0 + n], attn_mask=mask,
                                               is_causal=causal and mask is None, enable_gqa=nh != nkv)
            hidden = residual + _linear(a.transpose(1, 2).reshape(1, n, -1), L["wo"])
            gu = _linear(rms_norm(hidden, L["post_norm"], eps), L["wgu"])
            m = L["inter"]
            hidden = hidden + _linear(L["act"](gu[..., :m]) * gu[..., m:], L["wd"])
        self.n = p0 + n
        return hidden

    def _crop(self, n):
        self.n = n

    def _commit(self, state: ProposerState):
        """Add the newly accepted positions (target features) to the cache."""
        d = self.drafter
        L = int(state.tokens.numel())
        new = L - 1 - self.committed
        if new < 0 or (new > 0 and not state.hidden):
            raise ValueError(f"EagleProposer: expected target hidden states for {new} new positions "
                             f"(committed {self.committed}, {L} tokens); the verifier must set "
                             f"target_layers={self.target_layers}")
        if new == 0:
            return
        feats = d.target_features(state.hidden)
        if feats.dim() == 3:
            feats = feats[0]
        if feats.shape[0] != new:
            raise ValueError(f"EagleProposer: got target hidden states for {feats.shape[0]} positions, expected "
                             f"{new} (positions {self.committed}..{L - 2}); call reset() per generation")
        w = self._param()
        device = w.device
        feats = feats.to(device=device, dtype=w.dtype)[None]
        tok = state.tokens[self.committed + 1:L].to(device)[None]
        emb = d.embed(tok).to(w.dtype)
        x = d.step_input(feats, emb, 0)
        pos = torch.arange(self.committed, L - 1, device=device)
        p0 = self.committed
        mask = None
        if p0:
            mask = torch.ones(new, p0 + new, dtype=torch.bool, device=device)
            mask[:, p0:] = torch.tril(torch.ones(new, new, dtype=torch.bool, device=device))
        out = self._run(x, emb, pos, mask, causal=mask is None)
        self.committed = L - 1
        self.last_out = out[0, -1]

    def _logp(self, out):
        return F.log_softmax(self.drafter.draft_logits(out).float(), -1)

    def _to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return (draft_ids + self.drafter.d2t[draft_ids]).cpu()

    def _embed_drafts(self, draft_ids: torch.Tensor, dtype) -> torch.Tensor:
        """Embeddings of drafted tokens, which the next draft step reads: the (target-vocabulary)
        embedding row of each draft id's target token, never the row numbered by the draft id."""
        d = self.drafter
        return d.embed(draft_ids + d.d2t[draft_ids]).to(dtype)

    @torch.no_grad()
    def propose(self, state: ProposerState) -> DraftTree:
        self._commit(state)
        if self.last_out is None:
            return DraftTree.empty()
        d = self.drafter
        w = self._param()
        try:
            if self.mode == "chain":
                k = min(self.k, state.max_depth) if state.max_depth else self.k
                if self._positions.numel() < self.committed + k:
                    self._positions = torch.arange(2 * (self.committed + k), device=w.device)
                return self._chain(d, w, k)
            return self._tree(d, w)
        finally:
            self._crop(self.committed)

    def _chain(self, d, w, k: int) -> DraftTree:
        toks = []
        out = self.last_out
        d2t = d.d2t
        gate = self.min_logp > -math.inf
        for i in range(k):
            logits = d.draft_logits(out)
            tid = logits.argmax(-1, keepdim=True)  # (1,) draft id, kept as a tensor (no sync, no rebuild)
            if gate and float(F.log_softmax(logits.float(), -1)[tid]) < self.min_logp:
                break
            toks.append(tid)
            if i == k - 1:
                break
            # Draft index committed+i consumes (own output, drafted token); sequence position = index.
            # The drafted token is embedded by its target id (never the row numbered by the draft id).
            emb = d.embed((tid + d2t[tid])[None]).to(w.dtype)
            x = d.step_input(out[None, None], emb, 1)
            pos = self._positions[self.committed + i:self.committed + i + 1]
            out = self._run(x, emb, pos, None)[0, -1]
        if not toks:
            return DraftTree.empty()
        return DraftTree.chain(self._to_target(torch.cat(toks)))

    def _tree(self, d, w) -> DraftTree:
        dev = w.device
        k = self.topk
        # Node store: draft id, parent index, cumulative log-prob, depth, cache slot (-1 = not run).
        tok: list[int] = []
        par: list[int] = []
        score: list[float] = []
        depth: list[int] = []
        lp = self._logp(self.last_out)
        v, i = lp.topk(min(k, lp.numel()))
        frontier = []
        for s, t in zip(v.tolist(), i.tolist()):
            tok.append(t)
            par.append(-1)
            score.append(s)
            depth.append(1)
            frontier.append(len(tok) - 1)
        parent_out = {-1: self.last_out}
        slot: dict[int, int] = {}  # node -> position in the draft part of the cache
        for dep in range(2, self.depth + 1):
            # Expand the best `k` nodes of the current depth (EAGLE-2 expansion phase).
            # A node below min_prob cannot have a descendant above it (path probabilities only fall).
            frontier = sorted((n for n in frontier if score[n] >= self.min_logp), key=lambda n: -score[n])[:k]
            if not frontier:
                break
            m = len(frontier)
            base = self.committed + len(slot)
            # Each expanded node attends to the committed context, its drafted ancestors and itself.
            anc = torch.zeros(m, len(slot), dtype=torch.bool)
            for r, node in enumerate(frontier):
                a = par[node]
                while a >= 0:
                    anc[r, slot[a]] = True
                    a = par[a]
            mask = torch.cat([torch.ones(m, self.committed, dtype=torch.bool), anc, torch.eye(m, dtype=torch.bool)], 1)
            hid = torch.stack([parent_out[par[n]] for n in frontier])[None]  # (1, m, H)
            emb = self._embed_drafts(torch.tensor([[tok[n] for n in frontier]], device=dev), w.dtype)
            x = d.step_input(hid, emb, 1)
            pos = torch.tensor([self.committed + depth[n] - 1 for n in frontier], device=dev)
            o = self._run(x, emb, pos, mask.to(dev))
            for r, node in enumerate(frontier):
                slot[node] = base - self.committed + r
                parent_out[node] = o[0, r]
            lps = self._logp(o[0])  # (m, Vd)
            cv, ci = lps.topk(min(k, lps.shape[-1]), -1)
            expanded, frontier = frontier, []
            for r, node in enumerate(expanded):
                for s, t in zip(cv[r].tolist(), ci[r].tolist()):
                    tok.append(t)
                    par.append(node)
                    score.append(score[node] + s)
                    depth.append(dep)
                    frontier.append(len(tok) - 1)
        # Rerank (EAGLE-2 reranking phase): top `budget` by cumulative log-prob; shallower first on ties
        # so a parent (score >= child's) is always kept before its children.
        order = [n for n in sorted(range(len(tok)), key=lambda n: (-score[n], depth[n]))[: self.budget]
                 if score[n] >= self.min_logp]
        if not order:
            return DraftTree.empty()
        keep = set(order)
        for n in list(keep):  # guard against float ties: close the set under ancestors
            a = par[n]
            while a >= 0 and a not in keep:
                keep.add(a)
                a = par[a]
        nodes = sorted(keep, key=lambda n: (depth[n], -score[n]))
        new_index = {n: r for r, n in enumerate(nodes)}
        tokens = self._to_target(torch.tensor([tok[n] for n in nodes], device=dev))
        parents = torch.tensor([new_index[par[n]] if par[n] >= 0 else -1 for n in nodes], dtype=torch.long)
        return DraftTree(tokens, parents)


def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear, except for the bf16 weights of a bf16_weights drafting copy (cpu_kernels.bf16_weight_linear)."""
    if w.dtype == x.dtype:
        return F.linear(x, w)
    from specdistill import cpu_kernels

    return cpu_kernels.bf16_weight_linear(x, w)


def _drafting_copy(drafter: EagleDrafter, dtype: str) -> EagleDrafter:
    """The module the proposer runs: the drafter itself, or a frozen bf16 copy.

    One draft step reads every weight once for a single token, so it is memory-bound: bf16 halves
    the bytes, and CPUs with AVX512-BF16 run the (1, H) x (H, Vd) product ~2.5x faster than fp32
    (measured here). "auto" picks bf16 on such CPUs. A copy does not follow later training steps.
    """
    if dtype not in ("auto", "float32", "bfloat16", "bf16_weights"):
        raise ValueError(f"EagleProposer dtype ({dtype!r}) must be auto, float32, bfloat16 or bf16_weights")
    w = next(drafter.parameters())
    import copy

    cpu_fp32 = w.device.type == "cpu" and w.dtype == torch.float32
    if dtype == "auto":
        bf16_ok = w.device.type == "cpu" and bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
        dtype = ("bfloat16" if bf16_ok or w.dtype == torch.bfloat16
                 else "bf16_weights" if cpu_fp32 else "float32")
    if dtype == "bf16_weights":
        # No native bf16 math (e.g. AVX2-only): keep fp32 math but store the linears' weights as bf16 for
        # cpu_kernels' kernel, which widens them in registers: half the bytes a draft step reads.
        from specdistill import cpu_kernels

        if cpu_fp32 and cpu_kernels.unavailable_reason() is None and cpu_kernels.load_extension() is not None:
            cp = copy.deepcopy(drafter).eval().requires_grad_(False)
            if cpu_kernels.bf16_weights(cp):
                return cp
        dtype = "float32"  # not a CPU fp32 drafter, or no kernel here: plain fp32
    want = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    if w.dtype == want:
        return drafter
    return copy.deepcopy(drafter).to(want).eval().requires_grad_(False)
