"""Medusa heads: Medusa-1 (frozen target) and Medusa-2 (joint training with LoRA on the target).

Paper: Cai et al. 2024, arXiv 2401.10774 (docs/papers.md#medusa; /work/shared/FAMILIES.md A).

    head k (k = 1..K) reads the target's final-normed last hidden state h_t (what the LM head reads)
    z_k(t) = W_out,k . B_{k,L}( ... B_{k,1}(h_t)),   B(x) = x + SiLU(W x + b),  W zero-initialised
    head k at position t predicts x_{t+k+1}  (the target's own head at t predicts x_{t+1})

The L blocks of a head are independent modules (vLLM's layout; FasterDecoding's list
multiplication shares one block L times, FAMILIES.md A1). Only W is zeroed; b keeps PyTorch's
default init, as in the released code. The output layer of each head covers a reduced draft
vocabulary (data/vocab.py, the map EAGLE uses; vLLM calls it `token_map`) initialised from the
target LM head's rows: on SmolLM2-135M a full 49,152-row head costs ~0.21 of a target forward.

Losses (sums over loss positions; the Trainer normalises):
    medusa1:  sum_k head_loss_decay**k * CE_k                                 (target frozen)
    medusa2:  L_0 + sum_k heads_coefficient * heads_decay**k * s(t) * CE_k    (LoRA on the target)
      L_0 = CE of the adapted target's own head (base_loss=lm) or KL(p_orig || p_lora) with
      p_orig from the target with its adapters disabled (base_loss=self_distill); s(t) the ramp.
CE_k is against the hard label x_{t+k+1} (labels=hard) or against the target's distribution at
t+k renormalised over the draft vocabulary (labels=soft, as Hydra trains).

The ramp needs the optimisation step, which the Trainer does not pass to `loss`: the drafter keeps
`train_step`, a persistent buffer incremented on every training-mode `loss` call (one per
micro-batch), so a resumed run continues the ramp exactly. `ramp_steps` therefore counts loss
calls; the recipe sets it to train.max_steps * train.grad_accum when left at 0.

Hydra (variant=hydra, Ankner et al. 2024, arXiv 2402.05109): head k reads concat(h_t, E(x_{t+1}), ...,
E(x_{t+k})) ((k+1)H wide, E = the target's frozen embedding); its first block maps it to H with a learned
linear residual, y = R in + SiLU(W in + b) (R starts as the identity on h_t, W at zero), then L-1
ResBlocks. Training is teacher-forced on the data's tokens; drafting is sequential down the tree (a
node's head reads its ancestors' tokens). Hydra++'s prefix decoder layer is not built.

Held-out accuracies per head and rank (FAMILIES.md A5) are counted on every validation pass
(eval-mode `loss` calls; the counts of the latest pass are kept, persisted with the weights) or by
`measure_accuracy`; the static sparse tree is built from them (`sparse_tree`).
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
from specdistill.drafters.layers import rms_norm
from specdistill.drafters.vocab_map import DraftVocabulary
from specdistill.errors import ConfigError
from specdistill.verify import sampling
from specdistill.verify.proposer import DraftTree, Proposer, ProposerOptions, ProposerState

log = logging.getLogger(__name__)

VARIANTS = ("medusa1", "medusa2", "hydra")
AUTO_VOCAB = 8192  # reduced head vocabulary on targets with a larger vocabulary (drafter.draft_vocab_size=-1)


@dataclass
class MedusaConfig:
    name: str = "medusa"
    """Registry key of the family."""
    variant: str = "medusa1"
    """medusa1 (target frozen), medusa2 (LoRA on the target, trained jointly) or hydra (heads also read the
    embeddings of the earlier tokens of the draft, Hydra arXiv 2402.05109; target frozen, native export only)."""
    num_heads: int = 4
    """K heads; head k predicts the token k+1 positions ahead."""
    num_layers: int = 1
    """Independent ResBlocks per head (every released config uses 1)."""
    draft_vocab_size: int = -1
    """Rows of each head's output layer: -1 = auto (8192 when the target's vocabulary is larger, else full),
    0 = the full target vocabulary, n = the n most frequent label tokens (data/vocab.py)."""
    labels: str = "hard"
    """hard: CE against the next tokens; soft: CE against the target's distribution (Hydra)."""
    head_loss_decay: float = 0.8
    """medusa1: head k's CE weighted head_loss_decay**k (1.0 reproduces the legacy trainer)."""
    heads_coefficient: float = 0.2
    """medusa2: c, the heads' weight relative to L_0 (AXO: 0.2 two-stage, 0.01 joint from scratch)."""
    heads_decay: float = 0.8
    """medusa2: gamma, head k weighted gamma**k."""
    ramp: str = "sine"
    """medusa2: s(t) = sine sin(pi/2 t/T) | linear t/T | constant 1."""
    ramp_steps: int = 0
    """medusa2: T of the ramp in loss calls (micro-batches); 0 = constant until the recipe sets it."""
    base_loss: str = "self_distill"
    """medusa2: L_0 = lm (CE of the adapted target's head) | self_distill (KL to the original target)."""
    heads_lr_scale: float = 4.0
    """medusa2: the heads' learning rate as a multiple of train.lr (the adapters run at train.lr; AXO x4)."""
    lora_rank: int = 32
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"])
    """medusa2: target modules of the LoRA adapters (AXO also adapts lm_head; a tied head is left alone here)."""
    init_from_target: bool = True
    """Initialise each head's output layer from the target LM head's rows (Medusa v0.1)."""
    draft_mode: str = "tree"
    """Proposer when the verifier gives no --tree: tree (static sparse tree) or chain (top-1 per head)."""
    tree_budget: int = 16
    """Nodes of the static sparse tree (the paper's 63 is sized for a GPU; measure the verify cost here)."""
    tree_max_depth: int = 0
    """Deepest tree level; 0 = num_heads."""
    tree_max_child: int = 10
    """Ranks considered per head (TOPK of the released code)."""
    draft_dtype: str = "float32"
    """Dtype the proposer runs the heads in: float32, bfloat16 (a frozen copy; a draft step is memory-bound, so
    bf16 roughly halves it on CPUs with AVX512-BF16) or auto (bf16 where the CPU has native bf16)."""

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ConfigError(f"drafter.variant ({self.variant!r}) must be one of {', '.join(VARIANTS)}")
        if self.num_heads < 1 or self.num_layers < 1:
            raise ConfigError(f"drafter.num_heads ({self.num_heads}) and drafter.num_layers ({self.num_layers}) "
                              "must be >= 1")
        if self.draft_vocab_size < -1:
            raise ConfigError(f"drafter.draft_vocab_size ({self.draft_vocab_size}) must be -1 (auto), 0 or > 0")
        for key, allowed in (("labels", ("hard", "soft")), ("ramp", ("sine", "linear", "constant")),
                             ("base_loss", ("lm", "self_distill")), ("draft_mode", ("tree", "chain"))):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"drafter.{key} ({getattr(self, key)!r}) must be one of {', '.join(allowed)}")
        for key in ("head_loss_decay", "heads_decay"):
            if not 0.0 < getattr(self, key) <= 1.0:
                raise ConfigError(f"drafter.{key} ({getattr(self, key)}) must be in (0, 1]")
        if self.heads_coefficient <= 0 or self.heads_lr_scale <= 0:
            raise ConfigError("drafter.heads_coefficient and drafter.heads_lr_scale must be > 0")
        if self.ramp_steps < 0 or self.tree_budget < 1 or self.tree_max_depth < 0 or self.tree_max_child < 1:
            raise ConfigError("drafter.ramp_steps, tree_max_depth must be >= 0; tree_budget, tree_max_child >= 1")
        if self.draft_dtype not in ("float32", "bfloat16", "auto"):
            raise ConfigError(f"drafter.draft_dtype ({self.draft_dtype!r}) must be float32, bfloat16 or auto")
        if self.lora_rank < 1 or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"drafter.lora_rank ({self.lora_rank}) must be >= 1, lora_dropout in [0, 1)")

    def resolved_vocab(self, vocab_size: int) -> int:
        if self.draft_vocab_size == -1:
            return AUTO_VOCAB if vocab_size > AUTO_VOCAB else vocab_size
        if self.draft_vocab_size > vocab_size:
            raise ConfigError(f"drafter.draft_vocab_size ({self.draft_vocab_size}) exceeds the target vocabulary "
                              f"({vocab_size})")
        return self.draft_vocab_size or vocab_size

    def depth(self) -> int:
        return min(self.tree_max_depth or self.num_heads, self.num_heads)


