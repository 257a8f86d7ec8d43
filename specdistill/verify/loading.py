"""Turn a `--drafter` spec into a Proposer: pld | hf:<dir or id> | truncated:<n> | <export dir | checkpoint>.

Drafter families plug their own export/checkpoint formats in with `register_loader(predicate, fn)`
at import time (their module is imported by `specdistill.drafters`), so this file never has to
know them.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from specdistill.verify.proposer import Proposer, ProposerOptions
from specdistill.verify.proposers import DraftModelProposer, PromptLookupProposer, check_same_vocabulary

log = logging.getLogger(__name__)


Loader = Callable[[Path, "object", ProposerOptions], Proposer]
_LOADERS: list[tuple[str, Callable[[Path], bool], Loader]] = []


def register_loader(predicate: Callable[[Path], bool], fn: Loader, name: str = "") -> None:
    """Claim drafter paths: `predicate(path)` says whether `fn(path, target, options)` can load it.

    Later registrations are tried first, so a family can override the generic HF fallback.
    """
    _LOADERS.insert(0, (name or getattr(fn, "__name__", "loader"), predicate, fn))


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read drafter metadata ({e})") from e


def truncated_model(target, n: int):
    """The target's first n decoder layers + its final norm and lm_head, sharing the weights.

    An untrained but well-formed draft (the usual baseline in HF assisted-generation examples).
    """
    total = target.num_layers
    if not 1 <= n < total:
        raise ValueError(f"truncated:{n}: need 1 <= n < {total} (the target has {total} layers)")
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(target.config)
    cfg.num_hidden_layers = n
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types)[:n]
    with torch.device("meta"):
        draft = AutoModelForCausalLM.from_config(cfg)
    src = target.model
    draft.model.embed_tokens = src.model.embed_tokens
    draft.model.layers = torch.nn.ModuleList(list(src.model.layers[:n]))
    draft.model.norm = src.model.norm
    draft.model.rotary_emb = src.model.rotary_emb
    draft.lm_head = src.lm_head
    left = [k for k, p in list(draft.named_parameters()) + list(draft.named_buffers()) if p.is_meta]
    if left:
        raise RuntimeError(f"truncated:{n}: modules not taken from the target: {left[:5]}")
    draft.generation_config = copy.deepcopy(src.generation_config)
    return draft.eval()


def load_hf_model(name: str, target):
    """A causal LM by local directory or hub id, checked to share the target's vocabulary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(name, dtype=target.model.dtype).eval()
    tok = None
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, TypeError):
        log.info("%s has no tokenizer; checking the vocabulary size only", name)
    check_same_vocabulary(target, model, tok, name=name)
    return model.to(target.device)


def _is_hf_dir(path: Path) -> bool:
    if not (path.is_dir() and (path / "config.json").exists()):
        return False
    cfg = read_json(path / "config.json")
    archs = cfg.get("architectures") or []
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
    return has_weights and any(str(a).endswith("ForCausalLM") for a in archs)


def _load_hf_dir(path: Path, target, opts: ProposerOptions) -> Proposer:
    return DraftModelProposer(load_hf_model(str(path), target), opts.num_draft_tokens, opts.temperature,
                              opts.top_p, opts.top_k, seed=opts.seed, confidence_threshold=opts.confidence_threshold, tree=opts.tree)


register_loader(_is_hf_dir, _load_hf_dir, "hf_causal_lm")


def _import_families() -> None:
    """Importing the drafters package runs the families' `register_loader` calls."""
    try:
        import specdistill.drafters  # noqa: F401
        import specdistill.export  # noqa: F401  (registers loaders for export and checkpoint dirs)
    except ImportError as e:  # a broken family must not make pld/hf drafters unusable
        log.warning("could not import specdistill.drafters (%s); only built-in loaders are available", e)


def load_proposer(spec: str, target, options: ProposerOptions | None = None, **opts) -> Proposer:
    """Build a proposer for `target` from a `--drafter` spec (module docstring)."""
    o = options or ProposerOptions(**opts)
    if spec == "pld":
        return PromptLookupProposer(o.num_draft_tokens, branches=o.tree[0] if o.tree else 1)
    if spec.startswith("truncated:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"--drafter {spec}: expected truncated:<number of layers>") from None
        return DraftModelProposer(truncated_model(target, n), o.num_draft_tokens, o.temperature, o.top_p,
                                  o.top_k, seed=o.seed, confidence_threshold=o.confidence_threshold, tree=o.tree)
    if spec.startswith("hf:"):
        return DraftModelProposer(load_hf_model(spec[3:], target), o.num_draft_tokens, o.temperature,
                                  o.top_p, o.top_k, seed=o.seed, confidence_threshold=o.confidence_threshold, tree=o.tree)
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--drafter {spec}: not pld, hf:<model>, truncated:<n>, nor an existing path")
    _import_families()
    for _name, pred, fn in _LOADERS:
        if pred(path):
            return fn(path, target, o)
    found = sorted(p.name for p in path.iterdir())[:20] if path.is_dir() else [path.name]
    raise ValueError(f"{path}: no drafter loader recognises it (contents: {found}); known loaders: "
                     f"{[n for n, _, _ in _LOADERS]}. A family registers one with "
                     "specdistill.verify.loading.register_loader(predicate, fn).")
