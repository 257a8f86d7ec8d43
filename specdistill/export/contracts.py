"""What each serving engine's loader requires of an export: EAGLE-3 for SGLang and vLLM (FORMATS.md
1.1 and 1.2), EAGLE-1 for SGLang (`LlamaForCausalLMEagle`, facts and sources in export/eagle1.py).

Every writer calls the matching `check_*` before a byte reaches disk. The most common failures in
the field are silent (a missing `d2t`, a layer-id off by one, a missing `norm_before_residual`
read differently by two engines), so each check raises a ContractError naming the key instead.
"""

from __future__ import annotations

import torch


class ContractError(ValueError):
    """An export would not load (or would load wrongly) in the engine; the message names the key."""


SGLANG_EAGLE1_ARCH = "LlamaForCausalLMEagle"


def _need(cfg: dict, key: str, where: str, types=None):
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ContractError(f"{where}: config key {key!r} is required and missing")
        node = node[part]
    if types is not None and (not isinstance(node, types) or (isinstance(node, bool) and bool not in _tuple(types))):
        raise ContractError(f"{where}: config key {key!r} must be {_names(types)}, got {node!r}")
    return node


def _tuple(t):
    return t if isinstance(t, tuple) else (t,)


def _names(t):
    return " or ".join(x.__name__ for x in _tuple(t))


def _eq(cfg: dict, key: str, want, where: str):
    got = _need(cfg, key, where)
    if got != want:
        raise ContractError(f"{where}: config key {key!r} must be {want!r}, got {got!r}")
    return got


def check_layer_ids(ids, num_target_layers: int, where: str, key: str, count: int = 3,
                    ascending: bool = True) -> list[int]:
    """Aux ids: `count` distinct ints, each a capture-before-layer id 0 <= i < N (targets.py convention)."""
    if not isinstance(ids, (list, tuple)) or not ids:
        raise ContractError(f"{where}: {key!r} must be an explicit non-empty list of layer ids, got {ids!r}")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ContractError(f"{where}: {key!r} must hold integers, got {ids!r}")
    if len(set(ids)) != len(ids):
        raise ContractError(f"{where}: {key!r} has duplicate layer ids {list(ids)}")
    bad = [i for i in ids if not 0 <= i < num_target_layers]
    if bad:
        raise ContractError(f"{where}: {key!r} ids {bad} out of range: engines capture the state entering "
                            f"layer i, so ids must be in 0..{num_target_layers - 1} for a {num_target_layers}-layer target")
    if ascending and list(ids) != sorted(ids):
        raise ContractError(f"{where}: {key!r} {list(ids)} must be ascending: engines capture the states while "
                            "running the layers in order and concatenate them in that order for fc")
    if count and len(ids) != count:
        raise ContractError(f"{where}: {key!r} must name {count} layers (fc input is {count} x target hidden), got {list(ids)}")
    return list(ids)


