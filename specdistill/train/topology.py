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
"""

from __future__ import annotations

import os
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


def check_topology(accelerator, train_cfg) -> dict:
    """Validate the launch against `train_cfg` (a TrainConfig); fill DeepSpeed "auto" batch keys.

    Call after building the Accelerator and before `accelerator.prepare`. Returns a small summary
    (distributed type, processes, global batch) for logging. Raises TopologyError with the fix.
    """
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
