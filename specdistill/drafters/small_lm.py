"""Small independent draft LMs distilled from the target: Seq-KD and DistillSpec / GKD.

Papers (docs/papers.md#small-lm):
- Seq-KD, Kim & Rush 2016, arXiv 1606.07947: hard cross-entropy on the teacher's own outputs; here
  plain CE on target-regenerated answers (`specdistill data regenerate`), so the Trainer runs no
  target forward (target_output = none): the labels *are* the target's text.
- DistillSpec, Zhou et al. 2024, arXiv 2310.08461, on GKD (Agarwal et al. 2024, arXiv 2306.13649):
  token-level divergence between draft and target over the full vocabulary on the continuation
  tokens (FKL, RKL, JSD(beta) with TRL's endpoints, TVD), on a mixture of dataset / target-generated
  continuations and the draft's own samples (fraction `lmbda`).

The draft is any causal LM whose vocabulary equals the target's exactly. It is built from
  init=prune   the target's decoder layers `keep_layers`, its final norm and its (tied) embedding/head,
               *copied* (the draft shares no storage with the frozen target);
  init=config  a fresh random config: the target's with num_layers / hidden_size / ... overridden;
  init=<dir>   an HF causal-LM directory; its tokenizer (if it has one) must equal the target's id for id.

On-policy rollout (lmbda > 0): the Trainer calls `rollout(batch, target, seeds)` on every micro-batch.
The "fraction lmbda of micro-batches" of TRL is decided **per row** here, from that row's seed
(`Generator(seed).rand() < lmbda`), so the choice and the sampled tokens of a row do not depend on how
the global batch is split over accumulation steps and processes. A chosen row keeps its prompt (the
tokens before its first loss position) and is continued by the draft, sampled at `rollout_temperature`
with one torch.Generator per row, for up to `rollout_tokens` tokens or until an EOS; the others keep
their dataset (regenerated) continuation.

Target logits: the spec asks the Trainer for the target's final-normed last hidden state
(target_output = hidden, no layers) instead of its (B, T, V) logits; the loss gathers the continuation
positions first and applies the target's LM head to those rows only, in row chunks under activation
checkpointing, so neither side ever materialises more than `loss_chunk` x V logits at a time.

Reduced vocabulary (drafter.draft_vocab_size = Vd > 0, native format only): the draft's output layer
predicts only the Vd most frequent target tokens of the training labels (the d2t/t2d map of
drafters/vocab_map.py, as EAGLE-3, Medusa and CTC use it; input embeddings stay over the whole
vocabulary). Its head starts from the Vd rows of the draft's own head (a pruned draft's is the
target's). The proposer maps draft ids to target ids, its distribution is zero outside the subset
(lossless rejection sampling still holds: q = 0 there only means those tokens come from the residual).
Losses over the subset: CE drops label positions whose token is outside it (`num_loss_tokens` counts
the same positions); the divergences compare the draft with the target *renormalised over the subset*
(the target's mass outside is dropped, as EAGLE-3 does). HF assisted generation, vLLM and SGLang need
the target's whole vocabulary, so hf_draft refuses such a draft.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from specdistill import losses
from specdistill.drafters.base import Drafter, DrafterSpec, LossOutput, register
from specdistill.drafters.vocab_map import DraftVocabulary
from specdistill.errors import ConfigError

log = logging.getLogger(__name__)

LOSSES = ("ce", "forward_kl", "reverse_kl", "jsd", "tvd")


@dataclass
class SmallLMConfig:
    name: str = "small_lm"
    """Registry key of the family."""
    init: str = "prune"
    """prune (copy target layers `keep_layers`), config (fresh random config) or an HF model directory."""
    keep_layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    """init=prune: 0-based target decoder layers copied, in this order (the final norm and embedding/head too)."""
    num_layers: int = 4
    """init=config: decoder layers of the fresh draft."""
    hidden_size: int = 0
    """init=config: hidden size; 0 = the target's."""
    intermediate_size: int = 0
    """init=config: MLP width; 0 = the target's (scaled with hidden_size when that is set)."""
    num_attention_heads: int = 0
    """init=config: attention heads; 0 = the target's (key/value heads follow the target's ratio)."""
    loss: str = "ce"
    """ce (Seq-KD: hard labels, no target forward) | forward_kl | reverse_kl | jsd | tvd (DistillSpec)."""
    beta: float = 0.5
    """loss=jsd: JSD(beta) with TRL's endpoints (0 = forward KL, 1 = reverse KL)."""
    lmbda: float = 0.0
    """On-policy fraction: each row is continued by the draft with this probability (its seed decides)."""
    rollout_tokens: int = 32
    """Tokens the draft samples after a chosen row's prompt."""
    rollout_temperature: float = 1.0
    """Sampling temperature of the rollout (TRL GKD uses 0.9)."""
    loss_chunk: int = 256
    """Rows of logits computed at a time in the loss (activation-checkpointed)."""
    draft_vocab_size: int = 0
    """0 = the target's vocabulary; N > 0: the output layer covers the N most frequent training-label tokens
    (native format only: engines and HF assisted generation need the whole vocabulary)."""

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ConfigError(f"drafter.loss ({self.loss!r}) must be one of {LOSSES}")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"drafter.beta ({self.beta}) must be in [0, 1]")
        if not 0.0 <= self.lmbda <= 1.0:
            raise ConfigError(f"drafter.lmbda ({self.lmbda}) must be in [0, 1]")
        if self.lmbda > 0 and self.loss == "ce":
            raise ConfigError("drafter.lmbda > 0 needs a divergence loss (forward_kl, reverse_kl, jsd, tvd): "
                              "hard CE on the draft's own samples would teach it nothing")
        if self.draft_vocab_size < 0:
            raise ConfigError(f"drafter.draft_vocab_size ({self.draft_vocab_size}) must be 0 (full) or > 0")
        if self.rollout_tokens < 1 or self.rollout_temperature <= 0 or self.loss_chunk < 1:
            raise ConfigError("drafter.rollout_tokens, rollout_temperature and loss_chunk must be positive")

    @property
    def distills(self) -> bool:
        return self.loss != "ce"