def _shape(tensors: dict, name: str, shape: tuple, where: str, dtype=None):
    if name not in tensors:
        raise ContractError(f"{where}: tensor {name!r} is required and missing")
    t = tensors[name]
    if tuple(t.shape) != tuple(shape):
        raise ContractError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, the engine expects {tuple(shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ContractError(f"{where}: tensor {name!r} must be {dtype}, got {t.dtype}")
    return t


def check_vocab_maps(tensors: dict, vd: int, v: int, where: str) -> None:
    d2t = _shape(tensors, "d2t", (vd,), where, torch.int64)
    t2d = _shape(tensors, "t2d", (v,), where, torch.bool)
    tid = torch.arange(vd, dtype=torch.int64) + d2t
    if vd and (int(tid.min()) < 0 or int(tid.max()) >= v):
        raise ContractError(f"{where}: tensor 'd2t' maps draft ids to target ids outside 0..{v - 1}")
    if vd > 1 and not bool((tid[1:] > tid[:-1]).all()):
        raise ContractError(f"{where}: tensor 'd2t' must map draft ids to strictly increasing target ids")
    if int(t2d.sum()) != vd:
        raise ContractError(f"{where}: tensor 't2d' has {int(t2d.sum())} True entries, draft_vocab_size is {vd}")
    if not bool(t2d[tid].all()):
        raise ContractError(f"{where}: tensors 'd2t' and 't2d' disagree (a draft token's target id is False in t2d)")


def _layer_shapes(prefix: str, d: dict, attn_in: int, norms: tuple[str, ...]) -> dict[str, tuple]:
    """{tensor name: shape} of one Llama decoder layer whose attention reads `attn_in` features."""
    h, i = d["hidden_size"], d["intermediate_size"]
    q, kv = d["num_attention_heads"] * d["head_dim"], d["num_key_value_heads"] * d["head_dim"]
    shapes = {f"{prefix}self_attn.q_proj.weight": (q, attn_in), f"{prefix}self_attn.k_proj.weight": (kv, attn_in),
              f"{prefix}self_attn.v_proj.weight": (kv, attn_in), f"{prefix}self_attn.o_proj.weight": (h, q),
              f"{prefix}mlp.gate_proj.weight": (i, h), f"{prefix}mlp.up_proj.weight": (i, h),
              f"{prefix}mlp.down_proj.weight": (h, i)}
    shapes.update({f"{prefix}{n}.weight": (h,) for n in norms})
    return shapes


def _eagle3_layer_shapes(prefix: str, d: dict) -> dict[str, tuple]:
    """The EAGLE-3 layer: attention reads concat(norm(embed), norm(hidden)), i.e. 2H inputs."""
    return _layer_shapes(prefix, d, 2 * d["hidden_size"], ("input_layernorm", "hidden_norm", "post_attention_layernorm"))


def _check_shapes(tensors: dict, shapes: dict[str, tuple], where: str) -> None:
    for name, shape in shapes.items():
        _shape(tensors, name, shape, where)


def _check_eagle3_tensors(tensors: dict, d: dict, prefix: str, maps: bool, where: str) -> None:
    h, ht, vd, v = d["hidden_size"], d["target_hidden_size"], d["draft_vocab_size"], d["vocab_size"]
    if "embed_tokens.weight" in tensors:
        raise ContractError(f"{where}: tensor 'embed_tokens.weight' must be omitted (the engine shares the target's embedding)")
    other = "layers.0." if prefix == "midlayer." else "midlayer."
    stray = sorted(k for k in tensors if k.startswith(other))
    if stray:
        raise ContractError(f"{where}: tensor {stray[0]!r} uses the wrong prefix; this format stores the layer as {prefix}*")
    layer = _eagle3_layer_shapes(prefix, d)
    _check_shapes(tensors, layer, where)
    _shape(tensors, "fc.weight", (h, 3 * ht), where)
    _shape(tensors, "norm.weight", (h,), where)
    _shape(tensors, "lm_head.weight", (vd, h), where)
    expected = set(layer) | {"fc.weight", "norm.weight", "lm_head.weight"}
    if d.get("fc_norm"):  # EAGLE-3.1: one norm per fused target layer
        fc_norms = {f"fc_norm.{i}.weight": (ht,) for i in range(3)}
        _check_shapes(tensors, fc_norms, where)
        expected |= set(fc_norms)
    if maps:
        check_vocab_maps(tensors, vd, v, where)
        expected |= {"d2t", "t2d"}
    unknown = sorted(set(tensors) - expected)
    if unknown:
        raise ContractError(f"{where}: tensor {unknown[0]!r} is not part of this format (the engine would ignore or reject it)")


def _check_llama_keys(cfg: dict, where: str, prefix: str = "", num_layers: int | None = 1) -> None:
    """Llama config keys the engines read; `num_layers` None = any count >= 1."""
    for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
              "max_position_embeddings", "vocab_size"):
        v = _need(cfg, prefix + k, where, int)
        if v <= 0:
            raise ContractError(f"{where}: config key {prefix + k!r} must be > 0, got {v}")
    _need(cfg, prefix + "rms_norm_eps", where, (float, int))
    _need(cfg, prefix + "rope_theta", where, (float, int))
    _eq(cfg, prefix + "hidden_act", "silu", where)
    _eq(cfg, prefix + "model_type", "llama", where)
    if num_layers is not None:
        _eq(cfg, prefix + "num_hidden_layers", num_layers, where)
    elif _need(cfg, prefix + "num_hidden_layers", where, int) < 1:
        raise ContractError(f"{where}: config key {prefix + 'num_hidden_layers'!r} must be >= 1")


def _dims_from(cfg: dict, layer: dict) -> dict:
    return {k: layer[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                  "num_key_value_heads", "head_dim", "vocab_size")} | {
        "draft_vocab_size": cfg["draft_vocab_size"], "target_hidden_size": cfg["target_hidden_size"],
        "fc_norm": bool(cfg.get("fc_norm"))}


def check_sglang(cfg: dict, tensors: dict, num_target_layers: int) -> None:
    """SGLang `LlamaForCausalLMEagle3` (also what vLLM's `method: eagle3` reads from a directory), or
    `LlamaForCausalLMEagle` (EAGLE-1) when the config names that architecture."""
    if isinstance(cfg, dict) and cfg.get("architectures") == [SGLANG_EAGLE1_ARCH]:
        return check_sglang_eagle1(cfg, tensors, num_target_layers)
    where = "sglang export"
    _eq(cfg, "architectures", ["LlamaForCausalLMEagle3"], where)
    _check_llama_keys(cfg, where)
    _eq(cfg, "tie_word_embeddings", False, where)
    _need(cfg, "torch_dtype", where, str)
    vd = _need(cfg, "draft_vocab_size", where, int)
    if not 0 < vd <= cfg["vocab_size"]:
        raise ContractError(f"{where}: config key 'draft_vocab_size' ({vd}) must be in 1..vocab_size ({cfg['vocab_size']})")
    _need(cfg, "target_hidden_size", where, int)
    _eq(cfg, "eagle_config.use_aux_hidden_state", True, where)
    ids = _need(cfg, "eagle_config.eagle_aux_hidden_state_layer_ids", where)
    check_layer_ids(ids, num_target_layers, where, "eagle_config.eagle_aux_hidden_state_layer_ids")
    # SGLang's Eagle3 layer always keeps the un-normed hidden state as the residual.
    if _need(cfg, "norm_before_residual", where, bool):
        raise ContractError(f"{where}: config key 'norm_before_residual' is true, which SGLang's "
                            "LlamaForCausalLMEagle3 cannot express; export this drafter for vLLM only")
    _check_eagle3_tensors(tensors, _dims_from(cfg, cfg), "midlayer.", True, where)


def check_vllm(cfg: dict, tensors: dict, num_target_layers: int) -> None:
    """vLLM speculators format (`speculators_model_type: eagle3`), as checked against speculators 0.9.0."""
    where = "vllm export"
    _eq(cfg, "architectures", ["Eagle3Speculator"], where)
    _eq(cfg, "speculators_model_type", "eagle3", where)
    _eq(cfg, "speculators_config.algorithm", "eagle3", where)
    methods = _need(cfg, "speculators_config.proposal_methods", where, list)
    if not methods:
        raise ContractError(f"{where}: config key 'speculators_config.proposal_methods' must not be empty")
    for n, m in enumerate(methods):
        mw = f"{where}: speculators_config.proposal_methods[{n}]"
        _eq(m, "proposal_type", "greedy", mw)
        st = _need(m, "speculative_tokens", mw, int)
        if st < 1:
            raise ContractError(f"{mw}: 'speculative_tokens' must be >= 1, got {st}")
        _need(m, "verifier_accept_k", mw, int)
        _need(m, "accept_tolerance", mw, (float, int))
    default = _need(cfg, "speculators_config.default_proposal_method", where, str)
    if default not in {m["proposal_type"] for m in methods}:
        raise ContractError(f"{where}: 'speculators_config.default_proposal_method' ({default!r}) names no proposal method")
    name = _need(cfg, "speculators_config.verifier.name_or_path", where, str)
    if not name:
        raise ContractError(f"{where}: 'speculators_config.verifier.name_or_path' is empty; vLLM loads the target from it")
    archs = _need(cfg, "speculators_config.verifier.architectures", where, list)
    if not archs:
        raise ContractError(f"{where}: 'speculators_config.verifier.architectures' must not be empty")
    layer = _need(cfg, "transformer_layer_config", where, dict)
    _check_llama_keys(cfg, where, "transformer_layer_config.")
    # speculators reads a missing key as false and vLLM as true: it must be explicit.
    _need(cfg, "norm_before_residual", where, bool)
    vd = _need(cfg, "draft_vocab_size", where, int)
    v = layer["vocab_size"]
    if not 0 < vd <= v:
        raise ContractError(f"{where}: config key 'draft_vocab_size' ({vd}) must be in 1..vocab_size ({v})")
    _need(cfg, "target_hidden_size", where, int)
    ids = _need(cfg, "eagle_aux_hidden_state_layer_ids", where)
    check_layer_ids(ids, num_target_layers, where, "eagle_aux_hidden_state_layer_ids")
    pruned = vd < v
    if pruned and ("d2t" not in tensors or "t2d" not in tensors):
        missing = "d2t" if "d2t" not in tensors else "t2d"
        raise ContractError(f"{where}: tensor {missing!r} is required when the draft vocabulary is pruned "
                            f"({vd} < {v}); without it vLLM maps draft ids to the first {vd} target ids")
    if not pruned and ("d2t" in tensors or "t2d" in tensors):
        raise ContractError(f"{where}: tensors 'd2t'/'t2d' must be absent with a full draft vocabulary")
    _check_eagle3_tensors(tensors, _dims_from(cfg, layer), "layers.0.", pruned, where)


def _eagle1_layer_shapes(prefix: str, d: dict, input_norm: bool) -> dict[str, tuple]:
    """One EAGLE-1 layer: attention reads the H-wide fc output; layer 0 has no input norm."""
    norms = ("input_layernorm", "post_attention_layernorm") if input_norm else ("post_attention_layernorm",)
    return _layer_shapes(prefix, d, d["hidden_size"], norms)


def check_sglang_eagle1(cfg: dict, tensors: dict, num_target_layers: int) -> None:
    """SGLang `LlamaForCausalLMEagle` (EAGLE-1): fc 2H->H with bias, `layers.{i}.*`, the target's
    embedding and LM head (never read from the file), layer 0 without input_layernorm."""
    where = "sglang export (EAGLE-1)"
    _eq(cfg, "architectures", [SGLANG_EAGLE1_ARCH], where)
    _check_llama_keys(cfg, where, num_layers=None)
    # SGLang replaces embed_tokens and lm_head with the target's; tied, they would be one module.
    _eq(cfg, "tie_word_embeddings", False, where)
    _need(cfg, "torch_dtype", where, str)
    for name in ("embed_tokens.weight", "lm_head.weight"):
        if name in tensors:
            raise ContractError(f"{where}: tensor {name!r} must be omitted: SGLang takes the target's embedding "
                                "and LM head for EAGLE-1 (set_embed_and_head) and never reads them from the draft")
    stray = sorted(k for k in tensors if k.startswith("midlayer."))
    if stray:
        raise ContractError(f"{where}: tensor {stray[0]!r} uses the wrong prefix; this format stores layer 0 as layers.0.*")
    h = cfg["hidden_size"]
    _shape(tensors, "fc.weight", (h, 2 * h), where)
    # nn.Linear's default bias=True in SGLang: without the tensor the bias keeps its random init.
    _shape(tensors, "fc.bias", (h,), where)
    expected = {"fc.weight", "fc.bias"}
    if "layers.0.input_layernorm.weight" in tensors:
        raise ContractError(f"{where}: tensor 'layers.0.input_layernorm.weight' must be absent: SGLang's first "
                            "EAGLE-1 layer has no input_layernorm (the fc output is attended directly)")
    for n in range(cfg["num_hidden_layers"]):
        layer = _eagle1_layer_shapes(f"layers.{n}.", cfg, n > 0)
        _check_shapes(tensors, layer, where)
        expected |= set(layer)
    unknown = sorted(set(tensors) - expected)
    if unknown:
        raise ContractError(f"{where}: tensor {unknown[0]!r} is not part of this format (the engine would ignore or "
                            f"reject it; num_hidden_layers is {cfg['num_hidden_layers']})")


CHECKS = {"sglang": check_sglang, "vllm": check_vllm}
