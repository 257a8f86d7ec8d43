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

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from specdistill import losses
from specdistill.drafters.base import Drafter, DrafterSpec, LossOutput, register
from specdistill.drafters.eagle_proposer import EagleProposer, make_proposer
from specdistill.drafters.layers import DraftDecoderLayer, DraftRMSNorm, draft_llama_config, rms_norm
from specdistill.drafters.vocab_map import DraftVocabulary
from specdistill.errors import ConfigError
from specdistill.verify.proposer import ProposerOptions

log = logging.getLogger(__name__)

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
    freeze_lm_head: bool = False
    """eagle3: keep the draft LM head fixed at the target's rows d2t (no gradient, not in the optimizer), as
    speculators trains EAGLE-3; needs init_from_target. The final norm stays trainable."""
    step_loss_norm: str = "step0"
    """Normaliser of unrolled step j's loss: step0 = its sum over the step-0 token count (the Trainer's; step j
    has j fewer positions per row), per_step = its mean over its own positions (speculators)."""
    fc_norm: bool = False
    """EAGLE-3.1 (speculators PR 610, SpecForge PR 568): a learnt RMSNorm on each fused target layer
    before fc, fc(cat(norm_1(h_a), norm_2(h_b), ...)); tensors `fc_norm.{i}.weight` (eagle3 only)."""
    norm_output: bool = False
    """EAGLE-3.1: unrolled/draft steps >= 1 read the drafter's *final-normed* output norm(out) instead of
    out (the LM head input either way); no extra tensors (eagle3 only)."""
    late_step_loss_fraction: float = 1.0
    """Share of the loss positions scored at unrolled steps >= 1 while training, drawn afresh each step; the
    step's loss is scaled by 1/fraction so its expectation is unchanged (a cheaper objective: the output layer
    dominates a step). Step 0 and evaluation always score every position; 1 = all."""

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
        if not 0.0 < self.late_step_loss_fraction <= 1.0:
            raise ConfigError(f"drafter.late_step_loss_fraction ({self.late_step_loss_fraction}) must be in (0, 1]")
        if self.step_loss_norm not in ("step0", "per_step"):
            raise ConfigError(f"drafter.step_loss_norm ({self.step_loss_norm!r}) must be step0 or per_step")
        if self.freeze_lm_head and (self.variant != "eagle3" or not self.init_from_target):
            raise ConfigError("drafter.freeze_lm_head needs drafter.variant=eagle3 and drafter.init_from_target=true "
                              "(the frozen head is the target's rows; eagle1 always uses the target's head)")
        if self.variant != "eagle3" and (self.fc_norm or self.norm_output):
            raise ConfigError("drafter.fc_norm / drafter.norm_output are EAGLE-3.1 options: they need "
                              f"drafter.variant=eagle3 (got {self.variant!r})")

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
# The drafter


