"""The verifier's built-in proposers from a `--drafter` spec: pld | hf:<dir or id> | truncated:<n> | an HF dir.

Saved drafters (exports, checkpoints) are read by `specdistill.loading`, which sits above this
package; verify/ imports nothing above it.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch

from specdistill.verify.proposer import Proposer, ProposerOptions
from specdistill.verify.proposers import DraftModelProposer, PromptLookupProposer, check_same_vocabulary

log = logging.getLogger(__name__)


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


def builtin_proposer(spec: str, target, o: ProposerOptions) -> Proposer | None:
    """The verifier's own proposers: pld, truncated:<n>, hf:<dir or id>, or an HF causal-LM directory;
    None when `spec` is none of them (a saved drafter: specdistill.loading.load_proposer)."""
    if spec == "pld":
        return PromptLookupProposer(o.num_draft_tokens, branches=o.tree[0] if o.tree else 1)
    if spec.startswith("truncated:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"--drafter {spec}: expected truncated:<number of layers>") from None
        return _draft_model(truncated_model(target, n), o)
    if spec.startswith("hf:"):
        return _draft_model(load_hf_model(spec[3:], target), o)
    path = Path(spec).expanduser()
    if _is_hf_dir(path):
        return _draft_model(load_hf_model(str(path), target), o)
    return None


def _draft_model(model, o: ProposerOptions) -> Proposer:
    return DraftModelProposer(model, o.num_draft_tokens, o.temperature, o.top_p, o.top_k, seed=o.seed,
                              confidence_threshold=o.confidence_threshold, tree=o.tree)