# ---------------------------------------------------------------------------------------------
# Building the draft LM


def _tok_name(tok) -> str:
    return str(getattr(tok, "name_or_path", "") or type(tok).__name__)


def check_vocabulary(target_tok, draft_tok, target_vocab: int, draft_vocab: int, where: str) -> None:
    """The draft must use the target's token ids exactly: same size and the same token at every id.

    Raises ConfigError naming both tokenizers and the first id that differs."""
    tn = _tok_name(target_tok) if target_tok is not None else "target"
    dn = _tok_name(draft_tok) if draft_tok is not None else where
    if draft_vocab != target_vocab:
        raise ConfigError(f"{where}: vocabulary size {draft_vocab} ({dn}) differs from the target's {target_vocab} "
                          f"({tn}); a draft model must share the target's tokenizer")
    if draft_tok is None or target_tok is None:
        return
    a = {i: t for t, i in target_tok.get_vocab().items()}
    b = {i: t for t, i in draft_tok.get_vocab().items()}
    for i in range(max(len(a), len(b), target_vocab)):
        if a.get(i) != b.get(i):
            raise ConfigError(f"{where}: tokenizer {dn} differs from the target's {tn} at token id {i} "
                              f"({b.get(i)!r} vs {a.get(i)!r}); a draft model must share the target's tokenizer")


def _sliced_config(hf_config, n: int):
    cfg = copy.deepcopy(hf_config)
    cfg.num_hidden_layers = n
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types)[:n]
    return cfg


def pruned_model(target, keep_layers):
    """A causal LM of the target's decoder layers `keep_layers` + final norm + embedding/head, copied."""
    from transformers import AutoModelForCausalLM

    n = target.num_layers
    keep = [int(i) for i in keep_layers]
    if not keep or any(not 0 <= i < n for i in keep) or len(set(keep)) != len(keep):
        raise ConfigError(f"drafter.keep_layers ({keep}) must be distinct 0-based decoder layers of the "
                          f"{n}-layer target")
    cfg = _sliced_config(target.config, len(keep))
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [target.config.layer_types[i] for i in keep]
    src = target.model
    draft = AutoModelForCausalLM.from_config(cfg).to(dtype=torch.float32)
    with torch.no_grad():
        draft.model.embed_tokens.weight.copy_(src.model.embed_tokens.weight)
        draft.model.norm.load_state_dict(src.model.norm.state_dict())
        for j, i in enumerate(keep):
            draft.model.layers[j].load_state_dict(src.model.layers[i].state_dict())
        if draft.lm_head.weight is not draft.model.embed_tokens.weight:
            draft.lm_head.weight.copy_(src.lm_head.weight)
    draft.generation_config = copy.deepcopy(src.generation_config)
    return draft


