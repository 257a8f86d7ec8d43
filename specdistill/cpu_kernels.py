"""A CPU kernel for the target's linears when a pass holds only a few tokens (decoding, verification).

    from specdistill import cpu_kernels
    n = cpu_kernels.enable(target.model)     # nn.Linear -> SmallBatchLinear, same weights; 0 if unavailable
    cpu_kernels.disable(target.model)

Why: on a CPU a BLAS GEMM over M = 2..8 rows costs almost M times a GEMV, so one target pass over a
5-token draft cost ~2x a plain step and no drafter we can train on a CPU paid for itself (docs/verifier.md
"Verify cost on a CPU"). `resources/small_linear.cpp` reads each weight row once and applies it to all
rows while it is in registers, so the pass cost is nearly flat in the number of tokens.

Numerics: every output is computed in the same order whatever the number of rows, so a token's logits
are bit-identical whether it is decoded alone (plain decoding) or verified among others; versus BLAS it
differs by float rounding (~1e-6 relative), as BLAS's own GEMV and GEMM differ from each other.

Used only where it helps and is exact in that sense: fp32 CPU tensors, at most `max_rows` rows, inner
size a multiple of 8, no autograd through it, not under torch.compile; everything else (prefill of long
prompts, training, GPUs, other dtypes) goes to `torch.nn.functional.linear`. It needs an x86-64 CPU with
AVX2 and FMA and a C++ compiler; the extension is built once (10-20 s) under
$TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions). When any of that is missing `enable` logs
why and returns 0, and the target runs unchanged. `SPECDISTILL_CPU_KERNELS=off` or
`target.cpu_kernels=off` turns it off.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "resources" / "small_linear.cpp"
EXT_NAME = "specdistill_small_linear_v1"
DEFAULT_MAX_ROWS = 32
"""Above this many rows BLAS's GEMM is efficient (and the kernel's advantage gone)."""

_lock = threading.Lock()
_ext = None
_why_not: str | None = None


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def unavailable_reason() -> str | None:
    """Why the kernel cannot be used on this machine (None = it can; building may still fail)."""
    if os.environ.get("SPECDISTILL_CPU_KERNELS", "").strip().lower() in ("0", "off", "false", "no"):
        return "turned off by SPECDISTILL_CPU_KERNELS"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"needs an x86-64 CPU (this is {platform.machine()})"
    flags = _cpu_flags()
    if not {"avx2", "fma"} <= flags:
        return "the CPU lacks AVX2/FMA"
    if not SOURCE.is_file():
        return f"{SOURCE} is missing from the installation"
    return None


def _ninja_on_path() -> None:
    """torch's extension builder runs `ninja` from PATH; the `ninja` wheel's binary may sit in a venv's bin
    that is not on it (e.g. when the venv's python is run by path)."""
    import shutil

    if shutil.which("ninja"):
        return
    try:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except (ImportError, AttributeError):
        pass  # the build then fails with torch's own message, logged by load_extension


def load_extension():
    """The compiled extension, built on first use; None (with the reason logged once) when it cannot be."""
    global _ext, _why_not
    with _lock:
        if _ext is not None or _why_not is not None:
            return _ext
        why = unavailable_reason()
        if why is None:
            try:
                from torch.utils.cpp_extension import load

                _ninja_on_path()

                log.info("loading the small-batch CPU linear kernel (built once, 10-20 s): %s", SOURCE.name)
                load(name=EXT_NAME, sources=[str(SOURCE)], extra_cflags=["-O3", "-mavx2", "-mfma"],
                     is_python_module=False, verbose=False)  # registers torch.ops.specdistill.small_linear
                _ext = torch.ops.specdistill
            except Exception as e:  # a missing compiler or headers: run on BLAS instead
                why = f"building {SOURCE.name} failed ({type(e).__name__}: {str(e).strip().splitlines()[-1:]})"
        if _ext is None:
            _why_not = why
            log.warning("small-batch CPU kernel not used: %s; the target runs on torch's BLAS", why)
        return _ext


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias with the kernel (callers check `eligible` first)."""
    ext = load_extension()
    if ext is None:
        raise RuntimeError(f"the small-batch CPU kernel is unavailable: {_why_not}")
    return ext.small_linear(x, weight, bias)


def eligible(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, max_rows: int,
             weight_dtype: torch.dtype = torch.float32) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != weight_dtype:
        return False
    if weight.dim() != 2 or not weight.is_contiguous() or weight.device.type != "cpu" or x.dim() < 1:
        return False
    if type(x) is not torch.Tensor or type(weight) not in (torch.Tensor, torch.nn.Parameter):
        return False  # tensor subclasses (DTensor, FSDP flat params, fake tensors) take torch's path
    K = weight.shape[1]
    if K % 8 or x.shape[-1] != K or x.numel() == 0 or x.numel() // K > max_rows:
        return False
    if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False
    return not torch.compiler.is_compiling()


class SmallBatchLinear(torch.nn.Linear):
    """nn.Linear (same parameters, state dict and isinstance) that routes passes of few rows to the kernel."""

    max_rows: int = DEFAULT_MAX_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _ext is not None and eligible(x, self.weight, self.bias, self.max_rows):
            return _ext.small_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def bf16_weight_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       max_rows: int = DEFAULT_MAX_ROWS) -> torch.Tensor:
    """x @ weight.T + bias for a bf16 `weight` (a drafting copy's): the kernel, which widens the weight
    exactly in registers (half the memory traffic of fp32, fp32 arithmetic), when the call is eligible;
    otherwise F.linear on the weight (and bias) widened to x's dtype."""
    if _ext is not None and eligible(x, weight, bias, max_rows, torch.bfloat16):
        return _ext.small_linear(x, weight, bias)
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


class Bf16WeightLinear(torch.nn.Linear):
    """A drafting-copy linear: bf16 weight, fp32 input/output/bias, computed by `bf16_weight_linear`.
    For drafters only: a target's weights are never rounded."""

    max_rows: int = DEFAULT_MAX_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bf16_weight_linear(x, self.weight, self.bias, self.max_rows)


def _plain_cpu_fp32_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The model's exact-type nn.Linear layers the kernel can take (CPU, fp32 weight, inner size % 8 == 0)."""
    return [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.device.type == "cpu"
            and m.weight.dtype == torch.float32 and m.in_features % 8 == 0]


def bf16_weights(model: torch.nn.Module, max_rows: int = DEFAULT_MAX_ROWS) -> int:
    """Turn a frozen fp32 CPU *drafter*'s plain nn.Linear layers into Bf16WeightLinear (weights rounded to
    bf16, in place); returns how many. 0 (model untouched) when the kernel is unavailable here."""
    todo = _plain_cpu_fp32_linears(model)
    if not todo or load_extension() is None:
        return 0
    for m in todo:
        m.weight = torch.nn.Parameter(m.weight.detach().to(torch.bfloat16).contiguous(), requires_grad=False)
        m.__class__ = Bf16WeightLinear
        m.max_rows = int(max_rows)
    return len(todo)


def enable(model: torch.nn.Module, max_rows: int = DEFAULT_MAX_ROWS) -> int:
    """Route `model`'s plain nn.Linear layers (CPU, fp32) through the kernel; returns how many. 0 when the
    kernel is unavailable here (the reason is logged) or nothing qualifies."""
    todo = _plain_cpu_fp32_linears(model)
    if not todo or load_extension() is None:
        return 0
    for m in todo:
        m.__class__ = SmallBatchLinear
        m.max_rows = int(max_rows)
    return len(todo)


def disable(model: torch.nn.Module) -> int:
    """Undo `enable`: every SmallBatchLinear becomes a plain nn.Linear again."""
    n = 0
    for m in model.modules():
        if type(m) is SmallBatchLinear:
            m.__class__ = torch.nn.Linear
            m.__dict__.pop("max_rows", None)
            n += 1
    return n


def enabled_count(model: torch.nn.Module) -> int:
    return sum(type(m) is SmallBatchLinear for m in model.modules())
