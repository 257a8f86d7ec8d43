"""Exports: contract checks per engine, bit-identical reload, violations caught by name."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from specdistill import drafters
from specdistill import export as ex
from specdistill.config import ExportConfig
from specdistill.data.vocab import vocab_map_from_counts
from specdistill.drafters.base import Drafter, DrafterSpec
from specdistill.export import contracts, sglang, vllm
from specdistill.export.contracts import ContractError
from specdistill.loading import init_weights, load_drafter

STANDIN = "_standin_eagle3"


@dataclass
class StandinConfig:
    """Stand-in with the field names the EAGLE family uses, so export code is exercised without it."""

    name: str = STANDIN
    variant: str = "eagle3"
    layer_ids: list[int] = field(default_factory=lambda: [0, 1, 1])
    draft_vocab_size: int = 32
    norm_before_residual: bool = False
    seed: int = 0


class _Attn(nn.Module):
    def __init__(self, h, heads, kv, hd):
        super().__init__()
        self.q_proj = nn.Linear(2 * h, heads * hd, bias=False)
        self.k_proj = nn.Linear(2 * h, kv * hd, bias=False)
        self.v_proj = nn.Linear(2 * h, kv * hd, bias=False)
        self.o_proj = nn.Linear(heads * hd, h, bias=False)


class _MLP(nn.Module):
    def __init__(self, h, i):
        super().__init__()
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)


class _Layer(nn.Module):
    def __init__(self, h, i, heads, kv, hd):
        super().__init__()
        self.self_attn = _Attn(h, heads, kv, hd)
        self.mlp = _MLP(h, i)
        self.input_layernorm = nn.RMSNorm(h)
        self.hidden_norm = nn.RMSNorm(h)
        self.post_attention_layernorm = nn.RMSNorm(h)


class StandinEagle3(Drafter):
    """Tensor names and shapes of FORMATS.md 1.1; a toy forward so reload can be compared on outputs.
    Export-only: it implements the Drafter protocol's export side; training and drafting raise."""

    def __init__(self, cfg, target):
        super().__init__()
        torch.manual_seed(cfg.seed)
        c = target.config
        h, v = c.hidden_size, target.vocab_size
        hd = h // c.num_attention_heads
        self.cfg = cfg
        self.fc = nn.Linear(3 * h, h, bias=False)
        self.midlayer = _Layer(h, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, hd)
        self.norm = nn.RMSNorm(h)
        self.lm_head = nn.Linear(h, cfg.draft_vocab_size, bias=False)
        counts = torch.arange(v, 0, -1) * (torch.arange(v) % 3 != 0)
        d2t, t2d = vocab_map_from_counts(counts, cfg.draft_vocab_size)
        self.register_buffer("d2t", d2t)
        self.register_buffer("t2d", t2d)
        self.embed = target.embed_tokens  # shared with the target: must not be exported
        with torch.no_grad():
            for p in self.parameters():
                if p.data_ptr() != target.embed_tokens.weight.data_ptr():
                    p.add_(torch.randn_like(p) * 0.05)

    def forward(self, ids, feats):
        x = self.fc(feats) + self.embed(ids)
        x = x + self.midlayer.mlp.down_proj(torch.nn.functional.silu(self.midlayer.mlp.gate_proj(x)))
        return self.lm_head(self.norm(x))

    def export_state_dict(self):
        return {k: v for k, v in self.state_dict().items() if not k.startswith("embed.")}

    def export_info(self):
        # read live from cfg: tests change cfg fields after construction; layer ids come from the spec
        return {"variant": self.cfg.variant, "draft_vocab_size": self.cfg.draft_vocab_size,
                "norm_before_residual": self.cfg.norm_before_residual}

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def num_loss_tokens(self, batch):
        return batch["loss_mask"].sum()

    def loss(self, batch, target_out):
        raise NotImplementedError("export stand-in: not trainable")

    def proposer(self, target, options=None):
        raise NotImplementedError("export stand-in: no proposer")


@pytest.fixture
def standin_spec():
    spec = DrafterSpec(name=STANDIN, config_cls=StandinConfig, build=StandinEagle3, drafter_cls=StandinEagle3,
                       target_layers=lambda cfg, tc: list(cfg.layer_ids),
                       export_formats=("native", "sglang", "vllm"), paper="test stand-in")
    drafters.register(spec)
    yield spec
    drafters.REGISTRY.pop(STANDIN, None)


