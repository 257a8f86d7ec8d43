"""CTC drafter: several output slots over the draft vocabulary plus a dedicated blank, one pass.

Paper: Wen, Gui, Feng, "Speculative Decoding with CTC-based Draft Model for LLM Inference
Acceleration", NeurIPS 2024, arXiv 2412.00061 (docs/papers.md#ctc). The paper describes a parallel
attention draft module trained with a sequence-level CTC loss; its released code drafts
autoregressively with an EAGLE-1 body and adds the CTC term to EAGLE-1's losses (../FAMILIES.md B).
This module follows the paper's non-autoregressive idea on top of the released code's body:

    body   EAGLE-1 (fc 2H->H with bias over concat(E(x_{t+1}), f_t), causal Llama decoder layer(s),
           the shared layers of drafters/layers.py), f_t = the target's final-normed top feature;
           drafter index t reads (f_t, x_{t+1}) and its output o_t stands for position t+1.
    slots  S = `ctc_frames` slots o_t + SiLU(W_s o_t + b_s) + slot_embed[s] (per-slot ResBlocks, W_s
           zero-initialised), one bidirectional DraftDecoderLayer over the
           S slots of each position (the "attention draft module"), then logits over the draft
           vocabulary (the target's frozen LM-head rows, as EAGLE-1) plus one learned blank row:
           blank id = Vd (the draft vocabulary size, = V for the full vocabulary). Id 0 is a real
           token on SmolLM2 (<|endoftext|>) and is never used as the blank.
    loss   ctc_weight * CTC(slots of index t -> the target's greedy next tokens at t+1..t+L)
           + EAGLE-1 terms on o_t: feature_loss_weight * SmoothL1(o_t, f_{t+1})
           + token_loss_weight * KL(target_{t+1} || head(o_t)), all summed over loss tokens.
           L = `ctc_label_len`, cut at the end of the assistant span and at the first token outside
           the draft vocabulary (the drafter cannot emit it).
    draft  one body step for the newly accepted tokens (KV cache), one slot pass: CTC prefix beam
           search over the S frames (repeats merged, blanks removed) gives candidate drafts, the
           best `num_candidates` are merged into a trie for the shared tree verifier. Blanks never
           reach the verifier. Drafts are deterministic (top beams), so DraftTree.probs is None and
           the verifier's one-hot rejection rule keeps sampling lossless.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from specdistill import losses
from specdistill.drafters.base import Drafter, DrafterSpec, LossOutput, register
from specdistill.drafters.eagle_proposer import EagleProposer
from specdistill.drafters.layers import DraftDecoderLayer, draft_llama_config, rms_norm
from specdistill.drafters.vocab_map import DraftVocabulary
from specdistill.errors import ConfigError
from specdistill.verify.proposer import DraftTree, ProposerOptions, ProposerState

log = logging.getLogger(__name__)


@dataclass
class CtcConfig:
    name: str = "ctc"
    """Registry key of the family."""
    layer_ids: list[int] = field(default_factory=list)
    """The one target feature read (targets.py convention); empty = [N], the final-normed top state."""
    ctc_frames: int = 6
    """Output slots (CTC frames) per position; a draft has at most this many tokens (released code: 6)."""
    ctc_label_len: int = 3
    """Target tokens each position's slots are trained to emit (released code --fixlen 3)."""
    ctc_weight: float = 1.0
    """Weight of the CTC term (released code 0.01, where the EAGLE-1 head drafts; here the slots draft)."""
    feature_loss_weight: float = 1.0
    """EAGLE-1 smooth-L1 regression of o_t to f_{t+1} (0 = off)."""
    token_loss_weight: float = 0.1
    """EAGLE-1 forward KL of head(o_t) to the target's next-token distribution (0 = off)."""
    draft_vocab_size: int = 0
    """Draft vocabulary size Vd (the blank is id Vd); 0 = the full target vocabulary (blank = V)."""
    num_layers: int = 1
    """Causal body layers (EAGLE-1: 1)."""
    slot_layers: int = 1
    """Bidirectional layers over the slots of one position."""
    intermediate_size: int = 0
    """MLP width of the draft layers; 0 = the target's."""
    feature_noise: float = 0.0
    """Half-width of uniform noise on the input features while training (EAGLE-1: 0.1)."""
    max_ctc_positions: int = 0
    """Positions per micro-batch the CTC term runs on (evenly spaced, sum rescaled); 0 = all."""
    beam_width: int = 8
    """CTC prefix beam search width at drafting time."""
    frame_topk: int = 4
    """Non-blank tokens per frame the beam search extends with."""
    num_candidates: int = 4
    """Collapsed candidate drafts merged into the tree (1 = a chain)."""
    min_candidate_prob: float = 1e-3
    """Candidates whose CTC probability is below this are not drafted (eval's confidence threshold wins)."""

    def __post_init__(self):
        for key in ("ctc_frames", "ctc_label_len", "num_layers", "slot_layers", "beam_width", "frame_topk",
                    "num_candidates"):
            if getattr(self, key) < 1:
                raise ConfigError(f"drafter.{key} ({getattr(self, key)}) must be >= 1")
        for key in ("draft_vocab_size", "intermediate_size", "max_ctc_positions"):
            if getattr(self, key) < 0:
                raise ConfigError(f"drafter.{key} ({getattr(self, key)}) must be >= 0")
        for key in ("ctc_weight", "feature_loss_weight", "token_loss_weight", "feature_noise"):
            if getattr(self, key) < 0:
                raise ConfigError(f"drafter.{key} ({getattr(self, key)}) must be >= 0")
        if not 0.0 <= self.min_candidate_prob < 1.0:
            raise ConfigError(f"drafter.min_candidate_prob ({self.min_candidate_prob}) must be in [0, 1)")
        if self.ctc_label_len > self.ctc_frames:
            raise ConfigError(f"drafter.ctc_label_len ({self.ctc_label_len}) must be <= drafter.ctc_frames "
                              f"({self.ctc_frames}): CTC emits at most one token per frame")
        if len(self.layer_ids) > 1 or any(i < 0 for i in self.layer_ids):
            raise ConfigError(f"drafter.layer_ids ({self.layer_ids}) must name at most one layer id >= 0")

    def resolved_layer_ids(self, num_target_layers: int) -> list[int]:
        ids = list(self.layer_ids) or [num_target_layers]
        if not 0 <= ids[0] <= num_target_layers:
            raise ConfigError(f"drafter.layer_ids {ids} out of range for a {num_target_layers}-layer target "
                              f"(valid 0..{num_target_layers}, targets.py convention)")
        return ids


