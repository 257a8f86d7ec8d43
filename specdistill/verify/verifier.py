"""The speculative verifier: one target forward checks a whole draft tree (DESIGN.md "The contracts").

Invariant kept between steps: the target's KV cache holds every committed token except the last
one, which is fed again as the root of the next draft. A step is

    draft = proposer.propose(state)                                   # chain or tree
    logits = target([pending tokens] + draft, tree mask, tree positions, KV cache)
    path, bonus = accept(logits, draft)                               # greedy or lossless sampling
    cache keeps only the pending tokens + the accepted path           # crop, or gather for trees

so nothing is recomputed. With `proposer=None` the same loop is plain autoregressive decoding (the
speed-up baseline), with the per-step work cut to one cached forward and an argmax/sample.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from specdistill.verify import sampling
from specdistill.verify import tree as treeops
from specdistill.verify.proposer import DraftTree, Proposer, ProposerState


@dataclass
class GenerationResult:
    """One generation. Step lists have one entry per target forward pass (the prefill included)."""

    tokens: list[int]
    """New tokens only (the prompt excluded); ends with the EOS token when generation stopped on it."""
    steps: int
    """Target forward passes (verification passes); tau = len(tokens) / steps."""
    accepted_per_step: list[int]
    """New tokens each pass committed, bonus token counted (Spec-Bench's accepted length)."""
    draft_accepted_per_step: list[int] = field(default_factory=list)
    """Draft tokens accepted by each pass (accepted_per_step minus the bonus, before EOS/length cuts)."""
    draft_offered_per_step: list[int] = field(default_factory=list)
    """Deepest draft position that was tested in each pass (accepted + 1 if the tree went deeper)."""
    draft_size_per_step: list[int] = field(default_factory=list)
    """Draft tree nodes sent to the target in each pass."""
    draft_time: float = 0.0
    verify_time: float = 0.0
    wall_time: float = 0.0
    prompt_len: int = 0
    stop_reason: str = "length"
    """'eos' or 'length'."""

    @property
    def tau(self) -> float:
        return len(self.tokens) / self.steps if self.steps else 0.0


def eos_ids(target, eos_token_ids=None) -> set[int]:
    """Explicit ids, else the tokenizer's EOS plus the generation config's (SmolLM2: <|im_end|>)."""
    if eos_token_ids is not None:
        return {int(e) for e in ([eos_token_ids] if isinstance(eos_token_ids, int) else eos_token_ids)}
    ids: set[int] = set()
    tok_eos = getattr(target.tokenizer, "eos_token_id", None) if target.tokenizer is not None else None
    if tok_eos is not None:
        ids.add(int(tok_eos))
    gen = getattr(target.model, "generation_config", None)
    gen_eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if gen_eos is not None:
        ids.update(int(e) for e in ([gen_eos] if isinstance(gen_eos, int) else gen_eos))
    return ids


class Verifier:
    """Speculative (and plain) decoding of one prompt at a time with a frozen TargetModel."""

    def __init__(self, target, acceptance: str = "standard", typical_threshold: float = 0.09,
                 typical_alpha: float = 0.3):
        """`acceptance`: standard (greedy prefix matching / lossless rejection sampling) or typical, Medusa's
        *lossy* rule (sampling.accept_typical; the output is no longer the target's distribution)."""
        if acceptance not in ("standard", "typical"):
            raise ValueError(f"Verifier acceptance ({acceptance!r}) must be standard or typical")
        self.acceptance, self.typical = acceptance, (typical_threshold, typical_alpha)
        self.target = target
        self.model = target.model
        self.vocab_size = target.vocab_size

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _forward(self, ids, cache, mask=None, position_ids=None):
        # Calling the decoder stack and then the lm_head on the rows we need avoids computing
        # logits for the whole prefill (49k-wide rows are the most expensive part of a step).
        out = self.model.model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                               cache=cache, use_cache=True)
        return out.last_hidden_state

    @torch.inference_mode()
    def generate(self, prompt_ids, proposer: Proposer | None = None, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 eos_token_ids=None, seed: int | None = None, policy=None) -> GenerationResult:
        """Decode one prompt; `policy` (verify/policy.AdaptivePolicy) sets each pass's draft length, 0 being
        a plain step without drafting (it never changes which tokens are accepted)."""
        prompt = torch.as_tensor(prompt_ids, dtype=torch.long).flatten().cpu()
        if prompt.numel() == 0:
            raise ValueError("generate: the prompt is empty")
        if max_new_tokens < 1:
            raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(f"generate: bad sampling settings temperature={temperature} top_p={top_p} top_k={top_k}")
        eos = eos_ids(self.target, eos_token_ids)
        generator = None
        if temperature > 0:
            generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % (2**63))
        if proposer is None:
            return self._plain(prompt, max_new_tokens, temperature, top_p, top_k, eos, generator)
        return self._speculative(prompt, proposer, max_new_tokens, temperature, top_p, top_k, eos, generator,
                                 policy)

    def _plain(self, prompt, max_new_tokens, temperature, top_p, top_k, eos, generator) -> GenerationResult:
        t0 = time.perf_counter()
        device = self.target.device
        lm_head = self.model.lm_head
        cache = self._new_cache()
        ids = prompt[None].to(device)
        out: list[int] = []
        stop = "length"
        while True:
            h = self._forward(ids, cache)[:, -1]
            logits = lm_head(h)
            if temperature > 0:
                probs = sampling.warp(logits[0], temperature, top_p, top_k)
                nxt = int(torch.multinomial(probs, 1, generator=generator))
            else:
                nxt = int(logits[0].argmax())
            out.append(nxt)
            if nxt in eos:
                stop = "eos"
                break
            if len(out) >= max_new_tokens:
                break
            ids = torch.tensor([[nxt]], device=device)
        wall = time.perf_counter() - t0
        n = len(out)
        return GenerationResult(out, n, [1] * n, [0] * n, [0] * n, [0] * n, 0.0, wall, wall, prompt.numel(), stop)

    def _speculative(self, prompt, proposer, max_new_tokens, temperature, top_p, top_k, eos,
                     generator, policy=None) -> GenerationResult:
        t_start = time.perf_counter()
        device = self.target.device
        lm_head = self.model.lm_head
        cache = self._new_cache()
        plen = prompt.numel()
        # One buffer for the whole sequence; proposers get views of its committed part.
        buf = torch.empty(plen + max_new_tokens, dtype=torch.long)
        buf[:plen] = prompt
        length, cached = plen, 0
        capture = self.target.capture(proposer.target_layers)
        capture.active = False  # records only the verification passes, not the proposer's own forwards
        res = GenerationResult([], 0, [], prompt_len=plen)
        hidden: dict[int, torch.Tensor] = {}
        unseen: list[dict[int, torch.Tensor]] = []  # hidden rows of passes the proposer has not seen yet
        draft_time = verify_time = 0.0
        if policy is not None:
            policy.start()
        try:
            proposer.reset(prompt.clone())
            while True:
                remaining = plen + max_new_tokens - length
                t0 = time.perf_counter()
                budget = remaining - 1
                if policy is not None and not (capture.layers and res.steps == 0) and budget > 0:
                    budget = policy.choose(budget)
                if (capture.layers and res.steps == 0) or budget <= 0:
                    # A feature-based drafter has nothing to draft from before the prefill has
                    # produced target hidden states, so the first pass is a plain prefill; with
                    # one token left only the bonus token can be used; and the policy may decide
                    # that drafting does not pay this pass.
                    draft = DraftTree.empty()
                    k_chosen = 0
                else:
                    if len(unseen) > 1:
                        hidden = {i: torch.cat([u[i] for u in unseen]) for i in capture.layers}
                    else:
                        hidden = unseen[0] if unseen else {}
                    unseen = []
                    draft = proposer.propose(ProposerState(buf[:length], hidden, budget))
                    treeops.validate(draft, self.vocab_size)
                    draft = treeops.truncate_depth(draft, budget)
                    k_chosen = budget
                t1 = time.perf_counter()
                draft_time += t1 - t0

                n = len(draft)
                pending = length - cached
                parents = draft.parents.tolist()
                dtokens = draft.tokens.tolist()
                ids = torch.cat([buf[cached:length], draft.tokens.cpu()])[None].to(device)
                if n == 0 or draft.is_chain():
                    mask = pos = None  # plain causal attention is the chain's tree mask
                else:
                    mask, pos = treeops.tree_attention(parents, cached, pending)
                    mask, pos = mask.to(device), pos.to(device)
                capture.active = True
                try:
                    h = self._forward(ids, cache, mask, pos)
                finally:
                    capture.active = False
                logits = lm_head(h[0, pending - 1:])  # (n+1, V): rows of the root and of each node
                kids = treeops.children(parents)
                if self.acceptance == "typical":  # lossy, explicit opt-in only
                    probs = sampling.warp(logits, temperature or 1.0, top_p, top_k)
                    path, bonus = sampling.accept_typical(probs, dtokens, kids, *self.typical,
                                                          generator if temperature > 0 else None)
                elif temperature > 0:
                    probs = sampling.warp(logits, temperature, top_p, top_k)
                    path, bonus = sampling.accept_sampling(probs, dtokens, kids, draft.probs, generator)
                else:
                    path, bonus = sampling.accept_greedy(logits.argmax(-1).tolist(), dtokens, kids)

                # Keep the pending tokens and the accepted path in the cache, drop the rest.
                m = len(path)
                if path == list(range(m)):
                    if n > m:
                        cache.crop(-(n - m))
                else:
                    keep = torch.cat([torch.arange(cached + pending),
                                      cached + pending + torch.tensor(path, dtype=torch.long)]).to(device)
                    for layer in cache.layers:
                        layer.keys = layer.keys.index_select(-2, keep)
                        layer.values = layer.values.index_select(-2, keep)
                if capture.layers:
                    rows = torch.cat([torch.arange(pending), pending + torch.tensor(path, dtype=torch.long)])
                    unseen.append({i: capture.captured[i][0].index_select(0, rows.to(device))
                                   for i in capture.layers})
                capture.captured = {}

                new = [dtokens[c] for c in path] + [bonus]
                new = new[:remaining]
                stop = None
                for j, t in enumerate(new):
                    if t in eos:
                        new = new[:j + 1]
                        stop = "eos"
                        break
                buf[length:length + len(new)] = torch.tensor(new, dtype=torch.long)
                cached = length + m  # everything but the bonus token went through the target
                length += len(new)
                t2 = time.perf_counter()
                verify_time += t2 - t1
                offered = m + (1 if kids[path[-1] if path else -1] else 0)
                if policy is not None and res.steps > 0:
                    policy.observe(k_chosen, n, m, offered, t1 - t0, t2 - t1)

                res.steps += 1
                res.accepted_per_step.append(len(new))
                res.draft_accepted_per_step.append(m)
                res.draft_offered_per_step.append(offered)
                res.draft_size_per_step.append(n)
                if stop is None and length - plen >= max_new_tokens:
                    stop = "length"
                if stop is not None:
                    res.stop_reason = stop
                    break
        finally:
            capture.remove()
        res.tokens = buf[plen:length].tolist()
        res.draft_time, res.verify_time = draft_time, verify_time
        res.wall_time = time.perf_counter() - t_start
        return res
