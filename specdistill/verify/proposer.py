"""Proposer contract (DESIGN.md): `Proposer.propose(state) -> DraftTree`; a chain is a one-branch tree."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ProposerOptions:
    """Settings every loader receives; a family reads the ones that apply to it."""

    num_draft_tokens: int = 5
    """Draft length (chain) or depth (tree)."""
    tree: tuple[int, ...] | None = None
    """Branching factor per depth for tree drafts (e.g. (4, 2, 1)); None = a chain."""
    temperature: float = 0.0
    """Sampling temperature of the run; drafters may sample from their own distribution at it."""
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    confidence_threshold: float = 0.0
    """Draft-model proposers stop a draft when their next token's probability is below this (0 = off)."""


@dataclass
class ProposerState:
    """What the verifier tells a proposer before each draft.

    tokens: (L,) every token so far, prompt included. The last one (the token the target just
        sampled, or the last prompt token before the first step) has not been through the target yet.
    hidden: layer id -> (m, H) target hidden states (targets.py layer convention) of the m tokens
        that went through the target and were accepted since the previous `propose` call, i.e. of
        positions L-1-m .. L-2. Only the layers in `Proposer.target_layers` are filled.
    """

    tokens: torch.Tensor
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    max_depth: int | None = None
    """Deepest draft position the verifier will use (the token budget left minus the bonus token);
    deeper nodes are dropped, so a proposer may stop drafting there. None = no limit."""


@dataclass
class DraftTree:
    """Draft tokens as a tree hanging below the last token of the state (the root).

    tokens:  (n,) draft token ids.
    parents: (n,) index of each node's parent in this tree, -1 for children of the root; nodes are
             topologically ordered (parents[i] < i). A chain is parents = [-1, 0, 1, ...].
    probs:   (n, V) the draft distribution each node's token was drawn from (given its parent), for
             lossless sampling; None means the drafter is deterministic (one-hot at each token).
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    probs: torch.Tensor | None = None

    @classmethod
    def chain(cls, tokens, probs=None) -> DraftTree:
        tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
        return cls(tokens, torch.arange(-1, len(tokens) - 1, dtype=torch.long), probs)

    @classmethod
    def empty(cls) -> DraftTree:
        return cls(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))

    def __len__(self) -> int:
        return int(self.tokens.numel())

    def is_chain(self) -> bool:
        return bool(torch.equal(self.parents, torch.arange(-1, len(self) - 1)))


class Proposer:
    """Base class: subclasses implement `propose`; `reset` is called once per generation."""

    target_layers: tuple[int, ...] = ()
    """Hidden states (targets.py convention) the verifier must hand over in ProposerState.hidden."""

    def reset(self, prompt_ids: torch.Tensor) -> None:  # noqa: B027 - optional hook
        pass

    def propose(self, state: ProposerState) -> DraftTree:
        raise NotImplementedError