# ---------------------------------------------------------------------------------------------
# CTC decoding helpers (pure functions, tested on hand-written sequences)


def ctc_collapse(frames, blank: int) -> list[int]:
    """CTC's many-to-one map: merge runs of equal frames, then drop blanks ([a a - a b b] -> [a a b])."""
    out: list[int] = []
    prev = None
    for f in (int(x) for x in frames):
        if f != prev and f != blank:
            out.append(f)
        prev = f
    return out


def ctc_prefix_beam_search(logp: torch.Tensor, blank: int, beam_width: int = 8,
                           frame_topk: int = 4) -> list[tuple[tuple[int, ...], float]]:
    """CTC prefix beam search over (S, C) frame log-probs: the collapsed sequences with the highest
    probability sum over their alignments, as [(tokens, log-prob)], best first, ties by tokens.

    Each frame extends a beam with the blank and its `frame_topk` best non-blank classes; a beam keeps
    (P ending in blank, P ending in its last token) so `a - a` and `a a` are told apart. With
    beam_width and frame_topk large enough it is exact (tested against enumerating all alignments).
    """
    s_len, c = logp.shape
    lp = logp.double().cpu()
    k = min(frame_topk, c - 1)
    masked = lp.clone()
    masked[:, blank] = -math.inf
    top = masked.topk(k, -1).indices.tolist()
    lp_list = lp.tolist()
    ninf = -math.inf

    def lse(a, b):
        if a == ninf:
            return b
        if b == ninf:
            return a
        m = max(a, b)
        return m + math.log(math.exp(a - m) + math.exp(b - m))

    beams: dict[tuple[int, ...], list[float]] = {(): [0.0, ninf]}  # prefix -> [log P_blank, log P_token]
    for s in range(s_len):
        row = lp_list[s]
        nxt: dict[tuple[int, ...], list[float]] = {}

        def add(prefix, which, v, nxt=nxt):
            cell = nxt.setdefault(prefix, [ninf, ninf])
            cell[which] = lse(cell[which], v)

        for prefix, (pb, pn) in beams.items():
            tot = lse(pb, pn)
            add(prefix, 0, tot + row[blank])
            for tok in top[s]:
                v = row[tok]
                if prefix and prefix[-1] == tok:
                    add(prefix + (tok,), 1, pb + v)  # a new token only after a blank
                    add(prefix, 1, pn + v)  # the run of the last token continues
                else:
                    add(prefix + (tok,), 1, tot + v)
        ranked = sorted(((p, v) for p, v in nxt.items() if lse(*v) > ninf), key=lambda kv: (-lse(*kv[1]), kv[0]))
        beams = dict(ranked[:beam_width])
    out = [(p, lse(*v)) for p, v in beams.items()]
    return sorted(out, key=lambda x: (-x[1], x[0]))


