"""Launch topology vs run config: the batch comes from `train.*`, never from the launcher.

`recipes/accelerate/*.yaml` describe topology only (processes, machines, DDP / DeepSpeed / FSDP).
Batch size, accumulation and clipping belong to the RunConfig. DeepSpeed keeps its own copies
(`train_micro_batch_size_per_gpu`, `gradient_accumulation_steps`, `gradient_clipping`,
`train_batch_size`) and accelerate quietly prefers DeepSpeed's value when the two disagree
("Using DeepSpeed's value"), which changes the global batch without an error. `check_topology`
fills every "auto" (or absent) DeepSpeed value from the run config and stops the run when an
explicit one disagrees.

It also catches launches whose processes do not form one job (each process would train alone on
its shard and they would silently diverge): several processes started but accelerate sees one,
or DeepSpeed / FSDP requested by the launcher but not active in the process.

The Trainer calls `check_topology(accelerator, train_cfg)` after building the Accelerator and
before `prepare`. `accelerator_kwargs()` gives the extra Accelerator arguments a topology needs
(DeepSpeed on a machine without GPUs needs the gloo backend named explicitly).

Mixed precision is decided here too, once: `resolve_precision(train.mixed_precision)` gives the
Accelerator's setting (auto = bf16 on bf16 GPUs and on CPUs with native bf16, else no), and
`precision_plan(accelerator)` the dtypes of weights, autocast and target features under the
topology that runs (table at `PrecisionPlan`); the Trainer casts the target features by it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

_TRUE = ("1", "true", "yes")


class TopologyError(RuntimeError):
    """The launch topology contradicts the run config or is not a working distributed job."""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def _world_size_from_env() -> int:
    for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        v = os.environ.get(k, "")
        if v.isdigit():
            return int(v)
    return 1


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def accelerator_kwargs() -> dict[str, Any]:
    """Extra `Accelerator(...)` arguments this launch needs.

    accelerate (1.15) derives the process-group backend from the device. Under DeepSpeed on a
    machine with no GPU it finds none, leaves the backend unset and then treats the job as one
    process (num_processes=1) while DeepSpeed sees the real world size, so `prepare` fails with
    "train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size".
    Naming gloo (DeepSpeed's CPU accelerator uses it) fixes that.
    """
    launched = int(os.environ.get("LOCAL_RANK", "-1")) != -1
    if launched and _env_flag("ACCELERATE_USE_DEEPSPEED") and not _cuda_available():
        from accelerate.utils import InitProcessGroupKwargs

        return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    return {}


def _get(conf: dict, dotted: str):
    node: Any = conf
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(conf: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = conf
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _is_auto(v) -> bool:
    return v is None or (isinstance(v, str) and v.strip().lower() == "auto")


def _same(a, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def _check_deepspeed(plugin, train_cfg, num_processes: int) -> dict:
    conf = plugin.deepspeed_config
    mb, ga = int(train_cfg.micro_batch_size), int(train_cfg.grad_accum)
    clip = float(train_cfg.grad_clip)
    wanted = {
        "train_micro_batch_size_per_gpu": (mb, "train.micro_batch_size"),
        "gradient_accumulation_steps": (ga, "train.grad_accum"),
        # DeepSpeed clips inside its step (accelerate's clip_grad_norm_ is a no-op under it), and
        # accelerate fills an "auto" value with 1.0; 0 means off in both systems.
        "gradient_clipping": (clip, "train.grad_clip"),
        "train_batch_size": (mb * ga * num_processes,
                             f"train.micro_batch_size x train.grad_accum x processes ({mb} x {ga} x {num_processes})"),
    }
    problems, filled = [], {}
    for key, (value, source) in wanted.items():
        have = _get(conf, key)
        if _is_auto(have):
            _set(conf, key, value)
            filled[key] = value
        elif not _same(have, value):
            problems.append(f"  {key} = {have!r} in the DeepSpeed config, but {source} = {value!r}")
    if problems:
        raise TopologyError(
            "DeepSpeed's batch settings disagree with the run config (the batch comes from train.*; "
            "set these keys to \"auto\" in the DeepSpeed JSON, or drop them, and pass train.* overrides "
            "instead):\n" + "\n".join(problems)
        )
    plugin.gradient_accumulation_steps = ga
    stage = _get(conf, "zero_optimization.stage")
    if stage == 3:
        # The Trainer's checkpoints hold the drafter's full state dict, which ZeRO-3 can only give
        # by gathering the shards (accelerate refuses get_state_dict otherwise).
        _set(conf, "zero_optimization.stage3_gather_16bit_weights_on_model_save", True)
    return {"zero_stage": stage, "filled": filled}


def _adopt_deepspeed_cpu_group(accelerator, dtype: str, env_world: int) -> bool:
    """Repair accelerate's view of a DeepSpeed-on-CPU job built without `accelerator_kwargs()`.

    In that case DeepSpeed has already initialised the real process group (gloo, all ranks) but
    accelerate, having found no backend, recorded one process. Record the group DeepSpeed made,
    exactly as accelerate does when the backend is named (state.py: num_processes = world size,
    process_index = rank, local_process_index = LOCAL_RANK). Returns True if it repaired.
    """
    import torch.distributed as dist

    if dtype != "DEEPSPEED" or int(accelerator.num_processes) != 1 or env_world <= 1:
        return False
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() != env_world:
        return False
    from accelerate.state import AcceleratorState, PartialState

    if PartialState._shared_state.get("backend") is not None:
        return False
    fix = {"backend": dist.get_backend(), "num_processes": dist.get_world_size(),
           "process_index": dist.get_rank(), "local_process_index": int(os.environ.get("LOCAL_RANK", "0"))}
    PartialState._shared_state.update(fix)
    AcceleratorState._shared_state.update(fix)
    return int(accelerator.num_processes) == env_world


_EXIT_HOOK: list[bool] = [False]


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def close_process_group_at_exit(accelerator) -> None:
    """Destroy the process group when the interpreter exits. Left to interpreter teardown, a finished
    gloo rank can still hold live communication threads and abort ("terminate called without an
    active exception", exit -6) after all its work is written, so a launcher reports a finished run
    as failed; seen once in a 2-process CPU test on a loaded machine."""
    if accelerator.num_processes > 1 and not _EXIT_HOOK[0]:
        import atexit

        atexit.register(_destroy_process_group)
        _EXIT_HOOK[0] = True


def check_topology(accelerator, train_cfg) -> dict:
    """Validate the launch against `train_cfg` (a TrainConfig); fill DeepSpeed "auto" batch keys.

    Call after building the Accelerator and before `accelerator.prepare`. Returns a small summary
    (distributed type, processes, global batch) for logging. Raises TopologyError with the fix.
    """
    close_process_group_at_exit(accelerator)
    dtype = getattr(accelerator.distributed_type, "name", str(accelerator.distributed_type))
    env_world = _world_size_from_env()
    if _adopt_deepspeed_cpu_group(accelerator, dtype, env_world):
        import logging

        logging.getLogger(__name__).info(
            "DeepSpeed on the CPU: accelerate named no process-group backend, so the %d-process %s group "
            "DeepSpeed initialised is used (build the Accelerator with topology.accelerator_kwargs() to "
            "have accelerate name it)", env_world, accelerator.state.backend)
    n = int(accelerator.num_processes)
    if env_world > 1 and n == 1:
        raise TopologyError(
            f"{env_world} processes were launched (WORLD_SIZE={env_world}) but accelerate sees 1 "
            f"(distributed type {dtype}): each process would train alone and they would diverge. "
            "On a machine without GPUs launch DDP with ACCELERATE_USE_CPU=true (./launch.sh --cpu --nproc N "
            "does this) and build the Accelerator with specdistill.train.topology.accelerator_kwargs() "
            "for DeepSpeed."
        )
    if _env_flag("ACCELERATE_USE_DEEPSPEED") and dtype != "DEEPSPEED":
        raise TopologyError(
            f"the launcher asked for DeepSpeed but accelerate runs {dtype}; "
            "do not pass --cpu to `accelerate launch` with a DeepSpeed config (DeepSpeed picks its CPU "
            "accelerator by itself when there is no GPU)"
        )
    if _env_flag("ACCELERATE_USE_FSDP") and dtype != "FSDP":
        raise TopologyError(
            f"the launcher asked for FSDP but accelerate runs {dtype}: accelerate enables FSDP only on "
            "GPU-like devices (not on the CPU), so the model would be neither sharded nor synchronised. "
            "Use ddp.yaml or DeepSpeed ZeRO (--zero 2|3) on this machine."
        )
    if int(accelerator.gradient_accumulation_steps) != int(train_cfg.grad_accum):
        raise TopologyError(
            f"accelerate accumulates {accelerator.gradient_accumulation_steps} micro-batches but "
            f"train.grad_accum = {train_cfg.grad_accum}; remove --gradient_accumulation_steps / "
            "ACCELERATE_GRADIENT_ACCUMULATION_STEPS from the launch and set train.grad_accum instead"
        )
    summary = {"distributed_type": dtype, "num_processes": n,
               "global_batch": int(train_cfg.micro_batch_size) * int(train_cfg.grad_accum) * n}
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if dtype == "DEEPSPEED" and plugin is not None:
        summary.update(_check_deepspeed(plugin, train_cfg, n))
    return summary


# ------------------------------------------------------------------ mixed precision
# The one place that decides the dtypes of a run. `resolve_precision` turns train.mixed_precision
# (auto | no | bf16 | fp16) into what the Accelerator is built with; `precision_plan` reads the
# built Accelerator and says, for the topology it runs, which dtype the drafter's weights have in
# its forward, whether autocast runs, and which dtype the target features handed to the drafter
# must have:
#
#   topology                 mixed_precision  drafter weights   autocast   target features
#   DDP / one process / FSDP bf16 | fp16      fp32 (FSDP: cast)  bf16|fp16  fp32 (autocast casts)
#   DeepSpeed ZeRO-2 / -3    bf16 | fp16      bf16 | fp16        none       bf16 | fp16
#   any                      no               fp32               none       fp32
#
# DeepSpeed converts the whole module to bf16/fp16 and runs no autocast, so fp32 features reach a
# bf16 linear ("expected m1 and m2 to have the same dtype"); they are cast here. Labels (the
# target's last hidden state and logits) are never cast: the drafter computes its target
# distribution from them in fp32.


def _cpuinfo_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 matmuls in hardware (x86 AVX512-BF16 or AMX, Arm BF16).

    oneDNN's own check (torch.ops.mkldnn._is_mkldnn_bf16_supported) also says yes on AVX512 CPUs
    without BF16 instructions, where bf16 is emulated and training ran 3x slower than fp32, so it
    is not used.
    """
    import torch

    cpu = getattr(torch, "cpu", None)
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, name, None)
        if fn is not None and fn():
            return True
    flags = _cpuinfo_flags()
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_precision(mixed_precision: str) -> str:
    """train.mixed_precision -> the Accelerator's mixed_precision (no | bf16 | fp16).

    auto: bf16 on a CUDA GPU that supports it, bf16 on a CPU with native bf16 (cpu_has_native_bf16),
    else no (fp32). It is decided from capabilities only, never from a timing, so every process of
    a job decides the same.
    """
    if mixed_precision != "auto":
        return mixed_precision
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_has_native_bf16() else "no"


@dataclass(frozen=True)
class PrecisionPlan:
    """The dtypes of one run under its topology (table above)."""

    mixed_precision: str  # no | bf16 | fp16, as the Accelerator runs it
    distributed_type: str
    weights: Any  # torch.dtype of the drafter's weights inside its forward
    autocast: Any  # torch.dtype of the autocast region around the drafter's forward, or None
    features: Any  # torch.dtype of the target hidden states handed to the drafter
    labels: Any  # torch.dtype the drafter's target distribution is computed in (always fp32)

    def cast_target_output(self, out):
        """`out` (a TargetOutput) with its hidden states in `features`; last_hidden and logits kept."""
        hs = getattr(out, "hidden_states", None)
        if not hs or all(not v.is_floating_point() or v.dtype == self.features for v in hs.values()):
            return out
        cast = {k: v.to(self.features) if v.is_floating_point() else v for k, v in hs.items()}
        return dataclasses.replace(out, hidden_states=cast)

    def wrap_target_fn(self, fn):
        """The Trainer's target_fn, returning what `cast_target_output` makes of its result."""
        if self.features == _fp32():
            return fn
        return lambda batch: self.cast_target_output(fn(batch))


def _fp32():
    import torch

    return torch.float32


def precision_plan(accelerator) -> PrecisionPlan:
    """The PrecisionPlan of a built Accelerator (its distributed type and resolved mixed precision)."""
    import torch

    dtypes = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    mp = str(getattr(accelerator, "mixed_precision", "no") or "no")
    if mp not in dtypes:
        raise TopologyError(f"mixed precision {mp!r} is not supported by the Trainer (use no, bf16 or fp16)")
    dist = getattr(accelerator.distributed_type, "name", str(accelerator.distributed_type))
    half = dtypes[mp]
    if mp == "no":
        return PrecisionPlan(mp, dist, torch.float32, None, torch.float32, torch.float32)
    if dist == "DEEPSPEED":  # the engine holds bf16/fp16 weights and runs no autocast
        return PrecisionPlan(mp, dist, half, None, half, torch.float32)
    weights = half if dist == "FSDP" else torch.float32  # FSDP's MixedPrecision casts params for compute
    return PrecisionPlan(mp, dist, weights, half, torch.float32, torch.float32)


def fresh_single_process_state(mixed_precision: str) -> None:
    """accelerate keeps one process-wide state; a second Trainer in the same single process (a
    benchmark training several variants, `specdistill retrain`) may ask for another precision. Outside a
    launched multi-process job, drop the previous run's state so the new one can be built."""
    import os

    from accelerate.state import AcceleratorState, GradientState

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or not AcceleratorState._shared_state:
        return
    if AcceleratorState().mixed_precision != mixed_precision:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
