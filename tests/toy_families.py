"""Two toy families that exercise the parts of the Drafter protocol EAGLE does not use
(docs/adding_a_family.md walks through the first one):

- `toy_rollout`: a tiny bigram draft LM that continues each prompt by sampling from itself in the
  Trainer's rollout step (as DistillSpec/GKD/OSD do) and is trained with the forward KL to the
  target's full-vocabulary distribution on the sampled tokens (target_output = logits).
- `toy_lora`: a linear head on the target's last hidden state, trained together with rank-2 LoRA
  adapters on the target (trains_target, as Medusa-2 does).

Registered on import (idempotent), so tests and launched scripts can `import toy_families`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specdistill.drafters.base import REGISTRY, Drafter, DrafterSpec, LossOutput, register
from specdistill.verify.proposer import DraftTree, Proposer


@dataclass
class ToyRolloutConfig:
    name: str = "toy_rollout"
    """Registry name."""
    continuation: int = 4
    """Tokens the draft samples after each prompt in the rollout."""
    temperature: float = 1.0
    """Sampling temperature of the rollout."""


class _BigramProposer(Proposer):
    def __init__(self, drafter, k: int):
        self.drafter, self.k = drafter, k

    def propose(self, state) -> DraftTree:
        tok, out = int(state.tokens[-1]), []
        with torch.no_grad():
            for _ in range(self.k):
                tok = int(self.drafter.logits(torch.tensor([tok])).argmax(-1))
                out.append(tok)
        return DraftTree.chain(out)


class ToyRolloutDrafter(Drafter):
    def __init__(self, cfg: ToyRolloutConfig, vocab: int, pad_id: int):
        super().__init__()
        self.cfg, self.pad_id = cfg, pad_id
        self.emb = torch.nn.Embedding(vocab, 16)
        self.head = torch.nn.Linear(16, vocab)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids)))

    def rollout(self, batch, target, seeds):
        """Keep each row's prompt (the tokens before its first loss position) and append
        `continuation` tokens sampled from the draft, one generator per row."""
        ids, mask = batch["input_ids"], batch["loss_mask"]
        C, rows = self.cfg.continuation, []
        for b in range(ids.shape[0]):
            first = int(mask[b].nonzero()[0]) if mask[b].any() else int(batch["attention_mask"][b].sum())
            prompt = ids[b, :max(first, 1)].tolist()
            g = torch.Generator().manual_seed(int(seeds[b]))
            for _ in range(C):
                p = F.softmax(self.logits(torch.tensor([prompt[-1]], device=ids.device)).float().cpu()
                              / self.cfg.temperature, -1)
                prompt.append(int(torch.multinomial(p[0], 1, generator=g)))
            rows.append((prompt, len(prompt) - C))
        T = max(len(r) for r, _ in rows)
        out = {k: torch.full((len(rows), T), v, dtype=torch.long) for k, v in
               (("input_ids", self.pad_id), ("attention_mask", 0), ("loss_mask", 0))}
        for b, (r, plen) in enumerate(rows):
            out["input_ids"][b, :len(r)] = torch.tensor(r)
            out["attention_mask"][b, :len(r)] = 1
            out["loss_mask"][b, plen:len(r)] = 1
        return out

    def num_loss_tokens(self, batch):
        return batch["loss_mask"][:, 1:].sum()

    def loss(self, batch, target_out):
        """Sum over sampled tokens of KL(target || draft) at the position that predicts them."""
        m = batch["loss_mask"][:, 1:].bool()
        z_t = target_out.logits[:, :-1][m].float()
        z_d = self.logits(batch["input_ids"][:, :-1][m]).float()
        kl = F.kl_div(F.log_softmax(z_d, -1), F.log_softmax(z_t, -1), log_target=True, reduction="sum")
        agree = (z_d.argmax(-1) == z_t.argmax(-1)).sum()
        return LossOutput(kl, m.sum(), {"agree": agree})

    def trainable_parameters(self):
        return list(self.parameters())

    def proposer(self, target, options=None):
        return _BigramProposer(self, options.num_draft_tokens if options else 4)

    def export_state_dict(self):
        return {k: v.detach() for k, v in self.state_dict().items()}


@dataclass
class ToyLoraConfig:
    name: str = "toy_lora"
    """Registry name."""
    rank: int = 2
    """LoRA rank of the target's adapters."""
    head_lr_scale: float = 4.0
    """The head's learning rate as a multiple of train.lr (the adapters run at train.lr)."""


class ToyLoraDrafter(Drafter):
    def __init__(self, cfg: ToyLoraConfig, hidden: int, vocab: int):
        super().__init__()
        self.cfg = cfg
        self.head = torch.nn.Linear(hidden, vocab, bias=False)

    def lora_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.cfg.rank, lora_alpha=2 * self.cfg.rank, target_modules=["q_proj", "v_proj"],
                          lora_dropout=0.0)

    def num_loss_tokens(self, batch):
        return batch["loss_mask"][:, 2:].sum()

    def loss(self, batch, target_out):
        """CE of the token after next from the (adapted) target's last hidden state."""
        m = batch["loss_mask"][:, 2:].bool()
        z = self.head(target_out.last_hidden[:, :-2][m])
        return LossOutput(F.cross_entropy(z.float(), batch["input_ids"][:, 2:][m], reduction="sum"), m.sum())

    def trainable_parameters(self):
        return [{"params": list(self.parameters()), "lr_scale": self.cfg.head_lr_scale}]

    def proposer(self, target, options=None):
        raise NotImplementedError("toy_lora is for Trainer tests; it does not draft")

    def export_state_dict(self):
        return {k: v.detach() for k, v in self.state_dict().items()}


if "toy_rollout" not in REGISTRY:
    register(DrafterSpec(
        name="toy_rollout", config_cls=ToyRolloutConfig, drafter_cls=ToyRolloutDrafter,
        build=lambda cfg, t: ToyRolloutDrafter(cfg, t.vocab_size, int(t.tokenizer.pad_token_id or 0)),
        target_layers=lambda cfg, tc: [], target_output="logits", rollout=True, paper="test only"))
if "toy_lora" not in REGISTRY:
    register(DrafterSpec(
        name="toy_lora", config_cls=ToyLoraConfig, drafter_cls=ToyLoraDrafter,
        build=lambda cfg, t: ToyLoraDrafter(cfg, t.hidden_size, t.vocab_size),
        target_layers=lambda cfg, tc: [], target_output="hidden", trains_target=True, paper="test only"))
