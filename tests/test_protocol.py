"""The Drafter protocol through the unchanged Trainer: registration checks, a rollout family and a
trainable-target family (tests/toy_families.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import toy_families  # noqa: F401  (registers toy_rollout and toy_lora)
from test_trainer import collate, fit, make_data

from specdistill.drafters.base import Drafter, DrafterSpec, ProtocolError, register

ROOT = Path(__file__).resolve().parents[1]


def test_register_names_the_missing_method():
    @dataclasses.dataclass
    class Cfg:
        name: str = "forgetful"

    class Forgetful(Drafter):
        def loss(self, batch, target_out):
            raise AssertionError

        def num_loss_tokens(self, batch):
            return 0

    spec = DrafterSpec(name="forgetful", config_cls=Cfg, drafter_cls=Forgetful, build=lambda c, t: Forgetful(),
                       target_layers=lambda c, t: [])
    with pytest.raises(ProtocolError, match="trainable_parameters, proposer, export_state_dict"):
        register(spec)
    with pytest.raises(ProtocolError, match="rollout"):
        register(dataclasses.replace(spec, drafter_cls=toy_families.ToyLoraDrafter, rollout=True))
    with pytest.raises(ProtocolError, match="drafter_cls is required"):
        register(dataclasses.replace(spec, drafter_cls=None))


def test_rollout_is_seeded_per_row(tiny_target):
    d = toy_families.ToyRolloutDrafter(toy_families.ToyRolloutConfig(continuation=5), tiny_target.vocab_size, 0)
    batch = collate([make_data(4)[i] for i in range(4)])
    seeds = torch.tensor([11, 12, 13, 14])
    a = d.rollout(batch, tiny_target, seeds)
    b = d.rollout(batch, tiny_target, seeds)
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert (a["loss_mask"].sum(1) == 5).all()  # exactly the sampled tokens are loss tokens
    # Row 2 alone with its seed samples what it sampled inside the batch.
    one = d.rollout({k: v[2:3] for k, v in batch.items()}, tiny_target, seeds[2:3])
    n = int(one["attention_mask"].sum())
    assert torch.equal(one["input_ids"][0, :n], a["input_ids"][2, :n])


@pytest.mark.parametrize("mb,accum", [(4, 2), (1, 8)])
def test_rollout_family_grad_accumulation_equivalence(tmp_path, tiny_target, mb, accum):
    cfg = toy_families.ToyRolloutConfig()
    tr, ref, s_ref = fit(tmp_path, tiny_target, "ref", drafter_cfg=cfg, micro_batch_size=8, grad_accum=1, max_steps=3)
    assert tr.needs.rollout and tr.needs.output == "logits"
    _, d, s = fit(tmp_path, tiny_target, f"a{mb}", drafter_cfg=cfg, micro_batch_size=mb, grad_accum=accum,
                  max_steps=3)
    assert s["losses"] == pytest.approx(s_ref["losses"], rel=1e-5)
    assert s_ref["losses"][-1] < s_ref["losses"][0]  # it learns
    for (k, a), b in zip(ref.state_dict().items(), d.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), k


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import torch, toy_families
from conftest import make_llama, make_tokenizer
from test_trainer import collate, make_data, run_cfg
from pathlib import Path
from specdistill import drafters
from specdistill.targets import TargetModel
from specdistill.train import Trainer
out, mb = Path(sys.argv[1]), int(sys.argv[2])
target = TargetModel(make_llama(), make_tokenizer(), name="tiny")
cfg = run_cfg(out.parent, out.name, micro_batch_size=mb, max_steps=3)
cfg.drafter = toy_families.ToyRolloutConfig()
torch.manual_seed(0)
d = drafters.build(cfg.drafter, target)
Trainer(cfg, target, d, make_data(), make_data(8, seed=1), collate_fn=collate).fit()
"""


@pytest.mark.distributed
def test_rollout_family_two_processes_match_one(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(DDP_SCRIPT.format(tests=str(ROOT / "tests")))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), "4"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_free_port()), str(script), str(tmp_path / "two"), "2"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]

    def losses(d):
        return [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]

    assert len(losses(tmp_path / "one")) == 3
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)


def _fresh_target():
    from conftest import make_llama, make_tokenizer

    from specdistill.targets import TargetModel

    return TargetModel(make_llama(), make_tokenizer(), name="tiny-llama")


