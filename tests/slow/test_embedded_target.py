"""The real embedded target: loads through the safetensors cache and returns the asked-for layers."""

from __future__ import annotations

import time

import pytest
import torch

from specdistill import targets
from specdistill.config import TargetConfig

pytestmark = pytest.mark.embedded


def test_embedded_target_loads_from_cache_and_returns_requested_layers():
    cfg = TargetConfig(name="default")
    targets.load(cfg)  # converts once if the cache is cold
    path, _ = targets.resolve(cfg)
    assert (targets.cache_root(cfg) / "targets") in __import__("pathlib").Path(path).parents
    t0 = time.time()
    target = targets.load(cfg)
    cached_seconds = time.time() - t0
    assert target.num_layers == 30 and target.hidden_size == 576 and target.vocab_size == 49152
    ids = target.tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                               add_generation_prompt=True, tokenize=False)
    ids = target.tokenizer(ids, return_tensors="pt", add_special_tokens=False)["input_ids"]
    layers = [0, 2, 15, 27, 30]
    out = target(ids, layers=layers)
    assert sorted(out.hidden_states) == layers
    ref = target.model(ids, output_hidden_states=True)
    for i in layers[:-1]:  # HF's tuple index i is the state entering layer i
        assert torch.equal(out.hidden_states[i], ref.hidden_states[i]), i
    # id N is the last layer's output before the final norm; logits are lm_head(norm(h_N))
    assert torch.allclose(target.final_norm(out.hidden_states[30]), out.last_hidden)
    assert torch.allclose(out.logits, ref.logits, atol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        target(ids, layers=[31])
    assert cached_seconds < 60, f"cached load took {cached_seconds:.1f}s"


def test_target_loads_with_a_device_map(tmp_path, monkeypatch):
    """`target.device_map` goes through accelerate's big-model loading; on this CPU-only machine
    'auto' places every layer on the CPU, and the forward is unchanged (multi-GPU is not testable here)."""
    import transformers
    from conftest import make_llama, make_tokenizer

    make_llama(layers=4).save_pretrained(tmp_path / "t")
    make_tokenizer().save_pretrained(tmp_path / "t")
    # BLAS on both sides: a device_map target never gets the small-batch CPU kernel (cpu_kernels.py)
    whole = targets.load(TargetConfig(name=str(tmp_path / "t"), cpu_kernels="off"))
    seen = {}
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*a, **k):
        seen.update(k)
        return original(*a, **k)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    mapped = targets.load(TargetConfig(name=str(tmp_path / "t"), device_map="auto"))
    assert seen.get("device_map") == "auto"
    assert not mapped.is_sharded  # one device here
    ids = torch.randint(8, 80, (2, 12))
    a, b = whole(ids, layers=[1, 4]), mapped(ids, layers=[1, 4])
    assert torch.equal(a.hidden_states[1], b.hidden_states[1]) and torch.equal(a.logits, b.logits)