class EagleDrafter(DraftVocabulary, Drafter):
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
        lc = draft_llama_config(tc, cfg.num_layers, cfg.intermediate_size)
        self.llama_config = lc
        self.eps = lc.rms_norm_eps
        eagle3 = cfg.variant == "eagle3"
        if eagle3:
            self.fc = nn.Linear(len(self.layer_ids) * h, h, bias=False)
        else:
            # EAGLE-1 reference keeps a bias on the fusion layer.
            self.fc = nn.Linear(2 * h, h, bias=True)
        self.midlayer = DraftDecoderLayer(lc, fused=eagle3, input_norm=False)
        self.layers = nn.ModuleList([DraftDecoderLayer(lc, fused=False, input_norm=True)
                                     for _ in range(cfg.num_layers - 1)])
        self.rotary = LlamaRotaryEmbedding(lc)
        # Frozen target tensors, held outside the module tree: they share the target's storage (no
        # copy), are never saved or trained, and DDP does not re-broadcast them every step as it
        # would buffers (the embedding and head are 2 x 113 MB here). `_apply` keeps .to() working.
        self._hold_target_tensors(embed=target.embed_tokens.weight, norm=target.final_norm.weight,
                                  head=target.lm_head.weight)
        self.target_norm_eps = float(getattr(target.final_norm, "variance_epsilon", self.eps))
        vd = self.draft_vocab_size
        # d2t/t2d: FORMATS.md 1.1; identity until set_vocab_map (a reduced vocab demands a real map).
        self._init_draft_vocabulary(v, vd)
        if eagle3:
            self.norm = DraftRMSNorm(h, self.eps)
            self.lm_head = nn.Linear(h, vd, bias=False)
            self.lm_head.weight.requires_grad_(not cfg.freeze_lm_head)
            if cfg.fc_norm:  # EAGLE-3.1: one learnt norm per fused target layer (engines: fc_norm.{i}.weight)
                self.fc_norm = nn.ModuleList([DraftRMSNorm(h, self.eps) for _ in self.layer_ids])
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

    def _on_vocab_map(self) -> None:
        """eagle3 re-initialises its own head's rows from the target's for the new draft vocabulary."""
        if self.cfg.variant == "eagle3" and self.cfg.init_from_target:
            with torch.no_grad():
                self.lm_head.weight.copy_(self.head_rows().to(self.lm_head.weight.dtype))

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

    def proposer(self, target=None, options: ProposerOptions | None = None, **overrides) -> EagleProposer:
        """Chain or EAGLE-2 tree proposer: `options` mapped by eagle_proposer.proposer_args (None =
        EagleProposer's defaults), then EAGLE keyword overrides (mode, k, topk, budget, depth, min_prob, dtype)."""
        return make_proposer(self, options, **overrides)

    def export_info(self) -> dict:
        """What the EAGLE export writers (export/common.py, sglang, vllm, eagle1) and `specdistill plan` read
        beyond the tensors; `llama_config` is the draft layers' transformers LlamaConfig."""
        return {
            "variant": self.variant,
            "layer_ids": [int(i) for i in self.layer_ids],
            "num_target_layers": int(self.num_target_layers),
            "vocab_size": int(self.vocab_size),
            "draft_vocab_size": int(self.draft_vocab_size),
            "llama_config": self.llama_config,
            "num_layers": int(self.cfg.num_layers),
            "unroll_steps": int(self.cfg.unroll_steps()),
            "norm_before_residual": False,
            "fc_norm": bool(self.cfg.fc_norm),
            "norm_output": bool(self.cfg.norm_output),
        }

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
        return rms_norm(f, self.target_norm, self.target_norm_eps)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed_weight)

    def step_input(self, features: torch.Tensor, embed: torch.Tensor, step: int) -> torch.Tensor:
        """The hidden stream entering the first layer.

        eagle3: step 0 fuses the target layers (fc); later steps feed the drafter's own output as is.
        eagle1: fc(cat(embed, feature)) at every step, the feature being the target's (step 0) or the
        drafter's previous output (later steps, HASS alignment / TTT).
        EAGLE-3.1 options: `fc_norm` normalises each target layer's slice before fc; `norm_output`
        feeds norm(out) (the LM head's input) to later steps instead of out.
        """
        if self.cfg.variant == "eagle3":
            if step:
                return self.norm(features) if self.cfg.norm_output else features
            if self.cfg.fc_norm:
                parts = features.chunk(len(self.fc_norm), -1)
                features = torch.cat([n(x) for n, x in zip(self.fc_norm, parts)], -1)
            return self.fc(features)
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
            frac = cfg.late_step_loss_fraction if (j and self.training) else 1.0
            if frac < 1.0:  # a fresh random share of this step's positions; the hidden states stay complete
                valid = valid & (torch.rand(valid.shape, device=valid.device) < frac)
                if not bool(valid.any()):
                    hidden_in = out
                    continue
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
            if cfg.step_loss_norm == "per_step" and not every:
                step_loss = step_loss * (n0 / int(valid.sum()))  # the Trainer divides by n0: a mean over step j's
            elif frac < 1.0:
                step_loss = step_loss / frac  # the sampled positions' sum, scaled to its expectation over all
            total = total + w_step * step_loss
            metrics[f"correct_step{j}"] = (top == sel(t_top)).sum()
            metrics[f"tokens_step{j}"] = valid.sum()
            # The next step reads this step's own output (TTT / HASS alignment), not the target's.
            hidden_in = out
        return LossOutput(total, n0, metrics)


# ---------------------------------------------------------------------------------------------
# Registration


def _target_layers(cfg: EagleConfig, target_config) -> list[int]:
    return cfg.resolved_layer_ids(target_config.num_hidden_layers)


register(DrafterSpec(
    name="eagle",
    config_cls=EagleConfig,
    target_layers=_target_layers,
    drafter_cls=EagleDrafter,
    export_formats=("native", "sglang", "vllm"),
    paper="EAGLE (Li et al. 2024, arXiv 2401.15077); EAGLE-2 (arXiv 2406.16858); EAGLE-3 (arXiv 2503.01840); "
          "HASS (Zhang et al. 2024, arXiv 2408.15766)",
))
