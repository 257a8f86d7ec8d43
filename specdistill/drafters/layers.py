"""Llama-style draft layers shared by the drafter families (EAGLE now; the CTC family reuses them).

    rms_norm / DraftRMSNorm      Llama RMSNorm that keeps the input's dtype
    DraftAttention               GQA self-attention over an explicit key/value history (SDPA), with the
                                 training-time-test path (TTTAttention, ttt_attention_materialised)
    DraftDecoderLayer            Llama decoder layer; `fused=True` is the EAGLE-3 midlayer (2H attention input)
    draft_llama_config           a LlamaConfig shaped like the target for these layers

State-dict names follow the Llama/SGLang layouts (FORMATS.md 1.1): `self_attn.{q,k,v,o}_proj`, `mlp.*`,
`input_layernorm`, `hidden_norm`, `post_attention_layernorm`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm with a frozen weight tensor (the target's final norm, held outside the module tree)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype) if weight.dtype == x.dtype else (weight.float() * xf).to(x.dtype)


def draft_llama_config(tc, num_layers: int = 1, intermediate_size: int = 0):
    """A LlamaConfig shaped like the target (the draft layers are Llama-style for any target);
    `intermediate_size` 0 = the target's MLP width."""
    from transformers import LlamaConfig

    h = tc.hidden_size
    heads = tc.num_attention_heads
    rope = getattr(tc, "rope_parameters", None)
    if not isinstance(rope, dict) or "rope_type" not in rope:
        rope = {"rope_type": "default", "rope_theta": float(getattr(tc, "rope_theta", None) or 10000.0)}
    return LlamaConfig(
        hidden_size=h, intermediate_size=intermediate_size or tc.intermediate_size,
        num_attention_heads=heads, num_key_value_heads=getattr(tc, "num_key_value_heads", None) or heads,
        head_dim=getattr(tc, "head_dim", None) or h // heads, rms_norm_eps=getattr(tc, "rms_norm_eps", 1e-6),
        max_position_embeddings=getattr(tc, "max_position_embeddings", 4096),
        hidden_act=getattr(tc, "hidden_act", "silu"), rope_parameters=dict(rope), vocab_size=tc.vocab_size,
        num_hidden_layers=num_layers, attention_bias=False, mlp_bias=False,
    )


class DraftRMSNorm(nn.Module):
    """Llama RMSNorm (state-dict name `weight`) that returns the input's dtype.

    transformers' LlamaRMSNorm returns fp32 for bf16 input with an fp32 weight, which under bf16
    autocast turns the whole residual stream back into fp32 and costs a cast before every matmul.
    """

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class DraftAttention(nn.Module):
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
        a causal (T, T) block plus j per-position scalars under one softmax: `TTTAttention` runs the
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
            return TTTAttention.apply(q, k0, v0, dk, dv, scale)
        return ttt_attention_materialised(q, k0, v0, dk, dv, scale)  # the flash op used is CPU-only


def ttt_attention_materialised(q, k0, v0, dk, dv, scale):
    """The TTT attention of `TTTAttention` with the (T, T) scores materialised: any device."""
    t = q.shape[2]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    s0 = torch.matmul(q, k0.transpose(-1, -2)).masked_fill(~causal, float("-inf"))
    sd = (q.unsqueeze(3) * dk).sum(-1)
    p = torch.softmax(torch.cat([s0, sd], -1).float() * scale, -1).to(q.dtype)
    return torch.matmul(p[..., :t], v0) + (p[..., t:].unsqueeze(-1) * dv).sum(3)


class TTTAttention(torch.autograd.Function):
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


class DraftDecoderLayer(nn.Module):
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
        self.self_attn = DraftAttention(lc, 2 * h if fused else h)
        self.mlp = LlamaMLP(lc)
        if fused or input_norm:
            self.input_layernorm = DraftRMSNorm(h, eps)
        if fused:
            self.hidden_norm = DraftRMSNorm(h, eps)
        self.post_attention_layernorm = DraftRMSNorm(h, eps)

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