# ---------------------------------------------------------------------------------------------
# The static sparse tree (FAMILIES.md A5)


def build_sparse_tree(acc: list[list[float]], budget: int, max_depth: int, max_child: int) -> list[tuple[int, ...]]:
    """Greedy expected-acceptance tree: paths (r_1, ..., r_d), r_i the rank of head i's token.

    E(path) = prod_i acc[i][r_i]. Starting from {(0,)}, repeatedly add the best candidate among each
    chosen node's next sibling (r_d + 1 < max_child) and first child (d < max_depth) until `budget`
    nodes. Ties go to the lexicographically smaller path, so the result is deterministic. Returned in
    topological order (by depth, then path)."""
    depth = min(max_depth, len(acc))
    if budget < 1 or depth < 1:
        return []
    width = min(max_child, min(len(a) for a in acc[:depth]))

    def value(path):
        return math.prod(acc[i][r] for i, r in enumerate(path))

    chosen = [(0,)]
    taken = {(0,)}
    while len(chosen) < budget:
        cands = set()
        for p in chosen:
            if p[-1] + 1 < width:
                cands.add(p[:-1] + (p[-1] + 1,))
            if len(p) < depth:
                cands.add(p + (0,))
        cands -= taken
        if not cands:
            break
        best = min(cands, key=lambda p: (-value(p), p))
        chosen.append(best)
        taken.add(best)
    return sorted(chosen, key=lambda p: (len(p), p))


