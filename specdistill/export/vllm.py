"""vLLM speculators format (`Eagle3Speculator`, FORMATS.md 1.2): `vllm serve <dir>` auto-detects it.

Decoder weights are stored as `layers.0.*` (speculators 0.9.0 loads `midlayer.*` keys as random
layers with only a warning); `d2t`/`t2d` only when the draft vocabulary is pruned; every key whose
default differs between speculators and vLLM (`norm_before_residual`) is written explicitly.
EAGLE-1 is refused: no vLLM loader was found that runs its biased fc (export/eagle1.py has the sources).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from specdistill.export import common, contracts, eagle1, formats, native

FORMAT = "vllm"
SPECULATORS_VERSION = "0.9.0"


def build(drafter, target, dtype: str = "bfloat16", speculative_tokens: int = 3) -> tuple[dict, dict]:
    gap = engine_gap(drafter)
    if gap:
        raise contracts.ContractError(f"{FORMAT} export: {gap}")
    sd = drafter.export_state_dict()
    raw = {}
    for k, v in sd.items():
        if k.startswith("embed_tokens."):
            continue
        raw["layers.0." + k[len("midlayer."):] if k.startswith("midlayer.") else k] = v
    tensors = common.cast(raw, common.torch_dtype(dtype))
    d = common.eagle_dims(drafter, target, tensors)
    if d["draft_vocab_size"] >= d["vocab_size"]:
        tensors.pop("d2t", None)
        tensors.pop("t2d", None)
    layer = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "head_dim": d["head_dim"],
        "hidden_act": d["hidden_act"],
        "hidden_size": d["hidden_size"],
        "initializer_range": d["initializer_range"],
        "intermediate_size": d["intermediate_size"],
        "max_position_embeddings": d["max_position_embeddings"],
        "mlp_bias": False,
        "num_attention_heads": d["num_attention_heads"],
        "num_hidden_layers": 1,
        "num_key_value_heads": d["num_key_value_heads"],
        "pretraining_tp": 1,
        "rms_norm_eps": d["rms_norm_eps"],
        "rope_scaling": d["rope_scaling"],
        "rope_theta": d["rope_theta"],
        # transformers 5 reads rope settings from rope_parameters (speculators 0.9.0 writes both shapes)
        "rope_parameters": {"rope_type": "default", "rope_theta": d["rope_theta"]} if d["rope_scaling"] is None
        else {**d["rope_scaling"], "rope_theta": d["rope_theta"]},
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": d["vocab_size"],
    }
    cfg = {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_VERSION,
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{
                "proposal_type": "greedy",
                "speculative_tokens": int(speculative_tokens),
                "verifier_accept_k": 1,
                "accept_tolerance": 0.0,
            }],
            "default_proposal_method": "greedy",
            "verifier": {
                "name_or_path": common.target_name(target),
                "architectures": list(getattr(target.config, "architectures", None) or ["LlamaForCausalLM"]),
            },
        },
        "draft_vocab_size": d["draft_vocab_size"],
        "target_hidden_size": d["target_hidden_size"],
        "eagle_aux_hidden_state_layer_ids": d["layer_ids"],
        "norm_before_residual": d["norm_before_residual"],
        # EAGLE-3.1 switches (speculators PR 610; vLLM and speculators both read a missing key as false)
        **eagle31_flags(drafter),
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "transformers_version": common.transformers_version(),
        "transformer_layer_config": layer,
    }
    return cfg, tensors


def eagle31_flags(drafter) -> dict:
    """The EAGLE-3.1 config keys (`fc_norm`, `norm_output`) of this drafter, always written explicitly."""
    info = drafter.export_info()
    return {k: bool(info.get(k, False)) for k in ("fc_norm", "norm_output")}


def engine_gap(drafter) -> str | None:
    """Why the vLLM layout cannot express this drafter, or None."""
    if drafter.variant == "eagle1":
        return eagle1.VLLM_UNCONFIRMED
    return common.eagle3_engine_gap(drafter)


def write(drafter, target, out_dir: str | Path, dtype: str = "bfloat16", speculative_tokens: int = 3) -> Path:
    cfg, tensors = build(drafter, target, dtype, speculative_tokens)
    contracts.check_vllm(cfg, tensors, target.num_layers)
    meta = common.metadata(drafter, target, FORMAT, dtype)
    return common.write_export(Path(out_dir), cfg, tensors, meta)


formats.register(formats.ExportFormat(
    name=FORMAT, build=build, check=contracts.check_vllm, engine="vLLM (speculators Eagle3Speculator)", engine_gap=engine_gap,
    claims=lambda p: native.is_engine_export(p, FORMAT), load=native.load_engine_export))


def serve_line(inp, repo: str) -> list[str]:
    """The vLLM `--speculative-config` line of an EAGLE drafter (or why vLLM cannot serve it)."""
    from specdistill.export import card

    if card.variant_of(inp) == "eagle1":
        return ["### vLLM", "", "vLLM cannot serve this drafter: vLLM's EAGLE-1 model has no bias on its fusion "
                "layer `fc`, which this drafter has (reasons and sources: `specdistill/export/eagle1.py`).", ""]
    method = "eagle3" if card.variant_of(inp) == "eagle3" else "eagle"
    spec = json.dumps({"method": method, "model": repo, "num_speculative_tokens": card.speculative_tokens(inp)},
                      separators=(",", ":"))
    return ["### vLLM", "", "```bash", f"vllm serve {card.target_of(inp)} --speculative-config '{spec}'", "```", ""]


def card_serving(inp, repo: str) -> list[str]:
    """Model-card serving text of a vLLM speculators export (export/card.py `_serving`)."""
    from specdistill.export import card

    algo = "EAGLE3" if card.variant_of(inp) == "eagle3" else "EAGLE"
    return serve_line(inp, repo) + [
        "This repository is in the vLLM speculators layout, so `vllm serve " + repo
        + "` also works on its own (the target is read from `speculators_config.verifier`).", "",
        "### SGLang", "",
        "SGLang reads the `sglang` export of the same run (`specdistill export ... export.formats=[sglang]`), "
        f"served with `--speculative-algorithm {algo} --speculative-draft-model-path <that repo>`.", ""]


formats.REGISTRY[FORMAT] = dataclasses.replace(formats.REGISTRY[FORMAT], card_serving=card_serving)
