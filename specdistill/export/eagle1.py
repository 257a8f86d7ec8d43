"""EAGLE-1 engine layouts: SGLang `LlamaForCausalLMEagle` is written; vLLM is refused.

Serve the `sglang` export with: `python -m sglang.launch_server --model <target>
--speculative-algorithm EAGLE --speculative-draft-model-path <dir> --speculative-num-steps 3
--speculative-eagle-topk 1 --speculative-num-draft-tokens 4`.

What our EAGLE-1 drafter computes (specdistill/drafters/eagle.py, variant="eagle1"):
    f_t   = final_norm(h_N)  (the target's last hidden state after its own final RMSNorm: layer id N)
    x     = fc(cat(embed(token), f_t))        fc: Linear(2H -> H, bias=True)
    x     = midlayer(x)                       Llama decoder layer *without* input_layernorm
    x     = layers[i](x) for i < num_layers-1 ordinary Llama decoder layers (input_layernorm kept)
    logits = target_lm_head(x)                no norm before the head; the head and the embedding
                                              are the target's, frozen, and not stored by us
Later draft steps feed x back in place of f_t.

Facts read for this module, with the file each one comes from (stored copies of the public
repositories; no code was copied):

SGLang (sgl-project/sglang)
- python/sglang/srt/models/llama_eagle.py
  * `EntryClass = [LlamaForCausalLMEagle]`, so config `architectures: ["LlamaForCausalLMEagle"]`
    selects it; the rest of the config is a plain LlamaConfig (hidden_size, intermediate_size,
    heads, kv heads, rms_norm_eps, rope_theta/rope_scaling, vocab_size, num_hidden_layers, ...).
  * Its LlamaModel has `embed_tokens`, `layers` (num_hidden_layers Llama decoder layers) and
    `fc = torch.nn.Linear(hidden_size * 2, hidden_size)`: PyTorch's default bias=True, so
    `fc.bias` is a parameter. The file must hold it; a missing one would keep its random init.
  * Forward: `fc(cat(embed_tokens(ids), spec_info.hidden_states))`, the layers, then
    `hidden_states + residual` with no final norm; that tensor goes straight to the LM head.
  * The decoder layer with layer_id 0 deletes `input_layernorm` (identity); layers >= 1 keep it.
  * `load_weights` drops every name containing "lm_head" and prefixes the others with "model."
    for LlamaForCausalLM.load_weights (q/k/v stacked into qkv_proj, gate/up into gate_up_proj).
  * `lm_head` is `model.embed_tokens` when `tie_word_embeddings` is true, else a ParallelLMHead of
    `hot_vocab_size` (set only with --speculative-token-map) or `vocab_size` rows.
- python/sglang/srt/speculative/eagle_worker.py: for every algorithm other than EAGLE3 the worker
  calls `draft_model.set_embed_and_head(embed, head)` with the *target's* embedding and LM head
  (the head's rows cut to --speculative-token-map when that server flag is given). So SGLang never
  uses an `embed_tokens`/`lm_head` from the draft file; we omit both.
- python/sglang/srt/models/llama.py: `LlamaDecoderLayer.forward(positions, hidden, batch, residual)`
  sets residual = hidden (first layer) or fuses `input_layernorm(hidden, residual)` (add, then
  norm), then attention, `post_attention_layernorm(hidden, residual)` (add, then norm), MLP. With
  the final `hidden + residual` this is the sequential `x = x + attn(norm_in(x)); x = x + mlp(norm_post(x))`
  our layers compute, norm_in being the identity in layer 0. `set_embed_and_head` (defined on
  LlamaForCausalLM, inherited by the EAGLE class) deletes `model.embed_tokens.weight` and
  `lm_head.weight` and assigns the target's embedding and head; with `tie_word_embeddings` true
  `lm_head` is the embedding module itself, so the two could not both be the target's: it must be false.
  The target's `LlamaModel.forward` ends with `norm(hidden, residual)` and LlamaForCausalLM hands
  that to the logits processor; python/sglang/srt/layers/logits_processor.py stores that same
  tensor as the captured hidden state when there are no aux states. So SGLang's EAGLE-1 feature is
  the target's final-normed last state: our layer id N (the default `drafter.layer_ids=[]`).

Mapping ours -> SGLang: `fc.weight`, `fc.bias` as is; `midlayer.*` -> `layers.0.*` (no
input_layernorm on either side); `layers.{i}.*` -> `layers.{i+1}.*` (input_layernorm on both);
`num_hidden_layers` = drafter.num_layers; `tie_word_embeddings: false`. Not written: embedding and
LM head (the target's are used), `d2t`/`t2d` (identity: full vocabulary only).
Refused for SGLang, with a ContractError: a reduced draft vocabulary (SGLang uses the target's full
head unless --speculative-token-map is passed, a server flag this directory cannot carry), and
layer ids other than [N] (SGLang feeds the final-normed top state only).

vLLM (vllm-project/speculators, vllm-project/vllm)
- speculators src/speculators/models/eagle.py: `EagleSpeculatorConfig`, registered as "eagle":
  `speculators_model_type: "eagle"`, `architectures` ["EagleSpeculator"] (the
  `transformer_layer_architecture` is appended), `transformer_layer_architecture`
  ("LlamaDecoderLayer"), `transformer_layer_config` (a LlamaConfig), `layernorms` (default false)
  and `fusion_bias` (default false). `EagleSpeculator` modules: `fusion_fc` (Linear 2H -> H,
  bias = fusion_bias), `transformer` (one LlamaDecoderLayer whose `input_layernorm` becomes
  Identity when layernorms is false), `embedding_layernorm` and `pre_lm_head_layernorm` (only when
  layernorms is true), and `embed_tokens`/`lm_head`/`rotary_emb` taken from the verifier (None until
  `attach_verifier`). Our drafter in those terms: `layernorms: false`, `fusion_bias: true`, one layer.
- vllm/transformers_utils/configs/speculators/base.py: `SpeculatorsConfig.from_pretrained`
  raises ValueError for a `speculators_model_type` missing from `SUPPORTED_SPECULATORS_TYPES`;
  vllm/transformers_utils/configs/speculators/algos.py registers "eagle3" (and, in later
  versions, other algorithms); no stored version found registers "eagle". (vLLM PR #20436, which mapped
  `fusion_bias` to `eagle_fc_bias` for speculators EAGLE-1, was closed without merging; the merged
  speculators support, PR #21345, covers Eagle3.)
- vllm/model_executor/models/llama_eagle.py (`EagleLlamaForCausalLM`, vLLM's own `method: eagle`):
  `fc = torch.nn.Linear(hidden_size * 2, hidden_size, bias=False)` with no config switch, layer 0
  with input_layernorm replaced by Identity, `embed_tokens` skipped (shared with the target) when
  pipeline parallelism is off, and `load_weights` indexes `params_dict[name]`, so an `fc.bias`
  tensor fails the load. (A branch version that remaps speculators names, `fusion_fc.*` -> `fc.*`
  and `pre_lm_head_layernorm` -> `hidden_states_layernorm`, skips names it lacks, which would
  silently drop the bias.)
So no vLLM loader was found that runs an EAGLE-1 drafter with an fc bias, which ours always has.
The `vllm` format refuses EAGLE-1 (VLLM_UNCONFIRMED says why) rather than write a file vLLM
rejects or, worse, serves without the bias.
"""

