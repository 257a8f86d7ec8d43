"""SGLang EAGLE-3 draft layout (`LlamaForCausalLMEagle3`, FORMATS.md 1.1); EAGLE-1 drafters get
SGLang's `LlamaForCausalLMEagle` layout instead (export/eagle1.py).

Serve with: `python -m sglang.launch_server --model <target> --speculative-algorithm EAGLE3
--speculative-draft-model-path <dir> --speculative-num-steps 3 --speculative-eagle-topk 1
--speculative-num-draft-tokens 4`. vLLM reads the same directory with
`--speculative-config '{"method": "eagle3", "model": "<dir>", "num_speculative_tokens": 3}'`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from specdistill.export import common, contracts, eagle1, formats, native

FORMAT = "sglang"


def build(drafter, target, dtype: str = "bfloat16") -> tuple[dict, dict]:
    """(config.json dict, tensors) of the SGLang layout; not yet checked."""
    if drafter.variant == "eagle1":
        return eagle1.build_sglang(drafter, target, dtype)
    gap = common.eagle3_engine_gap(drafter)
    if gap:
        raise contracts.ContractError(f"{FORMAT} export: {gap}")
    sd = drafter.export_state_dict()
    tensors = common.cast({k: v for k, v in sd.items() if not k.startswith("embed_tokens.")},
                          common.torch_dtype(dtype))
    d = common.eagle_dims(drafter, target, tensors)
    cfg = common.llama_config("LlamaForCausalLMEagle3", d, 1, dtype)
    cfg.update({
        "draft_vocab_size": d["draft_vocab_size"],
        "target_hidden_size": d["target_hidden_size"],
        # vLLM-only key, written so vLLM never falls back to a default that differs from SGLang.
        "norm_before_residual": d["norm_before_residual"],
        # EAGLE-3.1 switches (SpecForge PR 568; SGLang's Eagle3 model reads both, a missing key as false)
        **{k: bool(drafter.export_info().get(k, False)) for k in ("fc_norm", "norm_output")},
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": d["layer_ids"],
            "use_aux_hidden_state": True,
        },
    })
    return cfg, tensors


def engine_gap(drafter) -> str | None:
    """Why the SGLang layouts cannot express this drafter, or None."""
    if drafter.variant == "eagle1":
        return eagle1.sglang_gap(drafter)
    return common.eagle3_engine_gap(drafter)


def write(drafter, target, out_dir: str | Path, dtype: str = "bfloat16") -> Path:
    cfg, tensors = build(drafter, target, dtype)
    contracts.check_sglang(cfg, tensors, target.num_layers)
    meta = common.metadata(drafter, target, FORMAT, dtype)
    return common.write_export(Path(out_dir), cfg, tensors, meta)


formats.register(formats.ExportFormat(
    name=FORMAT, build=build, check=contracts.check_sglang, engine="SGLang (LlamaForCausalLMEagle3 / LlamaForCausalLMEagle)", engine_gap=engine_gap,
    claims=lambda p: native.is_engine_export(p, FORMAT), load=native.load_engine_export))


def card_serving(inp, repo: str) -> list[str]:
    """Model-card serving text of an SGLang EAGLE export (export/card.py `_serving`)."""
    from specdistill.export import card, vllm

    k = card.speculative_tokens(inp)
    algo = "EAGLE3" if card.variant_of(inp) == "eagle3" else "EAGLE"
    return vllm.serve_line(inp, repo) + [
        "### SGLang", "", "```bash",
        f"python -m sglang.launch_server --model {card.target_of(inp)} --speculative-algorithm {algo} \\",
        f"  --speculative-draft-model-path {repo} --speculative-num-steps {k} \\",
        f"  --speculative-eagle-topk 1 --speculative-num-draft-tokens {k + 1}", "```", ""]


formats.REGISTRY[FORMAT] = dataclasses.replace(formats.REGISTRY[FORMAT], card_serving=card_serving)