def _reload_equal(path, tensors):
    back = load_file(str(path / "model.safetensors"))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype, k
        assert torch.equal(back[k], v), k


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_write_all_formats_reload_bit_identical(tmp_path, d4, target4, dtype):
    out = ex.write(d4, ExportConfig(dtype=dtype), tmp_path, target4)
    assert set(out) == {"native", "sglang", "vllm"}
    for fmt, path in out.items():
        assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "specdistill_export.json"]
        build = {"native": ex.native.build, "sglang": sglang.build, "vllm": vllm.build}[fmt]
        cfg, tensors = build(d4, target4, dtype)
        assert json.loads((path / "config.json").read_text()) == json.loads(json.dumps(cfg))
        _reload_equal(path, tensors)
        meta = json.loads((path / "specdistill_export.json").read_text())
        assert meta["family"] == STANDIN and meta["variant"] == "eagle3" and meta["target"] == "tiny-llama-4"
        assert meta["format"] == fmt and meta["layer_ids"] == [1, 2, 3] and meta["dtype"] == dtype
        assert "capture-before-layer" in meta["layer_convention"] and meta["created_at"]
    assert not list(tmp_path.glob(".*tmp*")), "temp dirs left behind"


def test_layer_id_violations_write_nothing(tmp_path, d4, target4):
    d4.cfg.layer_ids = [1, 3, 3]
    with pytest.raises(ContractError, match="duplicate"):
        sglang.write(d4, target4, tmp_path / "s")
    assert not (tmp_path / "s").exists(), "a violating export must not leave a directory"
    d4.cfg.layer_ids = [1, 2]
    with pytest.raises(ContractError, match="3 layers"):
        vllm.write(d4, target4, tmp_path / "v")
    assert not list(tmp_path.iterdir())


@pytest.fixture
def target4():
    from conftest import make_llama, make_tokenizer

    from specdistill.targets import TargetModel

    return TargetModel(make_llama(layers=4), make_tokenizer(), name="tiny-llama-4")


@pytest.fixture
def d4(standin_spec, target4):
    return drafters.build(StandinConfig(layer_ids=[1, 2, 3]), target4)