from __future__ import annotations

import re
from pathlib import Path

from specdistill.export import common, contracts

FORMAT = "sglang"
ARCHITECTURE = contracts.SGLANG_EAGLE1_ARCH

VLLM_UNCONFIRMED = (
    "variant 'eagle1' has no vLLM layout: unconfirmed that any vLLM release loads an EAGLE-1 drafter with an "
    "fc bias. vLLM's speculators loader (vllm/transformers_utils/configs/speculators/algos.py) registers no "
    "'eagle' speculators_model_type, and vLLM's EAGLE-1 Llama drafter (vllm/model_executor/models/llama_eagle.py) "
    "builds fc with bias=False, while this drafter's fc has a bias (EAGLE-1 reference). Export sglang or native"
)

_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


def to_engine_name(name: str) -> str:
    """Our tensor name -> SGLang's: midlayer.* is layer 0, our layers.{i} is layer i+1."""
    if name.startswith("midlayer."):
        return "layers.0." + name[len("midlayer."):]
    m = _LAYER.fullmatch(name)
    return f"layers.{int(m[1]) + 1}.{m[2]}" if m else name


def from_engine_name(name: str) -> str:
    """Engine tensor name -> ours (the inverse of to_engine_name; also right for EAGLE-3's layers.0)."""
    m = _LAYER.fullmatch(name)
    if not m:
        return name
    i = int(m[1])
    return f"midlayer.{m[2]}" if i == 0 else f"layers.{i - 1}.{m[2]}"


def sglang_gap(drafter) -> str | None:
    """Why SGLang's LlamaForCausalLMEagle cannot run this EAGLE-1 drafter exactly, or None."""
    info = drafter.export_info()
    n = int(info["num_target_layers"])
    ids = [int(i) for i in info["layer_ids"]]
    if ids != [n]:
        return (f"drafter.layer_ids={ids}: SGLang's EAGLE-1 drafter (LlamaForCausalLMEagle) reads only the "
                f"target's final-normed last hidden state, layer id {n} (the default, drafter.layer_ids=[])")
    if info["draft_vocab_size"] < info["vocab_size"]:
        return (f"drafter.draft_vocab_size={info['draft_vocab_size']} < {info['vocab_size']}: SGLang's "
                "LlamaForCausalLMEagle drafts over the target's full LM head; a reduced vocabulary needs "
                "--speculative-token-map, a server flag this export cannot carry (train with draft_vocab_size=0)")
    return None


def build_sglang(drafter, target, dtype: str = "bfloat16") -> tuple[dict, dict]:
    """(config.json dict, tensors) of SGLang's EAGLE-1 layout; checked by contracts.check_sglang."""
    gap = sglang_gap(drafter)
    if gap:
        raise contracts.ContractError(f"{FORMAT} export: {gap}")
    # lm_head.weight (the target head's rows, in export_state_dict for self-containment), the
    # embedding and the identity d2t/t2d are the target's or trivial: SGLang takes them from the target.
    drop = {"lm_head.weight", "d2t", "t2d"}
    sd = {to_engine_name(k): v for k, v in drafter.export_state_dict().items()
          if k not in drop and not k.startswith("embed_tokens.")}
    tensors = common.cast(sd, common.torch_dtype(dtype))
    d = common.eagle_dims(drafter, target, tensors)
    # SGLang swaps in the target's embedding and head as two modules (never tied: common.llama_config).
    cfg = common.llama_config(ARCHITECTURE, d, drafter.export_info()["num_layers"], dtype)
    return cfg, tensors


def write_sglang(drafter, target, out_dir: str | Path, dtype: str = "bfloat16") -> Path:
    cfg, tensors = build_sglang(drafter, target, dtype)
    contracts.check_sglang(cfg, tensors, target.num_layers)
    meta = common.metadata(drafter, target, FORMAT, dtype)
    return common.write_export(Path(out_dir), cfg, tensors, meta)
