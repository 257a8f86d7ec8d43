"""EAGLE-1, EAGLE-3 and HASS feature drafters: one family, variants as config.

Papers (docs/papers.md#eagle):
- EAGLE-1, Li et al. 2024, arXiv 2401.15077: fuse the next token's embedding with the target's
  top-layer feature (fc 2H->H), one decoder layer, the target's frozen LM head; loss = smooth-L1
  feature regression (eq. 1) + cross-entropy against the target's distribution (eq. 2), weights
  1.0 and 0.1 (Sec. 4 "Training").
- EAGLE-3, Li et al. 2025, arXiv 2503.01840: fuse low/mid/high target layers (fc 3Ht->H), a decoder
  layer whose attention reads concat(norm(embed), norm(hidden)) (2H in-features), a reduced draft
  vocabulary, no feature loss, and "training-time test": the drafter is unrolled on its own outputs.
- HASS, Zhang et al. 2024, arXiv 2408.15766: harmonized objective distillation (top-K loss, eq. 4)
  and harmonized context alignment (later steps see the drafter's own earlier features). The
  alignment is the same computation as EAGLE-3's training-time test, so both share `_unroll`.

Indexing used throughout (T = sequence length, f_t = target feature at position t):
    drafter index t consumes (f_t, token x_{t+1}) and predicts the feature f_{t+1} and the token
    x_{t+2}; its label distribution is the target's at position t+1. Unrolled step j at index t
    stands for sequence position t+j: it consumes the drafter's own step-(j-1) output at index t
    and token x_{t+1+j}, and attends to the step-0 keys at indices <= t (real target features) plus
    the keys of steps 1..j at index t (the drafter's own drafts), exactly what it sees at decode time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from specdistill import losses
from specdistill.errors import ConfigError
from specdistill.drafters.base import Drafter, DrafterSpec, LossOutput, register
from specdistill.verify.proposer import DraftTree, Proposer, ProposerState

VARIANTS = ("eagle1", "eagle3")


@dataclass
class EagleConfig:
    name: str = "eagle"
    """Registry key of the family."""
    variant: str = "eagle3"
    """eagle1 (top feature, fc 2H->H, frozen target LM head) or eagle3 (3 fused layers, own LM head)."""
    layer_ids: list[int] = field(default_factory=list)
    """Target hidden states read (targets.py convention); empty = eagle3 [2, N//2, N-3], eagle1 [N]."""
    ttt_steps: int = 0
    """Training-time-test unroll length (1 = no unroll); 0 = derive: eagle3 3, eagle1 1."""
    step_loss_decay: float = 0.8
    """Unrolled step j's losses are weighted decay**j (EAGLE-3 reference training uses 0.8)."""
    hass_topk: int = 0
    """HASS top-K distillation over the target's K most likely tokens (paper: K=10); 0 = off."""
    hass_topk_weight: float = 1.0
    """Weight of the HASS top-K loss relative to the token loss."""
    hass_align_steps: int = 0
    """HASS harmonized context alignment: steps counted as HASS does (step 1 = target features only); 0 = off.

    Unroll length = max(ttt_steps, hass_align_steps): the alignment is the training-time test."""
    draft_vocab_size: int = 0
    """Draft vocabulary size Vd (EAGLE-3 uses 32000 of 128256); 0 = the full target vocabulary."""
    feature_loss_weight: float = -1.0
    """Weight of the smooth-L1 feature regression (eagle1 only); <0 = derive: eagle1 1.0, eagle3 0."""
    token_loss_weight: float = -1.0
    """Weight of the token loss against the target distribution; <0 = derive: eagle1 0.1, eagle3 1.0."""
    token_loss: str = "forward_kl"
    """Token loss: forward_kl (== soft cross-entropy up to a constant), reverse_kl, jsd or tvd."""
    num_layers: int = 1
    """Decoder layers of the drafter (EAGLE uses 1; SGLang/vLLM exports need 1)."""
    intermediate_size: int = 0
    """MLP width of the drafter layer; 0 = the target's."""
    feature_noise: float = 0.0
    """Half-width of uniform noise added to the target features while training (EAGLE-1 used 0.1)."""
    init_from_target: bool = True
    """Initialise the draft LM head (rows d2t) and final norm from the target's (eagle3)."""

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ConfigError(f"drafter.variant ({self.variant!r}) must be one of {', '.join(VARIANTS)}")
        if self.variant == "eagle3" and self.layer_ids and len(self.layer_ids) < 2:
            raise ConfigError(f"drafter.layer_ids ({self.layer_ids}) must name >= 2 layers for eagle3 (paper: 3)")
        if self.variant == "eagle1" and len(self.layer_ids) > 1:
            raise ConfigError(f"drafter.layer_ids ({self.layer_ids}) must name one layer for eagle1 (the top feature)")
        if len(set(self.layer_ids)) != len(self.layer_ids) or any(i < 0 for i in self.layer_ids):
            raise ConfigError(f"drafter.layer_ids ({self.layer_ids}) must be distinct and >= 0")
        for key in ("ttt_steps", "hass_topk", "hass_align_steps", "draft_vocab_size", "intermediate_size"):
            if getattr(self, key) < 0:
                raise ConfigError(f"drafter.{key} ({getattr(self, key)}) must be >= 0")
        if self.num_layers < 1:
            raise ConfigError(f"drafter.num_layers ({self.num_layers}) must be >= 1")
        if not 0.0 < self.step_loss_decay <= 1.0:
            raise ConfigError(f"drafter.step_loss_decay ({self.step_loss_decay}) must be in (0, 1]")
        if self.token_loss not in _TOKEN_LOSSES:
            raise ConfigError(f"drafter.token_loss ({self.token_loss!r}) must be one of {', '.join(_TOKEN_LOSSES)}")
        if self.variant == "eagle3" and self.feature_loss_weight > 0:
            raise ConfigError("drafter.feature_loss_weight must be <= 0 for eagle3: its output hidden state is not in "
                              "the target's feature space (EAGLE-3 drops the feature loss, arXiv 2503.01840 Sec. 3)")
        if self.feature_noise < 0:
            raise ConfigError(f"drafter.feature_noise ({self.feature_noise}) must be >= 0")
        if self.hass_topk_weight < 0:
            raise ConfigError(f"drafter.hass_topk_weight ({self.hass_topk_weight}) must be >= 0")

    # Derived values live in methods, not in __post_init__, so a later `variant=` override never
    # inherits the other variant's derived numbers when config.py rebuilds the dataclass.
    def unroll_steps(self) -> int:
        ttt = self.ttt_steps or (3 if self.variant == "eagle3" else 1)
        return max(ttt, self.hass_align_steps)

    def feature_weight(self) -> float:
        if self.feature_loss_weight >= 0:
            return self.feature_loss_weight
        return 1.0 if self.variant == "eagle1" else 0.0

    def token_weight(self) -> float:
        if self.token_loss_weight >= 0:
            return self.token_loss_weight
        return 0.1 if self.variant == "eagle1" else 1.0

    def resolved_layer_ids(self, num_target_layers: int) -> list[int]:
        if self.layer_ids:
            ids = list(self.layer_ids)
        else:
            n = num_target_layers
            ids = [2, n // 2, n - 3] if self.variant == "eagle3" else [n]
        bad = [i for i in ids if not 0 <= i <= num_target_layers]
        if bad:
            raise ConfigError(f"drafter.layer_ids {bad} out of range for a {num_target_layers}-layer target "
                              f"(valid 0..{num_target_layers}, targets.py convention)")
        if self.variant == "eagle3" and len(set(ids)) < len(ids):
            raise ConfigError(f"drafter.layer_ids {ids} must be distinct (a target with {num_target_layers} layers "
                              "is too shallow for the defaults; give explicit ids)")
        return ids


def _token_loss_fn(name: str):
    return {"forward_kl": losses.forward_kl, "reverse_kl": losses.reverse_kl, "jsd": losses.jsd,
            "tvd": losses.tvd}[name]


_TOKEN_LOSSES = ("forward_kl", "reverse_kl", "jsd", "tvd")


# ---------------------------------------------------------------------------------------------
# The draft decoder layer


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm with a frozen weight tensor (the target's final norm, held outside the module tree)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype) if weight.dtype == x.dtype else (weight.float() * xf).to(x.dtype)


def _draft_llama_config(tc, cfg: EagleConfig):
    """A one-layer LlamaConfig shaped like the target (the draft layer is Llama-style for any target)."""
    from transformers import LlamaConfig

    h = tc.hidden_size
    heads = tc.num_attention_heads
    rope = getattr(tc, "rope_parameters", None)
    if not isinstance(rope, dict) or "rope_type" not in rope:
        rope = {"rope_type": "default", "rope_theta": float(getattr(tc, "rope_theta", None) or 10000.0)}
    return LlamaConfig(
        hidden_size=h, intermediate_size=cfg.intermediate_size or tc.intermediate_size,
        num_attention_heads=heads, num_key_value_heads=getattr(tc, "num_key_value_heads", None) or heads,
        head_dim=getattr(tc, "head_dim", None) or h // heads, rms_norm_eps=getattr(tc, "rms_norm_eps", 1e-6),
        max_position_embeddings=getattr(tc, "max_position_embeddings", 4096),
        hidden_act=getattr(tc, "hidden_act", "silu"), rope_parameters=dict(rope), vocab_size=tc.vocab_size,
        num_hidden_layers=cfg.num_layers, attention_bias=False, mlp_bias=False,
    )


class EagleRMSNorm(nn.Module):
    """Llama RMSNorm (state-dict name `weight`) that returns the input's dtype.

    transformers' LlamaRMSNorm returns fp32 for bf16 input with an fp32 weight, which under bf16
    autocast turns the whole residual stream back into fp32 and costs a cast before every matmul.
    """

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x):
        return _rms_norm(x, self.weight, self.eps)


class EagleAttention(nn.Module):
    """GQA self-attention over an explicit key/value history, SDPA kernel, RoPE at given positions."""

    def __init__(self, lc, in_features: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = lc.num_attention_heads, lc.num_key_value_heads, lc.head_dim
        self.q_proj = nn.Linear(in_features, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(in_features, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(in_features, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, lc.hidden_size, bias=False)

    def forward(self, x, cos, sin, past_k=None, past_v=None, mask=None, causal=False):
        """x (B, n, in); cos/sin (B|1, n, d); past_k/v (B, kv, P, d); mask (n, P+n) bool, True = attend.

        Returns (out (B, n, H), k, v) with k/v (B, kv, n, d) of the new positions only.
        """
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if isinstance(past_k, tuple):  # training-time test, unrolled step >= 1 (see _ttt_attention)
            out = self._ttt_attention(q, k, v, *past_k, *past_v)
            return self.o_proj(out.transpose(1, 2).reshape(b, n, -1)), k, v
        keys = k if past_k is None else torch.cat([past_k, k.to(past_k.dtype)], 2)
        vals = v if past_v is None else torch.cat([past_v, v.to(past_v.dtype)], 2)
        keys, vals = keys.to(q.dtype), vals.to(q.dtype)
        out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, is_causal=causal and mask is None,
                                             enable_gqa=self.heads != self.kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1)), k, v

    def _ttt_attention(self, q, k, v, k0, dk, v0, dv):
        """Attention of unrolled step j >= 1 without SDPA's (T, T*(j+1)) mask.

        Query t sees the step-0 keys 0..t (causal) and, of every later step 1..j, only its own
        position t (dk/dv: (B, kv, T, j-1, d) for steps 1..j-1; k/v are step j's). So the scores are
        a causal (T, T) block plus j per-position scalars under one softmax: `_TTTAttention` runs the
        block with the flash kernel and merges the scalars through the log-sum-exp. Same value and
        gradients as SDPA over all steps' keys with that mask (tested), at about step 0's cost.
        """
        dk = k.unsqueeze(3) if dk is None else torch.cat([dk, k.unsqueeze(3).to(dk.dtype)], 3)
        dv = v.unsqueeze(3) if dv is None else torch.cat([dv, v.unsqueeze(3).to(dv.dtype)], 3)
        rep = self.heads // self.kv_heads
        if rep > 1:
            k0, v0, dk, dv = (x.repeat_interleave(rep, 1) for x in (k0, v0, dk, dv))
        k0, v0, dk, dv = (x.to(q.dtype) for x in (k0, v0, dk, dv))
        scale = self.head_dim ** -0.5
        if q.device.type == "cpu":
            return _TTTAttention.apply(q, k0, v0, dk, dv, scale)
        return _ttt_attention_materialised(q, k0, v0, dk, dv, scale)  # the flash op used is CPU-only


def _ttt_attention_materialised(q, k0, v0, dk, dv, scale):
    """The TTT attention of `_TTTAttention` with the (T, T) scores materialised: any device."""
    t = q.shape[2]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    s0 = torch.matmul(q, k0.transpose(-1, -2)).masked_fill(~causal, float("-inf"))
    sd = (q.unsqueeze(3) * dk).sum(-1)
    p = torch.softmax(torch.cat([s0, sd], -1).float() * scale, -1).to(q.dtype)
    return torch.matmul(p[..., :t], v0) + (p[..., t:].unsqueeze(-1) * dv).sum(3)


class _TTTAttention(torch.autograd.Function):
    """softmax over [causal q.k0 block | per-position q.dk_i] applied to [v0 | dv_i], i = 1..J.

    Forward: the causal block by the CPU flash kernel, which also returns its log-sum-exp lse0;
    with the J diagonal scores s_i, lse = logsumexp(lse0, s_1..s_J), and
    out = exp(lse0 - lse) * out0 + sum_i exp(s_i - lse) * dv_i.
    Backward: the flash backward given the *merged* out and lse recomputes the block's
    probabilities as exp(S - lse), which are exactly its share of the joint softmax, and uses
    D = rowsum(dO * out) of the joint softmax, so it returns the block's exact gradients; the J
    diagonal terms follow the usual softmax backward dS_i = w_i (dO . dv_i - D). All in fp32
    accumulation; tensors (B, H, T, d) and (B, H, T, J, d), heads already expanded for GQA.
    """

    @staticmethod
    def forward(ctx, q, k0, v0, dk, dv, scale):
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        o0, lse0 = flash(q, k0, v0, 0.0, True, scale=scale)
        sd = (q.unsqueeze(3) * dk).sum(-1).float() * scale  # (B, H, T, J)
        lse = torch.logsumexp(torch.cat([lse0.unsqueeze(-1), sd], -1), -1)
        a = (lse0 - lse).exp()
        w = (sd - lse.unsqueeze(-1)).exp()
        out = (a.unsqueeze(-1) * o0.float() + (w.unsqueeze(-1) * dv.float()).sum(3)).to(q.dtype)
        ctx.save_for_backward(q, k0, v0, dk, dv, out, lse, w)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, g):
        q, k0, v0, dk, dv, out, lse, w = ctx.saved_tensors
        scale = ctx.scale
        g = g.contiguous().to(q.dtype)
        gq, gk0, gv0 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            g, q, k0, v0, out, lse, 0.0, True, scale=scale)
        gf = g.float()
        dsum = (gf * out.float()).sum(-1, keepdim=True)  # D, (B, H, T, 1)
        ds = w * ((gf.unsqueeze(3) * dv.float()).sum(-1) - dsum)  # (B, H, T, J)
        gq = gq.float() + scale * (ds.unsqueeze(-1) * dk.float()).sum(3)
        gdk = scale * ds.unsqueeze(-1) * q.float().unsqueeze(3)
        gdv = w.unsqueeze(-1) * gf.unsqueeze(3)
        return gq.to(q.dtype), gk0, gv0, gdk.to(dk.dtype), gdv.to(dv.dtype), None


class EagleDecoderLayer(nn.Module):
    """Llama decoder layer; with `fused=True` the EAGLE-3 `midlayer` whose attention input is
    concat(input_layernorm(embed), hidden_norm(hidden)) (2H in-features; SGLang LlamaForCausalLMEagle3).

    Without `fused` it is the EAGLE-1 layer: the input is already fc(cat(embed, feature)) and, as in
    the EAGLE-1 reference, the first layer has no input norm (the fc output is attended directly).
    """

    def __init__(self, lc, fused: bool, input_norm: bool):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaMLP

        h, eps = lc.hidden_size, lc.rms_norm_eps
        self.fused = fused
        self.self_attn = EagleAttention(lc, 2 * h if fused else h)
        self.mlp = LlamaMLP(lc)
        if fused or input_norm:
            self.input_layernorm = EagleRMSNorm(h, eps)
        if fused:
            self.hidden_norm = EagleRMSNorm(h, eps)
        self.post_attention_layernorm = EagleRMSNorm(h, eps)

    def forward(self, hidden, embed, cos, sin, past_k=None, past_v=None, mask=None, causal=False):
        residual = hidden
        if self.fused:
            x = torch.cat([self.input_layernorm(embed.to(hidden.dtype)), self.hidden_norm(hidden)], -1)
        elif hasattr(self, "input_layernorm"):
            x = self.input_layernorm(hidden)
        else:
            x = hidden
        a, k, v = self.self_attn(x, cos, sin, past_k, past_v, mask, causal)
        hidden = residual + a
        hidden = hidden + self.mlp(self.post_attention_layernorm(hidden))
        return hidden, k, v


# ---------------------------------------------------------------------------------------------
# The drafter


class EagleDrafter(Drafter):
    """EAGLE-1 / EAGLE-3 drafter (module docstring). Target weights are frozen non-persistent buffers."""

    def __init__(self, cfg: EagleConfig, target):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.cfg = cfg
        tc = target.config
        n, h, v = target.num_layers, target.hidden_size, target.vocab_size
        self.layer_ids = cfg.resolved_layer_ids(n)
        self.num_target_layers = n
        self.vocab_size = v
        self.draft_vocab_size = cfg.draft_vocab_size or v
        if self.draft_vocab_size > v:
            raise ConfigError(f"drafter.draft_vocab_size ({cfg.draft_vocab_size}) exceeds the target vocabulary ({v})")
        lc = _draft_llama_config(tc, cfg)
        self.llama_config = lc
        self.eps = lc.rms_norm_eps
        eagle3 = cfg.variant == "eagle3"
        if eagle3:
            self.fc = nn.Linear(len(self.layer_ids) * h, h, bias=False)
        else:
            # EAGLE-1 reference keeps a bias on the fusion layer.
            self.fc = nn.Linear(2 * h, h, bias=True)
        self.midlayer = EagleDecoderLayer(lc, fused=eagle3, input_norm=False)
        self.layers = nn.ModuleList([EagleDecoderLayer(lc, fused=False, input_norm=True)
                                     for _ in range(cfg.num_layers - 1)])
        self.rotary = LlamaRotaryEmbedding(lc)
        # Frozen target tensors, held outside the module tree: they share the target's storage (no
        # copy), are never saved or trained, and DDP does not re-broadcast them every step as it
        # would buffers (the embedding and head are 2 x 113 MB here). `_apply` keeps .to() working.
        emb, head = target.embed_tokens.weight, target.lm_head.weight
        self._frozen = {"embed": emb.detach(), "norm": target.final_norm.weight.detach()}
        self._frozen["head"] = self._frozen["embed"] if head is emb else head.detach()
        self.target_norm_eps = float(getattr(target.final_norm, "variance_epsilon", self.eps))
        vd = self.draft_vocab_size
        # d2t/t2d: FORMATS.md 1.1; identity until set_vocab_map (a reduced vocab demands a real map).
        self.register_buffer("d2t", torch.zeros(vd, dtype=torch.int64))
        self.register_buffer("t2d", torch.arange(v) < vd)
        self.register_buffer("vocab_map_ready", torch.tensor(vd == v))
        self.register_buffer("draft_ids", torch.arange(vd), persistent=False)
        if eagle3:
            self.norm = EagleRMSNorm(h, self.eps)
            self.lm_head = nn.Linear(h, vd, bias=False)
        self._init_weights(lc.initializer_range if hasattr(lc, "initializer_range") else 0.02)

    # -- construction helpers ----------------------------------------------------------------

    @property
    def embed_weight(self) -> torch.Tensor:
        return self._frozen["embed"]

    @property
    def target_head(self) -> torch.Tensor:
        return self._frozen["head"]

    @property
    def target_norm(self) -> torch.Tensor:
        return self._frozen["norm"]

    def head_rows(self) -> torch.Tensor:
        """The target LM head's rows of the draft vocabulary (Vd, H), sliced once per vocab map:
        a fresh slice would copy Vd x H weights on every training step and every draft step."""
        if self.draft_vocab_size == self.vocab_size:
            return self.target_head
        rows = self._frozen.get("head_rows")
        if rows is None or rows.dtype != self.target_head.dtype or rows.device != self.target_head.device:
            rows = self._frozen["head_rows"] = self.target_head[self.draft_ids.to(self.target_head.device)]
        return rows

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        # .to(device/dtype) must reach the frozen target tensors too; tied embed/head stay one tensor.
        done: dict[int, torch.Tensor] = {}
        for k, v in getattr(self, "_frozen", {}).items():
            if id(v) not in done:
                done[id(v)] = fn(v)
            self._frozen[k] = done[id(v)]
        return self

    def _init_weights(self, std: float):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.cfg.variant == "eagle3" and self.cfg.init_from_target:
            with torch.no_grad():
                self.norm.weight.copy_(self.target_norm)
                self.lm_head.weight.copy_(self.target_head[self.draft_ids])

    def set_vocab_map(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        """Install the draft vocabulary (specdistill.data.vocab) before training; re-inits the eagle3 head rows."""
        d2t = torch.as_tensor(d2t, dtype=torch.int64).flatten()
        t2d = torch.as_tensor(t2d, dtype=torch.bool).flatten()
        if d2t.numel() != self.draft_vocab_size or t2d.numel() != self.vocab_size:
            raise ValueError(f"vocab map shapes d2t {tuple(d2t.shape)} / t2d {tuple(t2d.shape)} do not match "
                             f"drafter.draft_vocab_size {self.draft_vocab_size} / target vocab {self.vocab_size}")
        ids = torch.arange(d2t.numel()) + d2t
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size or not bool(t2d[ids].all()) \
                or int(t2d.sum()) != d2t.numel():
            raise ValueError("vocab map is inconsistent: d2t must map draft ids into t2d's True entries one-to-one")
        with torch.no_grad():
            self.d2t.copy_(d2t)
            self.t2d.copy_(t2d)
            self.draft_ids.copy_(ids.to(self.draft_ids.device))
            self.vocab_map_ready.fill_(True)
            self._frozen.pop("head_rows", None)
            if self.cfg.variant == "eagle3" and self.cfg.init_from_target:
                self.lm_head.weight.copy_(self.head_rows().to(self.lm_head.weight.dtype))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # draft_ids is derived from the persistent d2t; keep it in sync after a checkpoint load.
        with torch.no_grad():
            self.draft_ids.copy_(torch.arange(self.d2t.numel(), device=self.d2t.device) + self.d2t)
        self._frozen.pop("head_rows", None)

    def _check_ready(self):
        if not bool(self.vocab_map_ready):
            raise RuntimeError(
                f"drafter.draft_vocab_size={self.draft_vocab_size} < {self.vocab_size} but no vocab map was set: "
                "call drafter.set_vocab_map(*vocab_map_from_counts(count_tokens(train_samples, V), Vd)) "
                "(specdistill.data.vocab) before training, or the draft ids silently mean the first Vd target ids")

    # -- Drafter contract --------------------------------------------------------------------

    @staticmethod
    def num_loss_tokens(batch) -> torch.Tensor:
        """Tokens `loss` sums over (its `num_tokens`), countable before the forward for the Trainer's
        global normaliser: assistant tokens with two earlier positions (feature f_{t} and token x_{t+1})."""
        return batch["loss_mask"][:, 2:].sum()

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """SGLang `LlamaForCausalLMEagle3` keys (FORMATS.md 1.1); no embed_tokens (engines share the target's).

        eagle1 has no `norm`/own `lm_head`: its head is the target's, written here as `lm_head.weight`
        rows so the export is self-contained (formats that cannot express EAGLE-1 reject it by contract).
        """
        sd = {k: v.detach() for k, v in self.state_dict().items() if k != "vocab_map_ready"}
        if self.cfg.variant == "eagle1":
            sd["lm_head.weight"] = self.head_rows().detach().clone()
        return sd

    def proposer(self, target=None, **opts) -> EagleProposer:
        return EagleProposer(self, **opts)

    # -- forward pieces ----------------------------------------------------------------------

    def target_features(self, hidden_states: dict[int, torch.Tensor]) -> torch.Tensor:
        """(…, T, k·H) target features the drafter reads: eagle3 concatenates its layers; eagle1's top
        feature (id N) is the final-normed state the LM head reads, as in the EAGLE-1 reference."""
        missing = [i for i in self.layer_ids if i not in hidden_states]
        if missing:
            raise KeyError(f"target hidden states for layer ids {missing} are missing (drafter needs {self.layer_ids})")
        if self.cfg.variant == "eagle3":
            return torch.cat([hidden_states[i] for i in self.layer_ids], -1)
        f = hidden_states[self.layer_ids[0]]
        return self._top_norm(f) if self.layer_ids[0] == self.num_target_layers else f

    def _top_norm(self, f):
        return _rms_norm(f, self.target_norm, self.target_norm_eps)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed_weight)

    def step_input(self, features: torch.Tensor, embed: torch.Tensor, step: int) -> torch.Tensor:
        """The hidden stream entering the first layer.

        eagle3: step 0 fuses the target layers (fc); later steps feed the drafter's own output as is.
        eagle1: fc(cat(embed, feature)) at every step, the feature being the target's (step 0) or the
        drafter's previous output (later steps, HASS alignment / TTT).
        """
        if self.cfg.variant == "eagle3":
            return self.fc(features) if step == 0 else features
        return self.fc(torch.cat([embed.to(features.dtype), features], -1))

    def layers_forward(self, hidden, embed, positions, past, mask=None, causal=False):
        """Run all draft layers. past: list per layer of (K, V) or None. Returns (out, new_kv list)."""
        cos, sin = self.rotary(hidden, positions)
        hidden, k, v = self.midlayer(hidden, embed, cos, sin, *(past[0] if past else (None, None)), mask, causal)
        new = [(k, v)]
        for i, layer in enumerate(self.layers, 1):
            hidden, k, v = layer(hidden, None, cos, sin, *(past[i] if past else (None, None)), mask, causal)
            new.append((k, v))
        return hidden, new

    def draft_logits(self, out: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary (Vd) from the drafter's output hidden state."""
        if self.cfg.variant == "eagle3":
            return self.lm_head(self.norm(out))
        w = self.head_rows()
        return F.linear(out, w.to(out.dtype) if not torch.is_autocast_enabled() else w)

    # -- training ----------------------------------------------------------------------------

    def _target_logp(self, target_out, b, p) -> torch.Tensor:
        """log-softmax of the target over the draft vocabulary at positions (b, p), fp32.

        Only loss positions are computed (the output layer dominates a step), and only the Vd draft
        rows. The target distribution is *renormalised over the draft vocabulary*: mass on tokens
        outside it is dropped, as in the EAGLE-3 reference (the drafter cannot propose those tokens
        anyway, and the renormalised target is the best it can match).
        """
        if target_out.logits is not None:
            z = target_out.logits[b, p]
            z = z if self.draft_vocab_size == self.vocab_size else z[:, self.draft_ids]
            return F.log_softmax(z.float(), -1)
        if target_out.last_hidden is not None:
            last = target_out.last_hidden[b, p]
        else:
            last = self._top_norm(target_out.hidden_states[self.num_target_layers][b, p])
        w = self.head_rows()
        # fp32 labels even under bf16 autocast: bf16 flips the target argmax on ~8% of positions.
        with torch.autocast(last.device.type, enabled=False):
            z = F.linear(last.float(), w.float())
        return F.log_softmax(z, -1)

    def loss(self, batch: dict, target_out) -> LossOutput:
        """Sum over loss positions and unrolled steps j of decay**j * (w_tok * token loss
        + w_feat * smooth-L1 feature loss + w_topk * HASS top-K loss); `num_tokens` counts step 0."""
        self._check_ready()
        cfg = self.cfg
        ids, lmask = batch["input_ids"], batch["loss_mask"]
        bsz, t = ids.shape
        if t < 3:
            raise ValueError(f"EAGLE needs sequences of >= 3 tokens, got {t}")
        feats = self.target_features(target_out.hidden_states)[:, : t - 1]  # (B, T-1, k·H): index t uses f_t
        if cfg.feature_noise > 0 and self.training:
            # EAGLE-1 Sec. 4: U(-0.1, 0.1) noise on the input features makes the drafter robust to
            # its own feature errors at decode time (the regression target stays clean).
            feats = feats + torch.empty_like(feats).uniform_(-cfg.feature_noise, cfg.feature_noise)
        # Loss positions p: the target at p predicts token p+1, which must be an assistant token;
        # drafter index p-1 (step 0) predicts it, so p >= 1.
        sel = lmask[:, 1:].bool().clone()
        sel[:, 0] = False
        b, p = sel.nonzero(as_tuple=True)
        n0 = int(b.numel())
        zero = feats.sum() * 0.0
        if n0 == 0:
            return LossOutput(zero, 0, {})
        t_logp = self._target_logp(target_out, b, p)  # (N, Vd)
        t_top = t_logp.argmax(-1)
        # The same teacher serves every unrolled step: its probabilities and entropy are computed once.
        t_prob = t_logp.exp()
        t_negent = (t_prob * t_logp).sum(-1)  # sum p log p (exp of a finite log-softmax: no 0 * -inf)
        w_tok, w_feat = cfg.token_weight(), cfg.feature_weight()
        feat_target = None
        if w_feat > 0:
            feat_target = self.target_features(target_out.hidden_states)[b, p].float()
        token_fn = _token_loss_fn(cfg.token_loss)
        pad = torch.zeros(bsz, 1, dtype=ids.dtype, device=ids.device)
        total = zero
        metrics: dict[str, torch.Tensor] = {}
        hidden_in = feats
        history: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per step, per layer (K, V)
        tt = t - 1
        base_pos = torch.arange(tt, device=ids.device)[None].expand(bsz, tt)
        for j in range(cfg.unroll_steps()):
            tok = ids[:, 1 + j:]
            tok = torch.cat([tok] + [pad] * j, 1)[:, :tt] if j else tok  # x_{t+1+j}, zero-padded tail
            emb = self.embed(tok)
            x = self.step_input(hidden_in, emb, j)
            if j == 0:
                out, kv = self.layers_forward(x, emb, base_pos, None, causal=True)
            else:
                # Per layer: step-0 keys/values (attended causally) and those of steps 1..j-1
                # (attended at the query's own position only), stacked on a new axis.
                past = []
                for li in range(len(history[0])):
                    dk = torch.stack([h[li][0] for h in history[1:]], 3) if j > 1 else None
                    dv = torch.stack([h[li][1] for h in history[1:]], 3) if j > 1 else None
                    past.append(((history[0][li][0], dk), (history[0][li][1], dv)))
                out, kv = self.layers_forward(x, emb, base_pos + j, past)
            history.append(kv)
            valid = p - 1 - j >= 0
            if not bool(valid.any()):
                break
            every = bool(valid.all())

            def sel(x, every=every, valid=valid):
                # Boolean indexing copies (tokens, Vd) rows; skip it when every row is kept.
                return x if every else x[valid]

            o = out[b[valid], (p - 1 - j)[valid]]
            logits = self.draft_logits(o)  # (n, Vd), bf16 under autocast
            w_step = cfg.step_loss_decay ** j
            if cfg.token_loss == "forward_kl":
                # The output layer's loss dominates a step: the chunked kernel keeps it in cache.
                lt, top = losses.forward_kl_chunked(logits, sel(t_prob), sel(t_negent))
                lt = lt.sum()
            else:
                lt = token_fn(logits, sel(t_logp))
                top = logits.detach().float().argmax(-1)
            step_loss = w_tok * lt
            metrics[f"loss_token_step{j}"] = lt.detach()
            if cfg.hass_topk > 0:
                lk = losses.topk_kd(logits, sel(t_logp), cfg.hass_topk)
                step_loss = step_loss + cfg.hass_topk_weight * lk
                metrics[f"loss_topk_step{j}"] = lk.detach()
            if feat_target is not None:
                lf = losses.feature_regression(o, sel(feat_target))
                step_loss = step_loss + w_feat * lf
                metrics[f"loss_feature_step{j}"] = lf.detach()
            total = total + w_step * step_loss
            metrics[f"correct_step{j}"] = (top == sel(t_top)).sum()
            metrics[f"tokens_step{j}"] = valid.sum()
            # The next step reads this step's own output (TTT / HASS alignment), not the target's.
            hidden_in = out
        return LossOutput(total, n0, metrics)


# ---------------------------------------------------------------------------------------------
# Proposer: chain and EAGLE-2 dynamic tree


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
        self.reset(None)

    def reset(self, prompt_ids=None) -> None:
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer (1, kv, P, d)
        self.committed = 0  # drafter indices in the cache (index t covers (f_t, x_{t+1}))
        self.last_out: torch.Tensor | None = None  # (H,) drafter output at the last committed index

    def _param(self):
        return next(self.drafter.parameters())

    def _run(self, hidden, emb, positions, mask):
        d = self.drafter
        past = self.kv if self.kv is not None and self.kv[0][0].shape[2] else None
        out, new = d.layers_forward(hidden, emb, positions[None], past, mask=mask)
        return out, new

    def _append(self, new):
        if self.kv is None:
            self.kv = [(k, v) for k, v in new]
        else:
            self.kv = [(torch.cat([k0, k], 2), torch.cat([v0, v], 2)) for (k0, v0), (k, v) in zip(self.kv, new)]

    def _crop(self, n):
        self.kv = [(k[:, :, :n], v[:, :, :n]) for k, v in self.kv]

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
        out, kv = d.layers_forward(x, emb, pos[None], self.kv, mask=mask, causal=mask is None)
        self._append(kv)
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
                return self._chain(d, w)
            return self._tree(d, w)
        finally:
            self._crop(self.committed)

    def _chain(self, d, w) -> DraftTree:
        toks = []
        out = self.last_out
        for i in range(self.k):
            logits = d.draft_logits(out)
            tid = int(logits.argmax())
            if self.min_logp > -math.inf and float(F.log_softmax(logits.float(), -1)[tid]) < self.min_logp:
                break
            toks.append(tid)
            if i == self.k - 1:
                break
            # Draft index committed+i consumes (own output, drafted token); sequence position = index.
            emb = self._embed_drafts(torch.tensor([[tid]], device=w.device), w.dtype)
            x = d.step_input(out[None, None], emb, 1)
            pos = torch.tensor([self.committed + i], device=w.device)
            o, kv = self._run(x, emb, pos, None)
            self._append(kv)
            out = o[0, -1]
        if not toks:
            return DraftTree.empty()
        return DraftTree.chain(self._to_target(torch.tensor(toks)))

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
            o, kv = self._run(x, emb, pos, mask.to(dev))
            self._append(kv)
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


def _drafting_copy(drafter: EagleDrafter, dtype: str) -> EagleDrafter:
    """The module the proposer runs: the drafter itself, or a frozen bf16 copy.

    One draft step reads every weight once for a single token, so it is memory-bound: bf16 halves
    the bytes, and CPUs with AVX512-BF16 run the (1, H) x (H, Vd) product ~2.5x faster than fp32
    (measured here). "auto" picks bf16 on such CPUs. A copy does not follow later training steps.
    """
    if dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"EagleProposer dtype ({dtype!r}) must be auto, float32 or bfloat16")
    w = next(drafter.parameters())
    if dtype == "auto":
        bf16_ok = w.device.type == "cpu" and bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
        dtype = "bfloat16" if bf16_ok or w.dtype == torch.bfloat16 else "float32"
    want = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    if w.dtype == want:
        return drafter
    import copy

    return copy.deepcopy(drafter).to(want).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Registration


def _build(cfg: EagleConfig, target) -> EagleDrafter:
    return EagleDrafter(cfg, target)


def _target_layers(cfg: EagleConfig, target_config) -> list[int]:
    return cfg.resolved_layer_ids(target_config.num_hidden_layers)


register(DrafterSpec(
    name="eagle",
    config_cls=EagleConfig,
    build=_build,
    target_layers=_target_layers,
    drafter_cls=EagleDrafter,
    export_formats=("native", "sglang", "vllm"),
    paper="EAGLE (Li et al. 2024, arXiv 2401.15077); EAGLE-2 (arXiv 2406.16858); EAGLE-3 (arXiv 2503.01840); "
          "HASS (Zhang et al. 2024, arXiv 2408.15766)",
))