def test_engine_configs(tmp_path, d4, target4):
    out = ex.write(d4, ExportConfig(formats=["sglang", "vllm"]), tmp_path, target4)
    s = json.loads((out["sglang"] / "config.json").read_text())
    assert s["architectures"] == ["LlamaForCausalLMEagle3"] and s["tie_word_embeddings"] is False
    assert s["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": [1, 2, 3], "use_aux_hidden_state": True}
    assert s["draft_vocab_size"] == 32 and s["vocab_size"] == 128 and s["target_hidden_size"] == 64
    st = load_file(str(out["sglang"] / "model.safetensors"))
    assert st["fc.weight"].shape == (64, 192) and st["midlayer.self_attn.q_proj.weight"].shape[1] == 128
    assert "embed_tokens.weight" not in st and st["lm_head.weight"].shape == (32, 64)
    assert st["d2t"].dtype == torch.int64 and st["t2d"].dtype == torch.bool and int(st["t2d"].sum()) == 32
    v = json.loads((out["vllm"] / "config.json").read_text())
    assert v["speculators_model_type"] == "eagle3" and v["norm_before_residual"] is False
    assert v["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    assert v["transformer_layer_config"]["model_type"] == "llama"
    pm = v["speculators_config"]["proposal_methods"][0]
    assert pm["proposal_type"] == "greedy" and pm["speculative_tokens"] >= 1
    assert v["speculators_config"]["verifier"]["name_or_path"] == "tiny-llama-4"
    vt = load_file(str(out["vllm"] / "model.safetensors"))
    assert "layers.0.hidden_norm.weight" in vt and not any(k.startswith("midlayer.") for k in vt)
    assert torch.equal(vt["layers.0.mlp.up_proj.weight"], st["midlayer.mlp.up_proj.weight"])
    assert "d2t" in vt and "t2d" in vt


def test_vllm_full_vocab_drops_maps(standin_spec, target4):
    d = drafters.build(StandinConfig(layer_ids=[1, 2, 3], draft_vocab_size=128), target4)
    cfg, tensors = vllm.build(d, target4)
    contracts.check_vllm(cfg, tensors, 4)
    assert "d2t" not in tensors and "t2d" not in tensors
    tensors["d2t"] = torch.zeros(128, dtype=torch.int64)
    with pytest.raises(ContractError, match="absent"):
        contracts.check_vllm(cfg, tensors, 4)


def test_native_reload_same_outputs(tmp_path, d4, target4):
    out = ex.write(d4, ExportConfig(formats=["native"], dtype="float32"), tmp_path, target4)
    back = ex.load_native(out["native"], target4)
    assert type(back) is type(d4) and back.cfg == d4.cfg
    for k, v in d4.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    ids = torch.randint(0, 128, (2, 5))
    feats = torch.randn(2, 5, 192)
    assert torch.equal(back(ids, feats), d4(ids, feats))
    assert "embed.weight" not in load_file(str(out["native"] / "model.safetensors"))
    assert ex.is_native_dir(out["native"])


def test_native_rejects_other_target(tmp_path, d4, target4, tiny_target):
    out = ex.write(d4, ExportConfig(formats=["native"]), tmp_path, target4)
    with pytest.raises(ValueError, match="target_num_layers"):
        ex.load_native(out["native"], tiny_target)


def _vio(fmt, d4, target4, mutate):
    build = sglang.build if fmt == "sglang" else vllm.build
    cfg, tensors = build(d4, target4)
    mutate(cfg, tensors)
    contracts.CHECKS[fmt](cfg, tensors, target4.num_layers)


@pytest.mark.parametrize("fmt", ["sglang", "vllm"])
@pytest.mark.parametrize("case,match", [
    ("no_d2t", "'d2t'"),
    ("no_t2d", "'t2d'"),
    ("bad_fc", "'fc.weight'"),
    ("no_ids", "eagle_aux_hidden_state_layer_ids"),
    ("dup_ids", "duplicate"),
    ("range_ids", "out of range"),
    ("order_ids", "ascending"),
    ("bad_d2t", "d2t"),
    ("embed", "embed_tokens"),
    ("q_in", "q_proj"),
    ("lm_head", "lm_head"),
])
def test_violations_caught(fmt, case, match, d4, target4):
    ids_key = "eagle_aux_hidden_state_layer_ids"

    def ids_node(cfg):
        return cfg["eagle_config"] if fmt == "sglang" else cfg

    def layer(name):
        return ("midlayer." if fmt == "sglang" else "layers.0.") + name

    def mutate(cfg, t):
        if case == "no_d2t":
            t.pop("d2t")
        elif case == "no_t2d":
            t.pop("t2d")
        elif case == "bad_fc":
            t["fc.weight"] = torch.zeros(64, 128)
        elif case == "no_ids":
            del ids_node(cfg)[ids_key]
        elif case == "dup_ids":
            ids_node(cfg)[ids_key] = [1, 1, 3]
        elif case == "range_ids":
            ids_node(cfg)[ids_key] = [1, 2, 4]
        elif case == "order_ids":
            ids_node(cfg)[ids_key] = [3, 1, 2]
        elif case == "bad_d2t":
            t["d2t"] = t["d2t"].flip(0)
        elif case == "embed":
            t["embed_tokens.weight"] = torch.zeros(128, 64)
        elif case == "q_in":
            t[layer("self_attn.q_proj.weight")] = torch.zeros(64, 64)
        elif case == "lm_head":
            t["lm_head.weight"] = torch.zeros(128, 64)

    with pytest.raises(ContractError, match=match):
        _vio(fmt, d4, target4, mutate)


def test_vllm_norm_before_residual_must_be_explicit(d4, target4):
    with pytest.raises(ContractError, match="norm_before_residual"):
        _vio("vllm", d4, target4, lambda c, t: c.pop("norm_before_residual"))
    with pytest.raises(ContractError, match="model_type"):
        _vio("vllm", d4, target4, lambda c, t: c["transformer_layer_config"].pop("model_type"))
    with pytest.raises(ContractError, match="name_or_path"):
        _vio("vllm", d4, target4, lambda c, t: c["speculators_config"]["verifier"].update(name_or_path=""))
    with pytest.raises(ContractError, match="wrong prefix"):
        _vio("vllm", d4, target4, lambda c, t: t.update({"midlayer.norm.weight": torch.zeros(64)}))


def test_sglang_rejects_norm_before_residual(standin_spec, target4):
    d = drafters.build(StandinConfig(layer_ids=[1, 2, 3], norm_before_residual=True), target4)
    with pytest.raises(ContractError, match="norm_before_residual"):
        sglang.write(d, target4, "unused")
    cfg, tensors = vllm.build(d, target4)
    contracts.check_vllm(cfg, tensors, 4)
    assert cfg["norm_before_residual"] is True


def test_violation_writes_nothing_and_keeps_old_export(tmp_path, d4, target4):
    ex.write(d4, ExportConfig(formats=["sglang"]), tmp_path, target4)
    before = (tmp_path / "sglang" / "model.safetensors").read_bytes()
    d4.cfg.layer_ids = [1, 2, 9]
    with pytest.raises(ContractError):
        ex.write(d4, ExportConfig(formats=["native", "sglang"]), tmp_path, target4)
    assert not (tmp_path / "native").exists()
    assert (tmp_path / "sglang" / "model.safetensors").read_bytes() == before


def test_unknown_or_unsupported_format(tmp_path, d4, target4):
    with pytest.raises(ValueError, match="unknown format"):
        ex.write(d4, ExportConfig(formats=["onnx"]), tmp_path, target4)
    d4.export_formats = lambda: ("native",)  # an instance narrowing its formats (Drafter.export_formats)
    with pytest.raises(ValueError, match="does not support 'vllm'"):
        ex.write(d4, ExportConfig(formats=["vllm"]), tmp_path, target4)


# ----------------------------------------------------------------------------- the real EAGLE drafter


def _eagle(target, **kw):
    from specdistill.data.vocab import count_tokens
    from specdistill.drafters.eagle import EagleConfig

    cfg = EagleConfig(**kw)
    d = drafters.build(cfg, target)
    if d.draft_vocab_size < target.vocab_size:
        g = torch.Generator().manual_seed(0)
        samples = [{"input_ids": torch.randint(0, 128, (40,), generator=g).tolist(), "loss_mask": [1] * 40}
                   for _ in range(4)]
        d.set_vocab_map(*vocab_map_from_counts(count_tokens(samples, target.vocab_size), d.draft_vocab_size))
    with torch.no_grad():
        for p in d.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return d


def _batch(target):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 128, (2, 12), generator=g)
    mask = torch.zeros_like(ids)
    mask[:, 4:] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": mask}


