"""`specdistill plan`: exact parameter counts and per-topology sharding arithmetic."""

from __future__ import annotations

import json

import pytest
from conftest import make_llama, make_tokenizer

from specdistill.plan import make_plan

LLAMA_8B = {  # Llama-3.1-8B's published architecture (no weights needed: the plan builds on `meta`)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16",
}
LLAMA_8B_PARAMS = 8_030_261_248


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_target")
    make_llama(layers=8).save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def llama8b_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama8b")
    (d / "config.json").write_text(json.dumps(LLAMA_8B))
    return d


def rows(plan):
    return {r.name.split(" (")[0]: r.bytes for r in plan.rows}


def test_tiny_counts_match_the_real_models(tiny_dir):
    from specdistill import drafters
    from specdistill.config import load
    from specdistill.targets import TargetModel

    plan = make_plan(str(tiny_dir), gpus=1, micro_batch=2, seq_len=16, target_dtype="float32", precision="fp32")
    model = make_llama(layers=8)
    real_target = sum(p.numel() for p in model.parameters())  # tied embedding counted once
    assert plan.target_params == real_target
    cfg = load(None, ["drafter.name=eagle"])
    d = drafters.build(cfg.drafter, TargetModel(model, make_tokenizer(), name="t"))
    assert plan.drafter_params == sum(p.numel() for p in d.trainable_parameters())
    r = rows(plan)
    assert r["target weights"] == real_target * 4
    # fp32 training: 4 B weights + 4 B grads + 8 B Adam m, v; nothing sharded on one device
    assert r["drafter weights"] == plan.drafter_params * 4
    assert r["drafter gradients"] == plan.drafter_params * 4
    assert r["optimizer"] == plan.drafter_params * 8


def test_llama8b_exact_params_and_zero_sharding(llama8b_dir):
    kw = dict(micro_batch=4, seq_len=2048, drafter_overrides=["drafter.draft_vocab_size=32000"])
    ddp = make_plan(str(llama8b_dir), gpus=8, **kw)
    z2 = make_plan(str(llama8b_dir), gpus=8, zero=2, **kw)
    z3 = make_plan(str(llama8b_dir), gpus=8, zero=3, **kw)
    fsdp = make_plan(str(llama8b_dir), gpus=8, fsdp=True, **kw)
    assert ddp.target_params == LLAMA_8B_PARAMS
    P = ddp.drafter_params
    # EAGLE-3 drafter for this target: fc 3H->H, one decoder layer taking 2H, a 32000-row LM head
    H, inter, kv = 4096, 14336, 8 * 128
    # norms: embedding + hidden input norms, post-attention norm, final norm (4 x H)
    assert P == 3 * H * H + 2 * H * H + 2 * (2 * H * kv) + H * H + 3 * H * inter + 4 * H + H * 32000
    r_ddp, r2, r3, rf = rows(ddp), rows(z2), rows(z3), rows(fsdp)
    assert r_ddp["target weights"] == LLAMA_8B_PARAMS * 2  # bf16, replicated
    assert r_ddp["optimizer"] == P * 12 and r_ddp["drafter gradients"] == P * 2 and r_ddp["drafter weights"] == P * 2
    assert r2["optimizer"] == P * 12 / 8 and r2["drafter gradients"] == P * 2 / 8 and r2["drafter weights"] == P * 2
    assert r2["target weights"] == LLAMA_8B_PARAMS * 2
    assert r3["drafter weights"] == P * 2 / 8 and r3["target weights"] == LLAMA_8B_PARAMS * 2 / 8
    assert r3 == rf
    assert z3.total < z2.total < ddp.total
    # activations do not depend on the sharding; they scale with the micro-batch
    assert r3["target activations"] == r_ddp["target activations"]
    half = make_plan(str(llama8b_dir), gpus=8, zero=3, micro_batch=2, seq_len=2048,
                     drafter_overrides=["drafter.draft_vocab_size=32000"])
    assert rows(half)["drafter activations"] == pytest.approx(r3["drafter activations"] / 2)


def test_cli_json_and_errors(llama8b_dir, capsys):
    from specdistill.cli import main

    main(["plan", "--target", str(llama8b_dir / "config.json"), "--gpus", "4", "--zero", "3", "--json",
          "drafter.draft_vocab_size=32000"])
    out = json.loads(capsys.readouterr().out)
    assert out["target_params"] == LLAMA_8B_PARAMS and out["devices"] == 4 and out["topology"] == "zero3"
    assert out["per_device_bytes"]["target weights (frozen)"] == LLAMA_8B_PARAMS * 2 // 4
    assert out["total_bytes"] == sum(out["per_device_bytes"].values())
    main(["plan", "--target", str(llama8b_dir), "--gpus", "2"])
    text = capsys.readouterr().out
    assert "target weights (frozen)" in text and "total" in text and "DDP" in text
    with pytest.raises(SystemExit):
        main(["plan", "--target", str(llama8b_dir.parent / "nope"), "--gpus", "2"])
    assert "nope" in capsys.readouterr().err