def fresh_model(target, cfg: SmallLMConfig):
    from transformers import AutoModelForCausalLM

    hc = _sliced_config(target.config, cfg.num_layers)
    if cfg.hidden_size:
        scale = cfg.hidden_size / hc.hidden_size
        hc.hidden_size = cfg.hidden_size
        hc.intermediate_size = cfg.intermediate_size or max(1, int(hc.intermediate_size * scale))
    elif cfg.intermediate_size:
        hc.intermediate_size = cfg.intermediate_size
    if cfg.num_attention_heads:
        ratio = max(1, hc.num_attention_heads // max(1, getattr(hc, "num_key_value_heads", hc.num_attention_heads)))
        hc.num_attention_heads = cfg.num_attention_heads
        hc.num_key_value_heads = max(1, cfg.num_attention_heads // ratio)
    if hc.hidden_size % hc.num_attention_heads:
        raise ConfigError(f"drafter.hidden_size ({hc.hidden_size}) must be divisible by num_attention_heads "
                          f"({hc.num_attention_heads})")
    if getattr(hc, "head_dim", None):
        hc.head_dim = hc.hidden_size // hc.num_attention_heads
    hc.vocab_size = target.vocab_size
    return AutoModelForCausalLM.from_config(hc).to(dtype=torch.float32)


def model_from_dir(target, path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise ConfigError(f"drafter.init={path}: not prune, config, nor a model directory with config.json")
    model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32)
    tok = None
    if any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        tok = AutoTokenizer.from_pretrained(str(p))
    check_vocabulary(target.tokenizer, tok, target.vocab_size, model.get_output_embeddings().weight.shape[0],
                     f"drafter.init={path}")
    return model


# ---------------------------------------------------------------------------------------------
# The drafter


class SmallLMDrafter(DraftVocabulary, Drafter):
    """A whole causal LM `self.lm` (HF), trained by Seq-KD (CE) or DistillSpec (a divergence)."""

    def __init__(self, cfg: SmallLMConfig, target):
        super().__init__()
        self.cfg = cfg
        if cfg.init == "prune":
            lm = pruned_model(target, cfg.keep_layers)
        elif cfg.init == "config":
            lm = fresh_model(target, cfg)
        else:
            lm = model_from_dir(target, cfg.init)
        check_vocabulary(None, None, target.vocab_size, lm.get_output_embeddings().weight.shape[0],
                         f"drafter.init={cfg.init}")
        self.lm = lm.train()
        for p in self.lm.parameters():
            p.requires_grad_(True)
        pad = getattr(target.tokenizer, "pad_token_id", None) if target.tokenizer is not None else None
        self.pad_id = int(pad if pad is not None else 0)
        eos = getattr(target.tokenizer, "eos_token_id", None) if target.tokenizer is not None else None
        self.eos_ids = {int(eos)} if eos is not None else set()
        v = int(target.vocab_size)
        vd = cfg.draft_vocab_size or v
        if vd > v:
            raise ConfigError(f"drafter.draft_vocab_size ({cfg.draft_vocab_size}) exceeds the target vocabulary ({v})")
        # The target's LM head, outside the module tree (never saved, trained or DDP-broadcast).
        self._hold_target_tensors(head=target.lm_head.weight)
        hb = getattr(target.lm_head, "bias", None)
        if hb is not None:
            self._frozen["head_bias"] = hb.detach()
        # The map's buffers are saved only for a reduced vocabulary (full-vocabulary exports stay as they were).
        self._init_draft_vocabulary(v, vd, persistent=vd < v)
        if vd < v:
            self._reduce_head(vd)
        # A tied head is one tensor under two names; checkpoints and native exports keep one name
        # (safetensors refuses shared storage) and loading puts it back under both.
        if self.tied:
            self._register_state_dict_hook(_drop_tied_head)
            self._register_load_state_dict_pre_hook(_restore_tied_head)

    def _reduce_head(self, vd: int) -> None:
        """Replace the LM's head by a (Vd, H) one, untied from the input embedding; its rows come from the
        draft's own full head (`_on_vocab_map`, once the map is known)."""
        old = self.lm.get_output_embeddings()
        if getattr(old, "bias", None) is not None:
            raise ConfigError("drafter.draft_vocab_size: the draft's LM head has a bias (not supported)")
        self._source_head = old.weight.detach()  # a pruned draft's tied head = the target's rows; not a parameter
        head = torch.nn.Linear(old.weight.shape[1], vd, bias=False, dtype=old.weight.dtype, device=old.weight.device)
        self.lm.config.tie_word_embeddings = False
        self.lm.set_output_embeddings(head)
        self._on_vocab_map()

    def _on_vocab_map(self) -> None:
        with torch.no_grad():
            w = self.lm.get_output_embeddings().weight
            w.copy_(self._source_head[self.draft_ids.to(self._source_head.device)].to(w))

    @property
    def reduced(self) -> bool:
        return self.draft_vocab_size < self.vocab_size

    @property
    def tied(self) -> bool:
        return self.lm.get_output_embeddings().weight is self.lm.get_input_embeddings().weight

    @property
    def variant(self) -> str:
        return "distillspec" if self.cfg.distills else "seqkd"

    # -- Drafter contract --------------------------------------------------------------------

    def num_loss_tokens(self, batch) -> torch.Tensor:
        """Continuation tokens with a preceding position (the logits at t predict token t+1); with a
        reduced vocabulary and CE, only those whose token is in the draft vocabulary."""
        m = batch["loss_mask"][:, 1:].bool()
        if self.reduced and not self.cfg.distills:
            m = m & (self.to_draft_ids(batch["input_ids"][:, 1:]) >= 0)
        return m.sum()

    def trainable_parameters(self):
        return [p for p in self.lm.parameters() if p.requires_grad]

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The HF causal LM's own tensor names (what save_pretrained writes; a tied head appears once)."""
        sd = {k: v.detach() for k, v in self.lm.state_dict().items()}
        if getattr(self.lm.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        return sd

    def proposer(self, target=None, options=None):
        """The verifier's independent draft-model proposer (own KV cache, crop on rejection, sampled probs)."""
        from specdistill.verify.proposer import ProposerOptions
        from specdistill.verify.proposers import DraftModelProposer

        self._check_ready()
        o = options or ProposerOptions()
        model = self.lm if target is None else self.lm.to(target.device)
        ids = self.draft_ids.clone() if self.reduced else None
        return DraftModelProposer(model.eval(), o.num_draft_tokens, o.temperature, o.top_p, o.top_k, seed=o.seed,
                                  confidence_threshold=o.confidence_threshold, tree=o.tree, draft_ids=ids,
                                  vocab_size=self.vocab_size)

    def export_info(self) -> dict:
        return {"variant": self.variant, "num_layers": int(self.lm.config.num_hidden_layers),
                "vocab_size": self.vocab_size, "draft_vocab_size": int(self.draft_vocab_size),
                "hf_config": self.lm.config,
                "architecture": type(self.lm).__name__}

    # -- rollout (DistillSpec / GKD on-policy data) -------------------------------------------

    @staticmethod
    def rollout_rows(seeds: torch.Tensor, lmbda: float) -> list[bool]:
        """Which rows the draft continues: row b iff Generator(seeds[b]).rand() < lmbda (split-invariant)."""
        out = []
        for s in seeds.tolist():
            g = torch.Generator().manual_seed(int(s))
            out.append(bool(torch.rand((), generator=g) < lmbda))
        return out

    @torch.no_grad()
    def _sample(self, prompt: list[int], seed: int) -> list[int]:
        from transformers import DynamicCache

        g = torch.Generator().manual_seed(int(seed) ^ 0x5EED)
        dev = self.lm.get_input_embeddings().weight.device
        cache = DynamicCache(config=self.lm.config)
        ids = torch.tensor([prompt], device=dev)
        out: list[int] = []
        for _ in range(self.cfg.rollout_tokens):
            o = self.lm.model(input_ids=ids, cache=cache, use_cache=True)
            z = self.lm.lm_head(o.last_hidden_state[:, -1]).float().cpu()[0]
            x = int(torch.multinomial(torch.softmax(z / self.cfg.rollout_temperature, -1), 1, generator=g))
            x = int(self.draft_ids[x]) if self.reduced else x  # draft id -> target id
            out.append(x)
            if x in self.eos_ids:
                break
            ids = torch.tensor([[x]], device=dev)
        return out

    def rollout(self, batch: dict, target, seeds: torch.Tensor) -> dict:
        """Rows chosen by `rollout_rows` keep their prompt and get a draft-sampled continuation as
        their loss tokens; the other rows are unchanged. Right-padded with the target's pad id."""
        chosen = self.rollout_rows(seeds, self.cfg.lmbda)
        if not any(chosen):
            return batch
        was_training = self.lm.training
        self.lm.eval()
        ids, att, mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        rows = []
        for b, pick in enumerate(chosen):
            n = int(att[b].sum())
            if not pick:
                rows.append((ids[b, :n].tolist(), mask[b, :n].tolist()))
                continue
            first = int(mask[b].nonzero()[0]) if mask[b].any() else n
            prompt = ids[b, :max(first, 1)].tolist()
            cont = self._sample(prompt, int(seeds[b]))
            rows.append((prompt + cont, [0] * len(prompt) + [1] * len(cont)))
        self.lm.train(was_training)
        T = max(len(r) for r, _ in rows)
        out = dict(batch)
        out["input_ids"] = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        out["attention_mask"] = torch.zeros((len(rows), T), dtype=torch.long)
        out["loss_mask"] = torch.zeros((len(rows), T), dtype=torch.long)
        for b, (r, m) in enumerate(rows):
            out["input_ids"][b, :len(r)] = torch.tensor(r)
            out["attention_mask"][b, :len(r)] = 1
            out["loss_mask"][b, :len(r)] = torch.tensor(m)
        out["rolled_out"] = torch.tensor(chosen)
        return {k: (v.to(ids.device) if torch.is_tensor(v) else v) for k, v in out.items()}

    # -- loss ---------------------------------------------------------------------------------

    def _rows_loss(self, h: torch.Tensor, th: torch.Tensor | None, labels: torch.Tensor):
        """(sum loss, correct) over rows: draft head on h (n, H); target head on th, or hard labels."""
        z = self.lm.lm_head(h)
        if th is None:
            return losses.cross_entropy(z, labels, "sum"), (z.argmax(-1) == labels).sum()
        with torch.no_grad():
            hb = self._frozen.get("head_bias")
            if hb is not None and self.reduced:
                hb = hb[self.draft_ids.to(hb.device)]
            # Over a reduced vocabulary: the target's logits of the subset only, so its softmax is the
            # target renormalised over the subset (module docstring).
            zt = torch.nn.functional.linear(th.to(self._frozen["head"].dtype), self.head_rows(), hb)
            lt = torch.log_softmax(zt.float(), -1)
        name = self.cfg.loss
        if name == "forward_kl":
            per = losses.forward_kl(z, lt, "sum")
        elif name == "reverse_kl":
            per = losses.reverse_kl(z, lt, "sum")
        elif name == "jsd":
            per = losses.jsd(z, lt, self.cfg.beta, "sum")
        else:
            per = losses.tvd(z, lt, "sum")
        return per, (z.argmax(-1) == zt.argmax(-1)).sum()

    def loss(self, batch: dict, target_out) -> LossOutput:
        self._check_ready()
        m = batch["loss_mask"][:, 1:].bool()
        if self.reduced and not self.cfg.distills:  # CE: a label outside the draft vocabulary cannot be learnt
            m = m & (self.to_draft_ids(batch["input_ids"][:, 1:]) >= 0)
        out = self.lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        h = out.last_hidden_state[:, :-1][m]  # gather the loss positions before any head
        labels = self.to_draft_ids(batch["input_ids"][:, 1:][m])  # draft ids (= target ids for the full vocabulary)
        th = None
        if self.cfg.distills:
            if target_out is None or target_out.last_hidden is None:
                raise RuntimeError("small_lm: a divergence loss needs the target's last hidden state "
                                   "(the spec asks for target_output=hidden)")
            th = target_out.last_hidden[:, :-1][m].detach()
        total = h.new_zeros((), dtype=torch.float32)
        correct = torch.zeros((), dtype=torch.long, device=h.device)
        c = self.cfg.loss_chunk
        for i in range(0, h.shape[0], c):
            args = (h[i:i + c], None if th is None else th[i:i + c], labels[i:i + c])
            if torch.is_grad_enabled() and h.requires_grad and h.shape[0] > c:
                lo, co = checkpoint(self._rows_loss, *args, use_reentrant=False)
            else:
                lo, co = self._rows_loss(*args)
            total = total + lo
            correct = correct + co
        metrics = {"correct": correct}
        if "rolled_out" in batch:
            metrics["on_policy_tokens"] = m[batch["rolled_out"].bool()].sum()
        return LossOutput(total, m.sum(), metrics)


_HEAD, _EMBED = "lm.lm_head.weight", "lm.model.embed_tokens.weight"


def _drop_tied_head(module, state_dict, prefix, local_metadata):
    state_dict.pop(prefix + _HEAD, None)
    return state_dict


def _restore_tied_head(state_dict, prefix, *args):
    if prefix + _HEAD not in state_dict and prefix + _EMBED in state_dict:
        state_dict[prefix + _HEAD] = state_dict[prefix + _EMBED]


# ---------------------------------------------------------------------------------------------
# Registration


register(DrafterSpec(
    name="small_lm",
    config_cls=SmallLMConfig,
    drafter_cls=SmallLMDrafter,
    export_formats=("native", "hf_draft"),
    target_output=lambda cfg: "hidden" if cfg.distills else "none",
    rollout=lambda cfg: cfg.distills and cfg.lmbda > 0,
    paper="Seq-KD (Kim & Rush 2016, arXiv 1606.07947); DistillSpec (Zhou et al. 2024, arXiv 2310.08461); "
          "GKD (Agarwal et al. 2024, arXiv 2306.13649)",
))