@pytest.mark.parametrize("vd", [32, 0])
def test_real_eagle3_exports(tmp_path, target4, vd):
    d = _eagle(target4, variant="eagle3", layer_ids=[1, 2, 3], draft_vocab_size=vd)
    out = ex.write(d, ExportConfig(dtype="float32"), tmp_path, target4)
    assert set(out) == {"native", "sglang", "vllm"}
    sd = d.export_state_dict()
    st = load_file(str(out["sglang"] / "model.safetensors"))
    assert set(st) == set(sd) and all(torch.equal(st[k], sd[k]) for k in sd)
    vt = load_file(str(out["vllm"] / "model.safetensors"))
    assert ("d2t" in vt) == (vd == 32)
    for k, v in vt.items():
        assert torch.equal(v, sd[k.replace("layers.0.", "midlayer.")]), k
    cfg = json.loads((out["vllm"] / "config.json").read_text())
    assert cfg["transformer_layer_config"]["head_dim"] == 16 and cfg["draft_vocab_size"] == (vd or 128)
    back = ex.load_native(out["native"], target4)
    b = _batch(target4)
    tout = target4(b["input_ids"], b["attention_mask"], layers=d.layer_ids, return_logits=False)
    l1, l2 = d.loss(b, tout), back.loss(b, tout)
    assert torch.equal(l1.loss, l2.loss) and torch.equal(back.draft_ids, d.draft_ids)


def _eagle1_sglang_shapes(num_layers: int) -> dict:
    """Every tensor of SGLang's LlamaForCausalLMEagle for the tiny target (H 64, 4 heads x 16, 2 kv heads, I 128)."""
    want = {"fc.weight": (64, 128), "fc.bias": (64,)}
    for i in range(num_layers):
        p = f"layers.{i}."
        want |= {p + "self_attn.q_proj.weight": (64, 64), p + "self_attn.k_proj.weight": (32, 64),
                 p + "self_attn.v_proj.weight": (32, 64), p + "self_attn.o_proj.weight": (64, 64),
                 p + "mlp.gate_proj.weight": (128, 64), p + "mlp.up_proj.weight": (128, 64),
                 p + "mlp.down_proj.weight": (64, 128), p + "post_attention_layernorm.weight": (64,)}
        if i:  # SGLang's first EAGLE-1 layer has no input_layernorm, later layers do
            want[p + "input_layernorm.weight"] = (64,)
    return want