def test_trainable_target_changes_only_adapters_and_head(tmp_path):
    target = _fresh_target()
    before = {k: v.clone() for k, v in target.model.state_dict().items()}
    cfg = toy_families.ToyLoraConfig()
    torch.manual_seed(0)
    head0 = toy_families.ToyLoraDrafter(cfg, target.hidden_size, target.vocab_size).head.weight.clone()
    tr, d, s = fit(tmp_path, target, "lora", drafter_cfg=cfg, max_steps=4)
    assert tr.needs.trains_target and s["losses"][-1] < s["losses"][0]
    after = target.model.state_dict()
    adapters = [k for k in after if "lora_" in k]
    assert adapters and all(".q_proj." in k or ".v_proj." in k for k in adapters)
    assert any(after[k].abs().sum() > 0 for k in adapters if "lora_B" in k)  # B starts at zero: it trained
    for k, v in after.items():
        if "lora_" not in k:
            assert torch.equal(v, before[k.replace(".base_layer.", ".")]), f"base weight {k} changed"
    assert not torch.equal(d.head.weight, head0)
    lrs = sorted({g["lr"] / tr.scheduler.get_last_lr()[0] * tr.tc.lr for g in tr.optimizer.param_groups})
    assert {round(g["lr_scale"], 3) for g in tr.optimizer.param_groups} == {1.0, 4.0}, lrs


def test_trainable_target_resumes_exactly(tmp_path):
    import shutil

    from safetensors.torch import load_file

    cfg = toy_families.ToyLoraConfig()
    _, _, full = fit(tmp_path, _fresh_target(), "full", drafter_cfg=cfg, max_steps=6, save_every=3, keep_last=5)
    sd = load_file(tmp_path / "full" / "step_3" / "drafter.safetensors")
    assert any(k.startswith("target_adapter.") and "lora_A" in k for k in sd)  # adapters are in the checkpoint
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(tmp_path / "full" / "step_3", crashed / "step_3")
    (crashed / "latest").write_text("step_3")
    shutil.copy(tmp_path / "full" / "config.yaml", crashed / "config.yaml")
    _, _, resumed = fit(tmp_path, _fresh_target(), "crashed", drafter_cfg=cfg, max_steps=6, save_every=3,
                        keep_last=5)
    assert len(resumed["losses"]) == 3
    assert resumed["losses"] == pytest.approx(full["losses"][3:], rel=1e-6, abs=1e-7)


def test_trainable_target_export_reloads_to_the_same_outputs(tmp_path):
    from specdistill import export
    from specdistill.config import ExportConfig
    from specdistill.loading import load_drafter

    target = _fresh_target()
    _, d, _ = fit(tmp_path, target, "lora_exp", drafter_cfg=toy_families.ToyLoraConfig(), max_steps=3)
    out = export.write(d, ExportConfig(formats=["native"], dtype="float32", target_adapters="merged"),
                       tmp_path / "export", target)
    native = out["native"]
    meta = json.loads((native / "specdistill_export.json").read_text())
    assert meta["target_changed"] is True and (native / "target_adapter.safetensors").is_file()
    assert json.loads((native / "adapter_config.json").read_text())["r"] == 2
    batch = collate([make_data(4)[i] for i in range(4)])

    def outputs(drafter, tgt):
        with torch.no_grad():
            tout = tgt(batch["input_ids"], batch["attention_mask"])
            return drafter.loss(batch, tout).loss, tout.logits

    want_loss, want_logits = outputs(d, target)
    fresh = _fresh_target()
    back = load_drafter(native, fresh)
    assert fresh.has_adapters  # the adapters came back onto the target with the drafter
    got_loss, got_logits = outputs(back, fresh)
    assert torch.equal(got_loss, want_loss) and torch.equal(got_logits, want_logits)
    # The merged target is a plain HF model computing the adapted target's logits.
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out["merged_target"]).eval()
    with torch.no_grad():
        z = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(z, want_logits, atol=1e-5)
    assert target.has_adapters


def test_a_loaded_or_trained_target_decodes_deterministically(tmp_path):
    """LoRA dropout must not reach decoding: adapters injected on load start in the model's own mode,
    and a target trained inside the wrapper is back in eval mode after fit."""
    from peft import LoraConfig

    target = _fresh_target()
    target.attach_lora(LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], lora_dropout=0.5))
    assert not any(m.training for m in target.model.modules())
    cfg = dataclasses.replace(toy_families.ToyLoraConfig())
    trained = _fresh_target()
    fit(tmp_path, trained, "det", drafter_cfg=cfg, max_steps=1)
    assert not any(m.training for m in trained.model.modules())