def merge_candidates(candidates, budget: int, max_depth: int) -> tuple[list[int], list[int]]:
    """Merge candidate drafts (token tuples, best first) into one trie, nodes in insertion order
    (parents before children), at most `budget` nodes and `max_depth` tokens per path.

    Returns (tokens, parents) with parents[i] = -1 for children of the root. A shared prefix becomes
    one path, so the verifier never sees two siblings with the same token. Deterministic: the order
    of `candidates` alone fixes the tree."""
    tokens: list[int] = []
    parents: list[int] = []
    child: dict[tuple[int, int], int] = {}
    for cand in candidates:
        node = -1
        for tok in list(cand)[:max_depth]:
            key = (node, int(tok))
            if key not in child:
                if len(tokens) >= budget:
                    break
                child[key] = len(tokens)
                tokens.append(int(tok))
                parents.append(node)
            node = child[key]
    return tokens, parents


# ---------------------------------------------------------------------------------------------
# The drafter


class CtcDrafter(DraftVocabulary, Drafter):
    """EAGLE-1 body + CTC slots (module docstring). Target weights are held outside the module tree."""

    def __init__(self, cfg: CtcConfig, target):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.cfg = cfg
        n, h, v = target.num_layers, target.hidden_size, target.vocab_size
        self.layer_ids = cfg.resolved_layer_ids(n)
        self.num_target_layers = n
        self.vocab_size = v
        self.draft_vocab_size = cfg.draft_vocab_size or v
        if self.draft_vocab_size > v:
            raise ConfigError(f"drafter.draft_vocab_size ({cfg.draft_vocab_size}) exceeds the target vocabulary ({v})")
        self.blank_id = self.draft_vocab_size
        lc = draft_llama_config(target.config, max(cfg.num_layers, cfg.slot_layers), cfg.intermediate_size)
        self.llama_config = lc
        self.eps = lc.rms_norm_eps  # read by EagleProposer's drafting kernels
        self.fc = nn.Linear(2 * h, h, bias=True)
        self.midlayer = DraftDecoderLayer(lc, fused=False, input_norm=False)
        self.layers = nn.ModuleList([DraftDecoderLayer(lc, fused=False, input_norm=True)
                                     for _ in range(cfg.num_layers - 1)])
        self.slot_embed = nn.Parameter(torch.zeros(cfg.ctc_frames, h))
        # Per-slot ResBlocks (W zero-initialised): slot s reads o_t through its own H x H map, so frames
        # separate at the speed of a matrix, not of an (S, H) offset (which barely moves in few steps).
        self.slot_proj = nn.Parameter(torch.zeros(cfg.ctc_frames, h, h))
        self.slot_proj_bias = nn.Parameter(torch.zeros(cfg.ctc_frames, h))
        self.slot_layers = nn.ModuleList([DraftDecoderLayer(lc, fused=False, input_norm=True)
                                          for _ in range(cfg.slot_layers)])
        self.blank_weight = nn.Parameter(torch.zeros(h))
        self.blank_bias = nn.Parameter(torch.zeros(1))
        self.rotary = LlamaRotaryEmbedding(lc)
        self._hold_target_tensors(embed=target.embed_tokens.weight, norm=target.final_norm.weight,
                                  head=target.lm_head.weight)
        self.target_norm_eps = float(getattr(target.final_norm, "variance_epsilon", lc.rms_norm_eps))
        self._init_draft_vocabulary(v, self.draft_vocab_size)
        std = getattr(lc, "initializer_range", 0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.slot_embed, std=std)

    # -- forward pieces (EagleProposer drives the body through these names) --------------------

    def target_features(self, hidden_states: dict[int, torch.Tensor]) -> torch.Tensor:
        lid = self.layer_ids[0]
        if lid not in hidden_states:
            raise KeyError(f"target hidden states for layer id {lid} are missing (drafter needs {self.layer_ids})")
        f = hidden_states[lid]
        return rms_norm(f, self._frozen["norm"], self.target_norm_eps) if lid == self.num_target_layers else f

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self._frozen["embed"])

    def step_input(self, features: torch.Tensor, embed: torch.Tensor, step: int = 0) -> torch.Tensor:
        return self.fc(torch.cat([embed.to(features.dtype), features], -1))

    def layers_forward(self, hidden, embed, positions, past, mask=None, causal=False):
        """The causal body. past: per layer (K, V) or None. Returns (out, new per-layer (K, V))."""
        cos, sin = self.rotary(hidden, positions)
        hidden, k, v = self.midlayer(hidden, None, cos, sin, *(past[0] if past else (None, None)), mask, causal)
        new = [(k, v)]
        for i, layer in enumerate(self.layers, 1):
            hidden, k, v = layer(hidden, None, cos, sin, *(past[i] if past else (None, None)), mask, causal)
            new.append((k, v))
        return hidden, new

    def token_logits(self, out: torch.Tensor) -> torch.Tensor:
        """EAGLE-1 head on the body output: logits over the draft vocabulary (no blank)."""
        w = self.head_rows()
        return F.linear(out, w.to(out.dtype) if not torch.is_autocast_enabled() else w)

    def slot_logits(self, out: torch.Tensor) -> torch.Tensor:
        """(N, H) body outputs -> (N, S, Vd + 1) slot logits; the last class is the blank."""
        w = self.slot_proj if torch.is_autocast_enabled() else self.slot_proj.to(out.dtype)
        z = torch.einsum("nh,skh->nsk", out, w) + self.slot_proj_bias.to(out.dtype)
        x = out[:, None, :] + F.silu(z).to(out.dtype) + self.slot_embed.to(out.dtype)[None]
        pos = torch.arange(x.shape[1], device=x.device)[None]
        cos, sin = self.rotary(x, pos)
        for layer in self.slot_layers:
            x, _, _ = layer(x, None, cos, sin)  # bidirectional over the slots of one position
        tok = self.token_logits(x)
        blank = (x * self.blank_weight.to(x.dtype)).sum(-1, keepdim=True) + self.blank_bias.to(x.dtype)
        return torch.cat([tok, blank.to(tok.dtype)], -1)

    # -- Drafter contract ------------------------------------------------------------------------

    @staticmethod
    def num_loss_tokens(batch) -> torch.Tensor:
        """Assistant tokens with two earlier positions (feature f_t and token x_{t+1}), as EAGLE-1."""
        return batch["loss_mask"][:, 2:].sum()

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: t.detach() for k, t in self.state_dict().items()}

    def export_info(self) -> dict:
        return {
            "variant": "", "layer_ids": [int(i) for i in self.layer_ids],
            "num_target_layers": int(self.num_target_layers), "vocab_size": int(self.vocab_size),
            "draft_vocab_size": int(self.draft_vocab_size), "blank_id": int(self.blank_id),
            "ctc_frames": int(self.cfg.ctc_frames),
            "engine_note": "no serving engine implements CTC drafters: native export only",
        }

    def proposer(self, target=None, options: ProposerOptions | None = None, **overrides) -> CtcProposer:
        """Options: no tree = the family's drafting, `drafter.num_candidates` candidates merged into a trie,
        depth num_draft_tokens; tree widths = product-of-widths candidates, depth len(tree), budget as
        EAGLE's mapping (so `--tree 1,1,1,1` is a chain of the best candidate)."""
        args: dict = {}
        if options is not None:
            if options.tree:
                widths = [int(b) for b in options.tree]
                budget, width = 0, 1
                for b in widths:
                    width *= b
                    budget += width
                args.update(num_candidates=width, depth=len(widths), budget=budget)
            else:
                args.update(depth=int(options.num_draft_tokens))
            if options.confidence_threshold:
                args["min_prob"] = float(options.confidence_threshold)
        args.update(overrides)
        return CtcProposer(self, **args)

    # -- training ------------------------------------------------------------------------------

    def loss(self, batch: dict, target_out) -> LossOutput:
        """Sum over loss positions of ctc_weight * CTC + feature and token terms (module docstring)."""
        self._check_ready()
        cfg = self.cfg
        ids, lmask = batch["input_ids"], batch["loss_mask"]
        bsz, t = ids.shape
        if t < 3:
            raise ValueError(f"the CTC drafter needs sequences of >= 3 tokens, got {t}")
        feats_all = self.target_features(target_out.hidden_states)
        feats = feats_all[:, : t - 1]
        if cfg.feature_noise > 0 and self.training:
            feats = feats + torch.empty_like(feats).uniform_(-cfg.feature_noise, cfg.feature_noise)
        # Loss positions p (the target at p predicts assistant token p+1); drafter index p-1 stands for p.
        sel = lmask[:, 1:].bool().clone()
        sel[:, 0] = False
        b, p = sel.nonzero(as_tuple=True)
        n0 = int(b.numel())
        emb = self.embed(ids[:, 1:])
        x = self.step_input(feats, emb)
        pos = torch.arange(t - 1, device=ids.device)[None].expand(bsz, t - 1)
        out, _ = self.layers_forward(x, emb, pos, None, causal=True)
        total = out.sum() * 0.0
        if n0 == 0:
            return LossOutput(total, 0, {})
        o = out[b, p - 1]  # (N, H)
        # The target's full-vocabulary logits at the loss positions (fp32, no grad): labels are its argmax.
        with torch.no_grad(), torch.autocast(ids.device.type, enabled=False):
            last = target_out.last_hidden[b, p] if target_out.last_hidden is not None else \
                rms_norm(target_out.hidden_states[self.num_target_layers][b, p], self._frozen["norm"],
                         self.target_norm_eps)
            head = self._frozen["head"].float()
            top = torch.cat([F.linear(c.float(), head).argmax(-1) for c in last.split(512)])
        metrics: dict[str, torch.Tensor] = {}
        if cfg.token_loss_weight > 0:
            with torch.no_grad(), torch.autocast(ids.device.type, enabled=False):
                t_logp = F.log_softmax(F.linear(last.float(), self.head_rows().float()), -1)
                t_prob = t_logp.exp()
                t_negent = (t_prob * t_logp).sum(-1)
            lt, pred = losses.forward_kl_chunked(self.token_logits(o), t_prob, t_negent)
            lt = lt.sum()
            total = total + cfg.token_loss_weight * lt
            metrics["loss_token"] = lt.detach()
            metrics["correct_eagle_head"] = (self.draft_ids[pred] == top).sum()
        if cfg.feature_loss_weight > 0:
            lf = losses.feature_regression(o, feats_all[b, p].detach().float())
            total = total + cfg.feature_loss_weight * lf
            metrics["loss_feature"] = lf.detach()
        if cfg.ctc_weight > 0:
            lc, m = self._ctc_term(o, b, p, top, lmask, t)
            total = total + cfg.ctc_weight * lc
            metrics.update(m)
        return LossOutput(total, n0, metrics)

    def _ctc_term(self, o, b, p, top, lmask, t):
        """CTC of each position's slots against the target's next L greedy tokens (sum, rescaled when
        only `max_ctc_positions` evenly spaced positions are run)."""
        cfg = self.cfg
        L = cfg.ctc_label_len
        bsz = lmask.shape[0]
        table = torch.full((bsz, t - 1 + L), -1, dtype=torch.int64, device=o.device)
        table[b, p] = self.to_draft_ids(top)  # -1 = outside the draft vocabulary
        window = p[:, None] + torch.arange(L, device=o.device)[None]
        lab = table[b[:, None], window]  # (N, L): positions p..p+L-1, -1 past the assistant span
        valid = (lab >= 0).long().cumprod(1)
        lengths = valid.sum(1)
        keep = (lengths > 0).nonzero(as_tuple=True)[0]
        n_all = int(keep.numel())
        if n_all == 0:
            return o.sum() * 0.0, {}
        if cfg.max_ctc_positions and n_all > cfg.max_ctc_positions:
            keep = keep[torch.linspace(0, n_all - 1, cfg.max_ctc_positions, device=o.device).round().long()]
        logits = self.slot_logits(o[keep])  # (n, S, Vd + 1)
        logp = F.log_softmax(logits.float(), -1)
        labels = (lab[keep] * valid[keep]).clamp_min(0)
        s = cfg.ctc_frames
        n = int(keep.numel())
        lc = losses.ctc(logp.transpose(0, 1), labels, torch.full((n,), s, dtype=torch.long),
                        lengths[keep].cpu(), blank=self.blank_id, reduction="sum")
        lc = lc * (n_all / n)
        with torch.no_grad():
            best = logp.argmax(-1)  # best path (n, S)
            nonblank = best != self.blank_id
            first = best.gather(1, nonblank.long().argmax(1, keepdim=True))[:, 0]
            correct = (nonblank.any(1) & (first == labels[:, 0])).sum() * (n_all / n)
            blanks = (~nonblank).float().mean(1).sum() * (n_all / n)
        return lc, {"loss_ctc": lc.detach(), "correct_ctc_first": correct, "blank_fraction": blanks}