def default_accuracy(num_heads: int, topk: int) -> list[list[float]]:
    """Prior used before any held-out measurement: acc[k][r] = 0.6**(k+1) / (r+1) (decays with head and rank)."""
    return [[0.6 ** (k + 1) / (r + 1) for r in range(topk)] for k in range(num_heads)]


# ---------------------------------------------------------------------------------------------
# The drafter


class MedusaDrafter(DraftVocabulary, Drafter):
    """K Medusa heads (module docstring). Target tensors are held outside the module tree (no copy)."""

    def __init__(self, cfg: MedusaConfig, target):
        super().__init__()
        self.cfg = cfg
        h, v = target.hidden_size, target.vocab_size
        self.hidden_size, self.vocab_size = h, v
        self.num_target_layers = target.num_layers
        self.draft_vocab_size = cfg.resolved_vocab(v)
        vd, k = self.draft_vocab_size, cfg.num_heads
        # blocks.{k}.layers.{l}.{weight,bias} and lm_heads.{k}.weight: vLLM MedusaModel's own names.
        self.blocks = nn.ModuleList([nn.Module() for _ in range(k)])
        for blk in self.blocks:
            blk.layers = nn.ModuleList([nn.Linear(h, h, bias=True) for _ in range(cfg.num_layers)])
            for lin in blk.layers:
                nn.init.zeros_(lin.weight)  # the bias keeps its default init (FAMILIES.md D5.1)
        if cfg.variant == "hydra":  # head k0 (0-based) reads (k0 + 2) H features: h_t and k0 + 1 embeddings
            for k0, blk in enumerate(self.blocks):
                blk.layers[0] = nn.Linear((k0 + 2) * h, h, bias=True)
                nn.init.zeros_(blk.layers[0].weight)
                blk.res = nn.Linear((k0 + 2) * h, h, bias=False)
                with torch.no_grad():
                    blk.res.weight.zero_()
                    blk.res.weight[:, :h].copy_(torch.eye(h))
        self.lm_heads = nn.ModuleList([nn.Linear(h, vd, bias=False) for _ in range(k)])
        self._target = [target]  # a list: the target is not a submodule of the drafter
        self._hold_target_tensors(head=target.lm_head.weight, norm=target.final_norm.weight,
                                  embed=target.embed_tokens.weight)
        self.target_norm_eps = float(getattr(target.final_norm, "variance_epsilon", 1e-5))
        self._init_draft_vocabulary(v, vd)
        # Ramp step (medusa2) and held-out top-r accuracy counts (the tree's input), saved with the weights.
        self.register_buffer("train_step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("acc_counts", torch.zeros(k, cfg.tree_max_child, dtype=torch.int64))
        self.register_buffer("acc_totals", torch.zeros(k, dtype=torch.int64))
        self._counting = False  # an eval pass in progress (its counts replace the previous pass's)
        if cfg.init_from_target:
            with torch.no_grad():
                for lm in self.lm_heads:
                    lm.weight.copy_(self._frozen["head"][:vd])

    # -- vocabulary ----------------------------------------------------------------------------

    def _on_vocab_map(self) -> None:
        """The heads' rows start as the target's rows of the new head vocabulary (init_from_target)."""
        if self.cfg.init_from_target:
            with torch.no_grad():
                rows = self.head_rows()
                for lm in self.lm_heads:
                    lm.weight.copy_(rows.to(lm.weight.dtype))

    # -- forward ------------------------------------------------------------------------------

    def head_logits(self, k: int, x: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """Head k's (0-based) logits over the draft vocabulary from final-normed hidden states x (..., H).
        hydra: `prev` (..., k+1) are the target ids of the k+1 tokens after x's position (teacher-forced or drafted)."""
        layers = self.blocks[k].layers
        if self.cfg.variant == "hydra":
            if prev is None or prev.shape[-1] != k + 1:
                raise ValueError(f"hydra head {k} needs the {k + 1} earlier tokens of the draft")
            e = F.embedding(prev, self._frozen["embed"]).to(x.dtype).flatten(-2)
            inp = torch.cat([x, e], -1)
            x = self.blocks[k].res(inp) + F.silu(layers[0](inp))
            layers = layers[1:]
        for lin in layers:
            x = x + F.silu(lin(x))
        return self.lm_heads[k](x)

    def export_formats(self) -> tuple[str, ...]:
        return ("native",) if self.cfg.variant == "hydra" else tuple(self.spec.export_formats)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        """The target's final RMSNorm (what turns hidden state N into the vector its LM head reads)."""
        return rms_norm(h, self._frozen["norm"].to(h.dtype), self.target_norm_eps)

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return self.draft_ids[draft_ids]

    def ramp(self) -> float:
        cfg = self.cfg
        if cfg.ramp == "constant" or cfg.ramp_steps == 0:
            return 1.0
        frac = min(1.0, float(self.train_step) / cfg.ramp_steps)
        return math.sin(math.pi / 2 * frac) if cfg.ramp == "sine" else frac

    def head_weight(self, k: int) -> float:
        """Weight of head k's CE (1-based k) at the current step."""
        cfg = self.cfg
        if cfg.variant == "medusa1":
            return cfg.head_loss_decay ** k
        return cfg.heads_coefficient * cfg.heads_decay ** k * self.ramp()

    # -- Drafter contract -----------------------------------------------------------------------

    @staticmethod
    def num_loss_tokens(batch) -> torch.Tensor:
        """Positions p >= 1 whose next token x_{p+1} is an assistant token (head 1's count, the normaliser)."""
        return batch["loss_mask"][:, 2:].sum()

    def trainable_parameters(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.cfg.variant == "medusa2":
            return [{"params": params, "lr_scale": self.cfg.heads_lr_scale}]
        return params

    def lora_config(self):
        from peft import LoraConfig

        c = self.cfg
        return LoraConfig(r=c.lora_rank, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
                          target_modules=list(c.lora_modules))

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """vLLM MedusaModel names: blocks.{k}.layers.{l}.{weight,bias}, lm_heads.{k}.weight, token_map (reduced)."""
        sd = {k: v.detach() for k, v in self.state_dict().items() if k.startswith(("blocks.", "lm_heads."))}
        if self.draft_vocab_size < self.vocab_size:
            sd["token_map"] = self.draft_ids.detach().clone()
        return sd

    def export_info(self) -> dict:
        return {"variant": self.variant, "num_heads": int(self.cfg.num_heads), "num_layers": int(self.cfg.num_layers),
                "hidden_size": int(self.hidden_size), "vocab_size": int(self.vocab_size),
                "draft_vocab_size": int(self.draft_vocab_size), "head_accuracy": self.head_accuracy(),
                "accuracy_counts": self.acc_counts.tolist(), "accuracy_totals": self.acc_totals.tolist(),
                "tree": [list(p) for p in self.sparse_tree()]}

    def proposer(self, target=None, options: ProposerOptions | None = None, **overrides) -> MedusaProposer:
        """--tree widths -> a static sparse tree of that many nodes and depth; otherwise drafter.draft_mode
        (tree: tree_budget nodes; chain: top-1 of each head), depth capped by num_draft_tokens."""
        o = options or ProposerOptions(num_draft_tokens=self.cfg.num_heads)
        args: dict = {"temperature": o.temperature, "top_p": o.top_p, "top_k": o.top_k, "seed": o.seed}
        if o.tree:
            budget, width = 0, 1
            for b in o.tree:
                width *= int(b)
                budget += width
            args.update(mode="tree", budget=budget, depth=len(o.tree), max_child=max(int(b) for b in o.tree))
        elif self.cfg.draft_mode == "tree":
            args.update(mode="tree", budget=self.cfg.tree_budget, depth=min(self.cfg.depth(), o.num_draft_tokens),
                        max_child=self.cfg.tree_max_child)
        else:
            args.update(mode="chain", depth=min(self.cfg.num_heads, o.num_draft_tokens))
        args.update(overrides)
        return MedusaProposer(self, **args)

    # -- held-out accuracy and the tree ----------------------------------------------------------

    def head_accuracy(self) -> list[list[float]] | None:
        """acc[k][r]: fraction of held-out positions where head k+1's rank-r token is the target's greedy
        token k+1 steps later, divided by that head's true count (None before any measurement)."""
        tot = self.acc_totals.clamp_min(1).double()
        if int(self.acc_totals.min()) == 0:
            return None
        return (self.acc_counts.double() / tot[:, None]).tolist()

    def sparse_tree(self, budget: int | None = None, depth: int | None = None,
                    max_child: int | None = None) -> list[tuple[int, ...]]:
        acc = self.head_accuracy() or default_accuracy(self.cfg.num_heads, self.cfg.tree_max_child)
        return build_sparse_tree(acc, budget or self.cfg.tree_budget, depth or self.cfg.depth(),
                                 max_child or self.cfg.tree_max_child)

    def _prev(self, ids, b, t, k):
        """hydra: the target ids x_{t+1..t+k} each head-k row reads (None for Medusa heads)."""
        if self.cfg.variant != "hydra":
            return None
        return ids[b[:, None], t[:, None] + 1 + torch.arange(k, device=ids.device)]

    def _count_accuracy(self, h, b, p, greedy, ids):
        """Add top-r hits of every head at (b, p - k) against the target's greedy token at p (target id)."""
        r = self.cfg.tree_max_child
        for k in range(1, self.cfg.num_heads + 1):
            valid = p - k >= 0
            if not bool(valid.any()):
                continue
            bv, tv = b[valid], (p - k)[valid]
            z = self.head_logits(k - 1, h[bv, tv], self._prev(ids, bv, tv, k)).float()
            top = self.draft_ids[z.topk(min(r, z.shape[-1]), -1).indices]  # (n, r) target ids
            hits = (top == greedy[valid][:, None]).sum(0)
            self.acc_counts[k - 1, : hits.numel()] += hits.to(self.acc_counts.dtype)
            self.acc_totals[k - 1] += int(valid.sum())

    @torch.no_grad()
    def measure_accuracy(self, batches, target) -> list[list[float]]:
        """Held-out top-r accuracy per head over `batches` (dicts with input_ids/attention_mask/loss_mask),
        replacing the stored counts; returns head_accuracy()."""
        self.acc_counts.zero_()
        self.acc_totals.zero_()
        for batch in batches:
            out = target(batch["input_ids"], batch.get("attention_mask"), return_logits=False)
            sel = batch["loss_mask"][:, 1:].bool().clone()
            sel[:, 0] = False
            b, p = sel.nonzero(as_tuple=True)
            h = out.last_hidden.to(self.lm_heads[0].weight.dtype)
            greedy = target.lm_head(out.last_hidden[b, p]).argmax(-1)
            self._count_accuracy(h, b, p, greedy, batch["input_ids"])
        return self.head_accuracy()

    # -- training -------------------------------------------------------------------------------

    def _target_logp(self, h_rows: torch.Tensor) -> torch.Tensor:
        """The target's log-softmax over the draft vocabulary at final-normed rows (fp32, no grad)."""
        w = self._frozen["head"]
        w = w if self.draft_vocab_size == self.vocab_size else w[self.draft_ids.to(w.device)]
        with torch.no_grad(), torch.autocast(h_rows.device.type, enabled=False):
            return F.log_softmax(F.linear(h_rows.detach().float(), w.float()), -1)

    def loss(self, batch: dict, target_out) -> LossOutput:
        """Weighted head CEs (+ L_0 for medusa2) summed over loss positions p >= 1; module docstring."""
        self._check_ready()
        cfg = self.cfg
        ids, lmask = batch["input_ids"], batch["loss_mask"]
        h = target_out.last_hidden  # (B, T, H), final-normed; with grad through the adapters for medusa2
        if h is None:
            raise ValueError("MedusaDrafter.loss needs TargetOutput.last_hidden (spec target_output 'hidden')")
        if not self.training and not self._counting:  # a new validation pass: its counts replace the last
            self.acc_counts.zero_()
            self.acc_totals.zero_()
        self._counting = not self.training
        # Loss position p: the target at p predicts x_{p+1} (an assistant token); head k reads t = p - k.
        sel = lmask[:, 1:].bool().clone()
        sel[:, 0] = False
        b, p = sel.nonzero(as_tuple=True)
        n0 = int(b.numel())
        zero = sum(w.sum() for w in self.parameters()) * 0.0 + h.sum() * 0.0
        if n0 == 0:
            return LossOutput(zero, 0, {})
        label = ids[b, p + 1]
        h_dtype = self.lm_heads[0].weight.dtype if not torch.is_autocast_enabled() else h.dtype
        hd = h.to(h_dtype)
        metrics: dict[str, torch.Tensor] = {}
        t_prob = t_negent = None
        if cfg.labels == "soft":
            t_logp = self._target_logp(h[b, p])
            t_prob = t_logp.exp()
            t_negent = (t_prob * t_logp).sum(-1)
        dlabel = self.draft_index[label]
        total = zero
        for k in range(1, cfg.num_heads + 1):
            valid = p - k >= 0
            if not bool(valid.any()):
                break
            bv, tv = b[valid], (p - k)[valid]
            z = self.head_logits(k - 1, hd[bv, tv], self._prev(ids, bv, tv, k))
            if cfg.labels == "soft":
                ce, top = losses.forward_kl_chunked(z, t_prob[valid], t_negent[valid])
                ce = ce.sum()
            else:
                dl = dlabel[valid]
                inv = dl >= 0  # labels outside the draft vocabulary cannot be drafted: no gradient
                ce = F.cross_entropy(z[inv].float(), dl[inv], reduction="sum") if bool(inv.any()) else z.sum() * 0.0
                top = z.detach().argmax(-1)
            total = total + self.head_weight(k) * ce
            metrics[f"loss_head{k}"] = ce.detach()
            metrics[f"correct_head{k}"] = (self.draft_ids[top] == label[valid]).sum()
            metrics[f"tokens_head{k}"] = valid.sum()
        if cfg.variant == "medusa2":
            l0 = self._base_loss(batch, h, b, p, label)
            metrics["loss_base"] = l0.detach()
            metrics["ramp"] = torch.tensor(self.ramp() * n0)  # normalised by the token count like the rest
            total = total + l0
        if self.training:
            with torch.no_grad():
                self.train_step += 1
        else:
            with torch.no_grad():
                greedy = F.linear(h[b, p].detach().float(), self._frozen["head"].float()).argmax(-1)
                self._count_accuracy(hd.detach(), b, p, greedy, ids)
        return LossOutput(total, n0, metrics)

    def _base_loss(self, batch, h, b, p, label) -> torch.Tensor:
        """Medusa-2's L_0 at the loss positions: the adapted target's own head against the labels, or
        KL(p_orig || p_lora) to the target with its adapters disabled (self-distillation)."""
        target = self._target[0]
        z = target.lm_head(h[b, p]).float()
        if self.cfg.base_loss == "lm":
            return F.cross_entropy(z, label, reduction="sum")
        with torch.no_grad(), target.adapters_disabled():
            orig = target(batch["input_ids"], batch.get("attention_mask"), return_logits=False).last_hidden
            t_logp = F.log_softmax(target.lm_head(orig[b, p]).float(), -1)
        return losses.forward_kl(z, t_logp)


@torch.no_grad()
def target_drift(target, batches) -> float:
    """Next-token agreement (argmax) between the target with its adapters and the original target
    (adapters disabled) on the loss positions of `batches`: 1.0 = unchanged greedy behaviour."""
    same = total = 0
    for batch in batches:
        m = batch["loss_mask"][:, 1:].bool()
        now = target(batch["input_ids"], batch.get("attention_mask")).logits[:, :-1][m].argmax(-1)
        if target.has_adapters:
            with target.adapters_disabled():
                orig = target(batch["input_ids"], batch.get("attention_mask")).logits[:, :-1][m].argmax(-1)
        else:
            orig = now
        same += int((now == orig).sum())
        total += int(m.sum())
    return same / max(total, 1)


# ---------------------------------------------------------------------------------------------
# Drafting


class MedusaProposer(Proposer):
    """Medusa drafting from the target's last accepted hidden state.

    The verifier hands over hidden state N (pre-norm) of the newly accepted positions; the heads read
    the final-normed last one, position L-2, so head k's tokens are the draft at depth k below the root
    (the token at L-1). mode=chain: head k's top-1 at depth k (or, with temperature > 0, a sample from
    head k's warped distribution, recorded in DraftTree.probs so the verifier's rejection rule stays
    lossless). mode=tree: the static sparse tree of `MedusaDrafter.sparse_tree` (node (r_1..r_d) =
    head d's rank-r_d token under node (r_1..r_{d-1})); deterministic, distinct siblings, probs=None.
    hydra: the same shapes, drafted sequentially: head d reads the root and the node's ancestors' tokens.
    """

    def __init__(self, drafter: MedusaDrafter, mode: str = "tree", depth: int = 4, budget: int = 16,
                 max_child: int = 10, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, tree: list | None = None, dtype: str | None = None):
        if mode not in ("chain", "tree"):
            raise ValueError(f"MedusaProposer mode ({mode!r}) must be chain or tree")
        if depth < 1:
            raise ValueError(f"MedusaProposer depth ({depth}) must be >= 1")
        self.drafter = _drafting_copy(drafter, dtype or drafter.cfg.draft_dtype)
        self.mode, self.temperature, self.top_p, self.top_k = mode, temperature, top_p, top_k
        self.depth = min(depth, drafter.cfg.num_heads)
        self.target_layers = (drafter.num_target_layers,)
        self.generator = torch.Generator().manual_seed(seed if seed is not None else 0)
        if mode == "tree":
            paths = [tuple(p) for p in tree] if tree is not None else drafter.sparse_tree(budget, self.depth, max_child)
            index = {p: i for i, p in enumerate(paths)}
            if any(len(p) > 1 and p[:-1] not in index for p in paths):
                raise ValueError("MedusaProposer tree: every path's prefix must be in the tree")
            self.paths = paths
            self.parents = torch.tensor([index[p[:-1]] if len(p) > 1 else -1 for p in paths], dtype=torch.long)
            self.tree_depth = max(len(p) for p in paths)
            self.rank = max(max(p) for p in paths) + 1
            self.depth_index = torch.tensor([len(p) - 1 for p in paths], dtype=torch.long)
            self.rank_index = torch.tensor([p[-1] for p in paths], dtype=torch.long)

    def _head_logits(self, x: torch.Tensor, n: int) -> torch.Tensor:
        d = self.drafter
        return torch.stack([d.head_logits(k, x) for k in range(n)])  # (n, Vd)

    @torch.no_grad()
    def propose(self, state: ProposerState) -> DraftTree:
        d = self.drafter
        hid = state.hidden.get(d.num_target_layers)
        if hid is None or hid.shape[-2] == 0:
            return DraftTree.empty()
        w = d.lm_heads[0].weight
        x = d.final_norm(hid.reshape(-1, hid.shape[-1])[-1].to(w.device, w.dtype))
        if d.cfg.variant == "hydra":
            return self._hydra(x, int(state.tokens[-1]))
        if self.mode == "chain":
            z = self._head_logits(x, self.depth)
            if self.temperature <= 0:
                return DraftTree.chain(d.to_target_ids(z.argmax(-1)).cpu())
            full = torch.full((self.depth, d.vocab_size), float("-inf"))
            full[:, d.draft_ids.cpu()] = z.float().cpu()
            q = sampling.warp(full, self.temperature, self.top_p, self.top_k)
            toks = torch.multinomial(q, 1, generator=self.generator)[:, 0]
            return DraftTree.chain(toks, probs=q)
        z = self._head_logits(x, self.tree_depth)
        top = z.topk(min(self.rank, z.shape[-1]), -1).indices  # (depth, rank) draft ids
        ids = top[self.depth_index, self.rank_index.clamp_max(top.shape[-1] - 1)]
        return DraftTree(d.to_target_ids(ids).cpu(), self.parents.clone())

    def _hydra(self, x: torch.Tensor, root: int) -> DraftTree:
        d = self.drafter
        dev = x.device
        if self.mode == "chain":
            toks, rows = [root], []
            for k in range(self.depth):
                z = d.head_logits(k, x, torch.tensor(toks, device=dev))
                if self.temperature <= 0:
                    toks.append(int(d.to_target_ids(z.argmax(-1))))
                    continue
                full = torch.full((d.vocab_size,), float("-inf"))
                full[d.draft_ids.cpu()] = z.float().cpu()
                q = sampling.warp(full, self.temperature, self.top_p, self.top_k)
                rows.append(q)
                toks.append(int(torch.multinomial(q, 1, generator=self.generator)))
            return DraftTree.chain(toks[1:], probs=torch.stack(rows) if rows else None)
        tok_of: dict[tuple, int] = {}
        tops: dict[tuple, torch.Tensor] = {}
        out = []
        for path in self.paths:  # topological: a node's ancestors are drafted before it
            pre = path[:-1]
            if pre not in tops:
                prev = torch.tensor([root] + [tok_of[pre[:i + 1]] for i in range(len(pre))], device=dev)
                z = d.head_logits(len(pre), x, prev)
                tops[pre] = d.to_target_ids(z.topk(min(self.rank, z.shape[-1])).indices)
            tok_of[path] = int(tops[pre][min(path[-1], tops[pre].numel() - 1)])
            out.append(tok_of[path])
        return DraftTree(torch.tensor(out, dtype=torch.long), self.parents.clone())


def _drafting_copy(drafter: MedusaDrafter, dtype: str) -> MedusaDrafter:
    """The drafter itself (float32), or a frozen bf16 copy of its heads that shares the target (not copied)."""
    if dtype not in ("float32", "bfloat16", "auto"):
        raise ValueError(f"MedusaProposer dtype ({dtype!r}) must be float32, bfloat16 or auto")
    if dtype == "auto":
        cpu_bf16 = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
        dtype = "bfloat16" if cpu_bf16 and drafter.lm_heads[0].weight.device.type == "cpu" else "float32"
    want = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    if drafter.lm_heads[0].weight.dtype == want:
        return drafter
    import copy

    memo = {id(drafter._target): drafter._target}
    memo.update({id(t): t for t in drafter._frozen.values()})
    return copy.deepcopy(drafter, memo).to(want).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Registration


register(DrafterSpec(
    name="medusa",
    config_cls=MedusaConfig,
    drafter_cls=MedusaDrafter,
    target_output="hidden",
    trains_target=lambda cfg: cfg.variant == "medusa2",
    export_formats=("native", "vllm_medusa", "medusa_fd"),
    paper="Medusa (Cai et al. 2024, arXiv 2401.10774)",
))
