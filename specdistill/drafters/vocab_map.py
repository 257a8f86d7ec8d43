"""What drafters that predict over a reduced draft vocabulary share (EAGLE-3, Medusa, CTC, small_lm): the d2t/t2d
map of FORMATS.md 1.1, the target tensors they read without owning, and `fit` building the map.

    class MyDrafter(DraftVocabulary, Drafter):
        def __init__(self, cfg, target):
            super().__init__()
            self._hold_target_tensors(head=target.lm_head.weight, ...)
            self._init_draft_vocabulary(target.vocab_size, cfg.draft_vocab_size or target.vocab_size)

d2t [Vd] (target id = draft id + d2t[draft id]), t2d [V] and `vocab_map_ready` are persistent buffers
(saved with the weights); `draft_ids` [Vd] and `draft_index` [V] (target id -> draft id, -1 outside)
are derived from d2t after every install or load. Until a map is installed a reduced vocabulary is
not ready (`_check_ready` raises), so draft ids never silently mean the first Vd target ids.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class FrozenTargetTensors:
    """Target tensors held outside the module tree (`self._frozen`): they share the target's storage (no
    copy), are never saved or trained, and DDP does not re-broadcast them every step as it would buffers.
    `.to()` still reaches them, and a tied embedding/head stays one tensor."""

    def _hold_target_tensors(self, **tensors: torch.Tensor) -> None:
        frozen: dict[str, torch.Tensor] = {}
        seen: dict[int, torch.Tensor] = {}
        for k, t in tensors.items():
            frozen[k] = seen.setdefault(id(t), t.detach())
        self._frozen = frozen

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        done: dict[int, torch.Tensor] = {}
        for k, v in getattr(self, "_frozen", {}).items():
            if id(v) not in done:
                done[id(v)] = fn(v)
            self._frozen[k] = done[id(v)]
        return self


class DraftVocabulary(FrozenTargetTensors):
    """The d2t/t2d draft-vocabulary map (module docstring) for a drafter whose `_frozen["head"]` is the
    target's LM head. A family re-initialises its own rows in `_on_vocab_map()` (called after `set_vocab_map`)."""

    def _init_draft_vocabulary(self, vocab_size: int, draft_vocab_size: int, persistent: bool = True) -> None:
        """`persistent=False` keeps d2t/t2d/vocab_map_ready out of the state dict (small_lm at full
        vocabulary: its weights stay a plain causal LM's)."""
        self.vocab_size, self.draft_vocab_size = vocab_size, draft_vocab_size
        v, vd = vocab_size, draft_vocab_size
        self.register_buffer("d2t", torch.zeros(vd, dtype=torch.int64), persistent=persistent)
        self.register_buffer("t2d", torch.arange(v) < vd, persistent=persistent)
        self.register_buffer("vocab_map_ready", torch.tensor(vd == v), persistent=persistent)
        self.register_buffer("draft_ids", torch.arange(vd), persistent=False)
        self.register_buffer("draft_index", torch.where(torch.arange(v) < vd, torch.arange(v), -1), persistent=False)

    def head_rows(self) -> torch.Tensor:
        """The target LM head's rows of the draft vocabulary (Vd, H), sliced once per vocab map:
        a fresh slice would copy Vd x H weights on every training step and every draft step."""
        head = self._frozen["head"]
        if self.draft_vocab_size == self.vocab_size:
            return head
        rows = self._frozen.get("head_rows")
        if rows is None or rows.dtype != head.dtype or rows.device != head.device:
            rows = self._frozen["head_rows"] = head[self.draft_ids.to(head.device)]
        return rows

    def to_draft_ids(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Target ids -> draft ids, -1 for tokens outside the draft vocabulary."""
        if self.draft_vocab_size == self.vocab_size:
            return target_ids
        return self.draft_index.to(target_ids.device)[target_ids]

    def _checked_vocab_map(self, d2t, t2d) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(d2t, t2d, draft ids) after checking the shapes and that d2t maps into t2d one-to-one."""
        d2t = torch.as_tensor(d2t, dtype=torch.int64).flatten().cpu()
        t2d = torch.as_tensor(t2d, dtype=torch.bool).flatten().cpu()
        if d2t.numel() != self.draft_vocab_size or t2d.numel() != self.vocab_size:
            raise ValueError(f"vocab map shapes d2t {tuple(d2t.shape)} / t2d {tuple(t2d.shape)} do not match "
                             f"drafter.draft_vocab_size {self.draft_vocab_size} / target vocab {self.vocab_size}")
        ids = torch.arange(d2t.numel()) + d2t
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size or not bool(t2d[ids].all()) \
                or int(t2d.sum()) != d2t.numel():
            raise ValueError("vocab map is inconsistent: d2t must map draft ids into t2d's True entries one-to-one")
        return d2t, t2d, ids

    def _sync_vocab(self) -> None:
        with torch.no_grad():
            ids = torch.arange(self.d2t.numel(), device=self.d2t.device) + self.d2t
            self.draft_ids.copy_(ids.to(self.draft_ids.device))
            self.draft_index.fill_(-1)
            self.draft_index[ids.to(self.draft_index.device)] = torch.arange(ids.numel(), device=self.draft_index.device)
        self._frozen.pop("head_rows", None)

    def set_vocab_map(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        """Install the draft vocabulary (specdistill.data.vocab) before training."""
        d2t, t2d, _ = self._checked_vocab_map(d2t, t2d)
        with torch.no_grad():
            self.d2t.copy_(d2t)
            self.t2d.copy_(t2d)
            self.vocab_map_ready.fill_(True)
        self._sync_vocab()
        self._on_vocab_map()

    def _on_vocab_map(self) -> None:
        """A family's rows that depend on the map (e.g. heads initialised from the target's rows)."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # An engine export (FORMATS.md 1.1) carries d2t/t2d but not our `vocab_map_ready` flag: a map
        # that comes with the weights is installed (checked as set_vocab_map checks it).
        d2t, t2d = state_dict.get(prefix + "d2t"), state_dict.get(prefix + "t2d")
        map_given = d2t is not None and t2d is not None and prefix + "vocab_map_ready" not in state_dict
        if map_given:
            self._checked_vocab_map(d2t, t2d)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sync_vocab()  # draft_ids / draft_index follow the persistent d2t
        if map_given:
            with torch.no_grad():
                self.vocab_map_ready.fill_(True)

    def _check_ready(self) -> None:
        if not bool(self.vocab_map_ready):
            raise RuntimeError(
                f"drafter.draft_vocab_size={self.draft_vocab_size} < {self.vocab_size} but no vocab map was set: "
                "call drafter.fit(train_data, target) or set_vocab_map(d2t, t2d) (specdistill.data.vocab) before "
                "training, or the draft ids silently mean the first Vd target ids")

    def fit(self, train_data, target, data_key: str = "") -> None:
        """Build the draft vocabulary from label-token frequencies when draft_vocab_size < the target's
        vocabulary (cached under data/vocab by `data_key`); nothing to do for the full vocabulary."""
        vd = self.draft_vocab_size
        if vd >= target.vocab_size:
            return
        from specdistill.data import vocab

        vm = vocab.build(train_data, target.vocab_size, vd, data_key=data_key, tokenizer=target.tokenizer)
        self.set_vocab_map(vm.d2t, vm.t2d)
        log.info("draft vocabulary: %d of %d tokens, covering %.1f%% of training labels", vd, target.vocab_size,
                 100 * vm.coverage)