@pytest.mark.parametrize("num_layers", [1, 2])
def test_real_eagle1_exports_native_and_sglang(tmp_path, target4, num_layers):
    from specdistill.export import eagle1

    d = _eagle(target4, variant="eagle1", num_layers=num_layers)
    out = ex.write(d, ExportConfig(dtype="float32"), tmp_path, target4)
    assert set(out) == {"native", "sglang"}  # every format that can express EAGLE-1
    cfg = json.loads((out["sglang"] / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle"] and cfg["num_hidden_layers"] == num_layers
    assert cfg["tie_word_embeddings"] is False and cfg["vocab_size"] == 128 and cfg["hidden_size"] == 64
    assert "eagle_config" not in cfg and "draft_vocab_size" not in cfg
    st = load_file(str(out["sglang"] / "model.safetensors"))
    contracts.check_sglang(cfg, st, target4.num_layers)
    assert {k: tuple(v.shape) for k, v in st.items()} == _eagle1_sglang_shapes(num_layers)
    sd = d.export_state_dict()
    for k, v in sd.items():  # every drafter tensor ships under its SGLang name, except what SGLang takes from the target
        if k in ("lm_head.weight", "d2t", "t2d"):
            assert eagle1.to_engine_name(k) not in st, k
        else:
            assert torch.equal(st[eagle1.to_engine_name(k)], v), k
    b = _batch(target4)
    tout = target4(b["input_ids"], b["attention_mask"], layers=d.layer_ids, return_logits=False)
    ref = d.loss(b, tout).loss
    for fmt in ("native", "sglang"):
        back = load_drafter(out[fmt], target4)
        assert back.cfg.variant == "eagle1" and back.cfg.num_layers == num_layers
        assert torch.equal(back.loss(b, tout).loss, ref), fmt
    with pytest.raises(ContractError, match="eagle1.*fc bias"):
        ex.write(d, ExportConfig(formats=["vllm"]), tmp_path, target4)
    assert not (tmp_path / "vllm").exists()


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _sglang_eagle1_logits(cfg, st, target, ids, feature):
    """SGLang's LlamaForCausalLMEagle forward as read in models/llama_eagle.py and models/llama.py, from the
    exported tensors alone: fc(cat(embed, feature)); per layer the residual form (layer 0's input norm is
    the identity, later ones fuse add + norm); output hidden + residual; the target's head, no final norm."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    eps, hd = cfg["rms_norm_eps"], cfg["head_dim"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    b, n = ids.shape
    inv = 1.0 / cfg["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.arange(n).float()[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos()[None], torch.cat([ang, ang], -1).sin()[None]
    x = torch.cat([target.embed_tokens.weight[ids], feature], -1) @ st["fc.weight"].T + st["fc.bias"]
    residual = None
    for i in range(cfg["num_hidden_layers"]):
        p = f"layers.{i}."
        if residual is None:
            residual, y = x, x
        else:
            residual = x + residual
            y = _rms(residual, st[p + "input_layernorm.weight"], eps)
        q = (y @ st[p + "self_attn.q_proj.weight"].T).view(b, n, nh, hd).transpose(1, 2)
        k = (y @ st[p + "self_attn.k_proj.weight"].T).view(b, n, nkv, hd).transpose(1, 2)
        v = (y @ st[p + "self_attn.v_proj.weight"].T).view(b, n, nkv, hd).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        residual = a.transpose(1, 2).reshape(b, n, nh * hd) @ st[p + "self_attn.o_proj.weight"].T + residual
        y = _rms(residual, st[p + "post_attention_layernorm.weight"], eps)
        g = torch.nn.functional.silu(y @ st[p + "mlp.gate_proj.weight"].T) * (y @ st[p + "mlp.up_proj.weight"].T)
        x = g @ st[p + "mlp.down_proj.weight"].T
    return (x + residual) @ target.lm_head.weight.T


@pytest.mark.parametrize("num_layers", [1, 2])
def test_eagle1_sglang_layout_computes_the_drafter(tmp_path, target4, num_layers):
    """The SGLang tensors, run the way SGLang runs them on the target's final-normed top state, give the
    drafter's own logits: the layout (no input norm on layer 0, no final norm, the target's head) is this model."""
    d = _eagle(target4, variant="eagle1", num_layers=num_layers)
    with torch.no_grad():
        for p in d.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)  # norms away from 1 and a non-trivial fc bias
    out = ex.write(d, ExportConfig(dtype="float32", formats=["sglang"]), tmp_path, target4)
    cfg = json.loads((out["sglang"] / "config.json").read_text())
    st = load_file(str(out["sglang"] / "model.safetensors"))
    ids = _batch(target4)["input_ids"]
    with torch.no_grad():
        tout = target4(ids, torch.ones_like(ids), layers=[4], return_logits=False)
        feature = target4.final_norm(tout.hidden_states[4])  # what SGLang's logits processor captures
        emb = d.embed(ids)
        pos = torch.arange(ids.shape[1])[None].expand_as(ids)
        mine, _ = d.layers_forward(d.step_input(d.target_features(tout.hidden_states), emb, 0), emb, pos, None,
                                   causal=True)
        torch.testing.assert_close(_sglang_eagle1_logits(cfg, st, target4, ids, feature), d.draft_logits(mine),
                                   rtol=1e-4, atol=1e-4)


def test_eagle1_sglang_proposes_through_the_verifier_loader(tmp_path, target4):
    from specdistill import loading

    d = _eagle(target4, variant="eagle1")
    out = ex.write(d, ExportConfig(dtype="float32", formats=["sglang"]), tmp_path, target4)
    p = loading.load_proposer(str(out["sglang"]), target4, num_draft_tokens=3)
    assert p.k == 3 and tuple(p.target_layers) == (4,)


@pytest.mark.parametrize("kw,match", [
    ({"layer_ids": [2]}, "layer_ids=\\[2\\].*final-normed"),
    ({"draft_vocab_size": 32}, "draft_vocab_size=32.*speculative-token-map"),
])
def test_eagle1_sglang_refuses_what_it_cannot_express(tmp_path, target4, kw, match):
    d = _eagle(target4, variant="eagle1", **kw)
    with pytest.raises(ContractError, match=match):
        ex.write(d, ExportConfig(formats=["sglang"]), tmp_path, target4)
    assert ex.write(d, ExportConfig(), tmp_path, target4).keys() == {"native"}


@pytest.mark.parametrize("case,match", [
    ("no_bias", "'fc.bias' is required"),
    ("bad_fc", "'fc.weight' has shape"),
    ("bad_bias", "'fc.bias' has shape"),
    ("norm_l0", "'layers.0.input_layernorm.weight' must be absent"),
    ("no_norm_l1", "'layers.1.input_layernorm.weight' is required"),
    ("lm_head", "'lm_head.weight' must be omitted"),
    ("embed", "'embed_tokens.weight' must be omitted"),
    ("midlayer", "wrong prefix"),
    ("tied", "tie_word_embeddings"),
    ("no_down", "'layers.0.mlp.down_proj.weight' is required"),
    ("q_in", "'layers.0.self_attn.q_proj.weight' has shape"),
    ("extra_layer", "'layers.2."),
    ("d2t", "'d2t' is not part"),
    ("no_heads", "num_attention_heads"),
])
def test_eagle1_sglang_violations_caught(target4, case, match):
    from specdistill.export import eagle1

    d = _eagle(target4, variant="eagle1", num_layers=2)
    cfg, t = eagle1.build_sglang(d, target4, "float32")
    contracts.check_sglang(cfg, t, target4.num_layers)  # the unmutated export passes
    if case == "no_bias":
        t.pop("fc.bias")
    elif case == "bad_fc":
        t["fc.weight"] = torch.zeros(64, 192)
    elif case == "bad_bias":
        t["fc.bias"] = torch.zeros(128)
    elif case == "norm_l0":
        t["layers.0.input_layernorm.weight"] = torch.ones(64)
    elif case == "no_norm_l1":
        t.pop("layers.1.input_layernorm.weight")
    elif case == "lm_head":
        t["lm_head.weight"] = torch.zeros(128, 64)
    elif case == "embed":
        t["embed_tokens.weight"] = torch.zeros(128, 64)
    elif case == "midlayer":
        t["midlayer.mlp.up_proj.weight"] = t.pop("layers.0.mlp.up_proj.weight")
    elif case == "tied":
        cfg["tie_word_embeddings"] = True
    elif case == "no_down":
        t.pop("layers.0.mlp.down_proj.weight")
    elif case == "q_in":
        t["layers.0.self_attn.q_proj.weight"] = torch.zeros(64, 128)
    elif case == "extra_layer":
        t["layers.2.mlp.up_proj.weight"] = torch.zeros(128, 64)
    elif case == "d2t":
        t["d2t"] = torch.zeros(128, dtype=torch.int64)
    elif case == "no_heads":
        del cfg["num_attention_heads"]
    with pytest.raises(ContractError, match=match):
        contracts.check_sglang(cfg, t, target4.num_layers)


def test_eagle1_card_does_not_offer_vllm(tmp_path, target4):
    from specdistill.export import card

    d = _eagle(target4, variant="eagle1")
    out = ex.write(d, ExportConfig(formats=["sglang"]), tmp_path, target4)
    text = card.build_card(out["sglang"], "me/eagle1")
    assert "--speculative-algorithm EAGLE " in text and "vllm serve" not in text
    assert "vLLM cannot serve this drafter" in text


def test_bf16_export_is_the_bf16_cast(tmp_path, target4):
    d = _eagle(target4, variant="eagle3", layer_ids=[1, 2, 3], draft_vocab_size=32)
    out = ex.write(d, ExportConfig(formats=["sglang"]), tmp_path, target4)
    st = load_file(str(out["sglang"] / "model.safetensors"))
    assert st["fc.weight"].dtype == torch.bfloat16 and torch.equal(st["fc.weight"], d.fc.weight.detach().bfloat16())
    assert st["d2t"].dtype == torch.int64 and torch.equal(st["d2t"], d.d2t)


def test_cli_exports_trainer_checkpoint(tmp_path):
    """A run dir as the Trainer leaves it (config.yaml + step_<n>/drafter.safetensors + latest) -> CLI export."""
    import yaml
    from conftest import make_llama, make_tokenizer
    from safetensors.torch import save_file

    import specdistill.drafters.eagle  # noqa: F401  (registers the family if drafters/__init__ does not yet)
    from specdistill import config, targets
    from specdistill.cli import main

    tdir = tmp_path / "tiny4"
    make_llama(layers=4).save_pretrained(tdir)
    make_tokenizer().save_pretrained(tdir)
    target = targets.load(str(tdir))
    run = tmp_path / "run"
    cfg = config.load(None, [f"target.name={tdir}", "drafter.name=eagle", "drafter.layer_ids=[1,2,3]",
                             "drafter.draft_vocab_size=32", f"train.output_dir={run}"])
    d = _eagle(target, layer_ids=[1, 2, 3], draft_vocab_size=32)
    (run / "step_3").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config.to_dict(cfg)))
    save_file({k: v.contiguous() for k, v in d.state_dict().items()}, str(run / "step_3" / "drafter.safetensors"))
    (run / "latest").write_text("step_3")
    main(["export", str(run), "--dtype", "float32"])
    for fmt in ("native", "sglang", "vllm"):
        assert (run / "export" / fmt / "model.safetensors").exists(), fmt
    st = load_file(str(run / "export" / "sglang" / "model.safetensors"))
    assert torch.equal(st["fc.weight"], d.fc.weight.detach())
    # the native export re-exports to the engine formats too (same tensors)
    main(["export", str(run / "export" / "native"), "--formats", "sglang", "--out", str(tmp_path / "again"),
          "--target", str(tdir), "--dtype", "float32"])
    again = load_file(str(tmp_path / "again" / "sglang" / "model.safetensors"))
    assert set(again) == set(st) and all(torch.equal(again[k], st[k]) for k in st)


@pytest.mark.parametrize("vd", [32, 0])
def test_engine_exports_reload_to_the_same_drafter(tmp_path, target4, vd):
    """What ships is what is scored: SGLang/vLLM dirs rebuild a drafter with the same loss (fp32 export)."""
    d = _eagle(target4, variant="eagle3", layer_ids=[1, 2, 3], draft_vocab_size=vd)
    out = ex.write(d, ExportConfig(dtype="float32", formats=["sglang", "vllm"]), tmp_path, target4)
    b = _batch(target4)
    tout = target4(b["input_ids"], b["attention_mask"], layers=d.layer_ids, return_logits=False)
    ref = d.loss(b, tout).loss
    for fmt in ("sglang", "vllm"):
        back = load_drafter(out[fmt], target4)
        assert torch.equal(back.loss(b, tout).loss, ref), fmt
        assert torch.equal(back.d2t, d.d2t) and torch.equal(back.t2d, d.t2d)


def test_verifier_loader_claims_exports(tmp_path, target4):
    from specdistill import loading

    d = _eagle(target4, variant="eagle3", layer_ids=[1, 2, 3], draft_vocab_size=32)
    out = ex.write(d, ExportConfig(dtype="float32"), tmp_path, target4)
    for fmt in ("native", "sglang", "vllm"):
        p = loading.load_proposer(str(out[fmt]), target4, num_draft_tokens=3)
        assert p.k == 3 and p.mode == "chain" and tuple(p.target_layers) == (1, 2, 3)
    p = loading.load_proposer(str(out["native"]), target4, tree=(4, 2, 1))
    assert p.mode == "tree" and p.depth == 3 and p.topk == 4 and p.budget == 4 + 8 + 8


@pytest.mark.parametrize("fmt", ["native", "sglang", "vllm"])
def test_exported_drafter_scores_the_same(tmp_path, target4, fmt):
    """Inside the verifier, an fp32 export proposes exactly the drafts the trained drafter proposes
    (so tau and acceptance are the same), step for step."""
    from specdistill import loading
    from specdistill.verify.verifier import Verifier

    torch.set_num_threads(1)
    d = _eagle(target4, variant="eagle3", layer_ids=[1, 2, 3], draft_vocab_size=32)
    with torch.no_grad():  # a random drafter of this size always drafts one token; make its drafts vary
        torch.manual_seed(0)
        for p in d.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.3)
    out = ex.write(d, ExportConfig(dtype="float32", formats=[fmt]), tmp_path, target4)

    def recording(p):
        drafts, inner = [], p.propose

        def propose(state):
            t = inner(state)
            drafts.append(t.tokens.tolist())
            return t

        p.propose = propose
        return p, drafts

    prompt = torch.randint(5, 128, (10,), generator=torch.Generator().manual_seed(3)).tolist()
    ver = Verifier(target4)
    pa, da = recording(d.proposer(target4, mode="chain", k=3))
    pb, db = recording(loading.load_proposer(str(out[fmt]), target4, num_draft_tokens=3))
    a = ver.generate(prompt, pa, max_new_tokens=24)
    b = ver.generate(prompt, pb, max_new_tokens=24)
    assert a.tokens == b.tokens and a.accepted_per_step == b.accepted_per_step
    assert da == db and len(da) >= 10 and len({tuple(x) for x in da}) > 3


def test_init_weights_warm_start(tmp_path, target4):
    """train.init_from: a fresh drafter takes the weights and draft vocabulary of an export; a drafter
    of another shape is refused with the path and the first mismatching tensor."""
    d = _eagle(target4, variant="eagle3", layer_ids=[1, 2, 3], draft_vocab_size=32)
    out = ex.write(d, ExportConfig(dtype="float32", formats=["native", "sglang"]), tmp_path, target4)
    b = _batch(target4)
    tout = target4(b["input_ids"], b["attention_mask"], layers=d.layer_ids, return_logits=False)
    for fmt in ("native", "sglang"):
        torch.manual_seed(7)
        fresh = drafters.build(d.cfg, target4)
        assert not bool(fresh.vocab_map_ready)
        init_weights(fresh, out[fmt], target4)
        assert torch.equal(fresh.draft_ids, d.draft_ids) and bool(fresh.vocab_map_ready)
        assert torch.equal(fresh.loss(b, tout).loss, d.loss(b, tout).loss), fmt
    other = _eagle(target4, variant="eagle3", layer_ids=[1, 2, 3], draft_vocab_size=64)
    with pytest.raises(ValueError, match="do not fit.*lm_head"):
        init_weights(other, out["native"], target4)
    with pytest.raises(FileNotFoundError, match="init_from"):
        init_weights(other, tmp_path / "nope", target4)