# ---------------------------------------------------------------------------------------------
# Drafting


class CtcProposer(EagleProposer):
    """Body KV cache and target-feature commits as EagleProposer; one slot pass per draft, candidate
    drafts from CTC prefix beam search, merged into a trie (module docstring)."""

    def __init__(self, drafter: CtcDrafter, num_candidates: int | None = None, depth: int | None = None,
                 budget: int = 0, beam_width: int | None = None, frame_topk: int | None = None,
                 min_prob: float | None = None, dtype: str = "auto"):
        cfg = drafter.cfg
        super().__init__(drafter, mode="chain", k=1, dtype=dtype)
        self.num_candidates = num_candidates or cfg.num_candidates
        self.depth = min(depth or cfg.ctc_frames, cfg.ctc_frames)
        self.budget = budget or self.num_candidates * self.depth
        self.beam_width = max(beam_width or cfg.beam_width, self.num_candidates)
        self.frame_topk = frame_topk or cfg.frame_topk
        min_prob = cfg.min_candidate_prob if min_prob is None else min_prob
        if not 0.0 <= min_prob < 1.0:
            raise ValueError(f"CtcProposer min_prob ({min_prob}) must be in [0, 1)")
        self.min_logp = math.log(min_prob) if min_prob > 0 else -math.inf
        self.blank_id = drafter.blank_id
        self.last_candidates: list[tuple[tuple[int, ...], float]] = []

    def candidates(self) -> list[tuple[tuple[int, ...], float]]:
        """Collapsed candidate drafts (draft ids, log-prob) from the slots at the last committed index."""
        d = self.drafter
        logits = d.slot_logits(self.last_out[None])[0]
        lp = F.log_softmax(logits.float(), -1)
        beams = ctc_prefix_beam_search(lp, self.blank_id, self.beam_width, self.frame_topk)
        return [(c, s) for c, s in beams if c and s >= self.min_logp][: self.num_candidates]

    @torch.no_grad()
    def propose(self, state: ProposerState) -> DraftTree:
        self._commit(state)
        if self.last_out is None:
            return DraftTree.empty()
        cands = self.candidates()
        self.last_candidates = cands
        depth = self.depth if state.max_depth is None else min(self.depth, state.max_depth)
        toks, parents = merge_candidates([c for c, _ in cands], self.budget, depth)
        if not toks:
            return DraftTree.empty()
        ids = torch.tensor(toks, dtype=torch.long)
        if bool((ids >= self.blank_id).any()):
            raise AssertionError("CtcProposer: a blank reached the draft tree")
        tokens = (ids + self.drafter.d2t.cpu()[ids]).cpu()
        return DraftTree(tokens, torch.tensor(parents, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# Registration


def _target_layers(cfg: CtcConfig, target_config) -> list[int]:
    return cfg.resolved_layer_ids(target_config.num_hidden_layers)


register(DrafterSpec(
    name="ctc",
    config_cls=CtcConfig,
    target_layers=_target_layers,
    drafter_cls=CtcDrafter,
    export_formats=("native",),
    paper="CTC drafter (Wen, Gui, Feng, NeurIPS 2024, arXiv 2412.00061)",
))
