"""`specdistill plan`: memory per device for a target, a drafter and a launch topology.

Parameter counts are exact: the target is instantiated from its config.json on the `meta` device
(no weights are read or allocated) and the drafter is built by its registered family against that
meta target, so every count is what training would hold. Byte counts per parameter follow the
ZeRO paper's accounting (Rajbhandari et al., 2020, section 3.1: mixed-precision Adam keeps 2 B
weights + 2 B gradients + 12 B fp32 master, momentum and variance = 16 B per parameter), sharded
as each topology does:

    topology     drafter weights   drafter grads   optimizer (master + m + v)   frozen target weights
    ddp          1                 1               1                            1 (or 1/N with --shard-target)
    zero 2       1                 1/N             1/N                          1 (or 1/N with --shard-target)
    zero 3/fsdp  1/N               1/N             1/N                          1/N (ZeRO-3/FSDP inference)

Activation terms are estimates, stated with their formula:
- frozen target, under no_grad: only one layer's transients are live at a time, plus the residual
  stream, the hidden states the drafter captures and the fp32 logits of the target distribution:
  B*T*(H*(2 + k) + 3*I)*bytes + B*T*V*4.
- drafter, kept for backward, per unrolled step (EAGLE's training-time test): a decoder layer with
  a fused attention kernel keeps 34*B*T*H bytes of 16-bit activations (Korthikanti et al., 2022,
  "Reducing Activation Recomputation in Large Transformer Models", eq. 1 without the 5*a*s/h
  attention-score term that SDPA / flash attention do not store; x2 in fp32), plus the fused input
  (k*H) and fp32 logits, softmax and target probabilities over the draft vocabulary (3*B*T*Vd*4).
Drafter buffers that share the target's storage (EAGLE's frozen embedding and LM head) cost nothing
extra and are not counted. Not counted: the CUDA context and allocator slack (budget ~1 GiB per GPU), communication buckets.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


@dataclass
class Row:
    name: str
    bytes: float
    formula: str


@dataclass
class Plan:
    target: str
    target_params: int
    drafter: str
    drafter_params: int
    devices: int
    topology: str
    micro_batch: int
    seq_len: int
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(r.bytes for r in self.rows)

    def to_dict(self) -> dict:
        return {
            "target": self.target, "target_params": self.target_params, "drafter": self.drafter,
            "drafter_params": self.drafter_params, "devices": self.devices, "topology": self.topology,
            "micro_batch": self.micro_batch, "seq_len": self.seq_len,
            "per_device_bytes": {r.name: int(round(r.bytes)) for r in self.rows},
            "total_bytes": int(round(self.total)), "notes": self.notes,
        }


def human(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:,.2f} {unit}"
    return f"{n:,.0f} B"


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


# ------------------------------------------------------------------ loading configs


def load_target_config(name: str):
    """An HF config for a target: a model dir, a config.json path, 'default', a GGUF file or a hub id."""
    from transformers import AutoConfig

    p = Path(name).expanduser()
    if p.is_file() and p.name.endswith(".json"):
        return AutoConfig.from_pretrained(str(p.parent)) if p.name == "config.json" else _config_from_json(p)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"{p}: not a model directory (no config.json)")
        return AutoConfig.from_pretrained(str(p))
    from specdistill.config import TargetConfig
    from specdistill.targets import resolve

    path, kwargs = resolve(TargetConfig(name=name))  # converts a GGUF target once (cached)
    try:
        return AutoConfig.from_pretrained(path, **kwargs)
    except OSError as e:
        raise FileNotFoundError(
            f"{name}: cannot read the target's config.json ({e.__class__.__name__}); pass a local model "
            "directory or a config.json path (no hub access needed)"
        ) from None


def _config_from_json(path: Path):
    from transformers import AutoConfig

    d = json.loads(path.read_text())
    mt = d.pop("model_type", None)
    if not mt:
        raise ValueError(f"{path}: config has no model_type")
    return AutoConfig.for_model(mt, **d)


def meta_target(hf_config):
    """The target built on the meta device: exact shapes, no memory."""
    from transformers import AutoModelForCausalLM

    from specdistill.targets import TargetModel

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return TargetModel(model, None, name=getattr(hf_config, "_name_or_path", "") or "")


def build_drafter_on_meta(drafter_name: str, overrides: list[str], target):
    import importlib

    from specdistill import config as config_mod
    from specdistill import drafters

    if drafter_name not in drafters.REGISTRY:
        try:
            importlib.import_module(f"specdistill.drafters.{drafter_name}")
        except ModuleNotFoundError:
            pass
    cfg = config_mod.load(None, [f"drafter.name={drafter_name}", *overrides])
    with torch.device("meta"):
        d = drafters.build(cfg.drafter, target)
    return cfg.drafter, d


def _unique_numel(tensors) -> int:
    seen, n = set(), 0
    for t in tensors:
        key = id(t)
        if key not in seen:
            seen.add(key)
            n += t.numel()
    return n


# ------------------------------------------------------------------ arithmetic


def make_plan(target: str, gpus: int, zero: int = 0, fsdp: bool = False, drafter: str = "eagle",
              drafter_overrides: list[str] | None = None, micro_batch: int = 4, seq_len: int = 2048,
              target_dtype: str = "bfloat16", precision: str = "bf16", shard_target: str = "auto") -> Plan:
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"--zero must be 1, 2 or 3, got {zero}")
    if zero and fsdp:
        raise ValueError("--zero and --fsdp are exclusive")
    for v, what in ((target_dtype, "--target-dtype"), (precision, "--precision")):
        if v not in DTYPE_BYTES:
            raise ValueError(f"{what} must be one of {sorted(DTYPE_BYTES)}, got {v!r}")
    hf = load_target_config(target)
    tgt = meta_target(hf)
    p_target = _unique_numel(tgt.model.parameters())
    dcfg, d = build_drafter_on_meta(drafter, list(drafter_overrides or []), tgt)
    trainable = [p for p in d.trainable_parameters() if p.requires_grad]
    p_draft = _unique_numel(trainable)

    N = gpus
    stage = 3 if fsdp else zero
    topo = "fsdp" if fsdp else (f"zero{zero}" if zero else ("ddp" if N > 1 else "single"))
    shard_t = {"auto": stage == 3, "yes": True, "no": False}[shard_target]
    tb = DTYPE_BYTES[target_dtype]
    mixed = DTYPE_BYTES[precision] == 2
    wbytes = 2 if mixed else 4
    gbytes = 2 if mixed else 4
    obytes = 12 if mixed else 8  # fp32 master (mixed only) + Adam m + v
    s_w = N if stage == 3 else 1
    s_g = N if stage >= 2 else 1
    s_o = N if stage >= 1 else 1
    B, T = micro_batch, seq_len
    H = int(hf.hidden_size)
    inter = int(getattr(hf, "intermediate_size", 4 * H) or 4 * H)
    V = int(hf.vocab_size)
    info = d.export_info()
    k = len(d.spec.needs(dcfg, hf).layers)  # target hidden states the drafter reads
    vd = int(info.get("draft_vocab_size") or V)
    unroll = int(info.get("unroll_steps") or 1)
    n_dlayers = max(1, int(info.get("num_layers") or 1))
    act_b = 2 if mixed else 4
    shard_note = f" / {N} (sharded)" if shard_t and N > 1 else " (replicated)"
    notes = []
    if shard_t and N > 1:
        notes.append("target weights sharded: the frozen target must be loaded under ZeRO-3/FSDP inference "
                     "(docs/distributed.md, 'Big targets'); `targets.load` alone replicates it on every device "
                     "(--shard-target no shows that)")

    rows = [
        Row("target weights (frozen)", p_target * tb / (N if shard_t else 1),
            f"{_count(p_target)} params x {tb} B{shard_note}"),
        Row("target activations (no_grad)", B * T * (H * (2 + k) + 3 * inter) * tb + B * T * V * 4,
            f"B*T*(H*(2+k)+3*I)*{tb} + B*T*V*4; B={B} T={T} H={H} I={inter} k={k} V={V}"),
        Row("drafter weights", p_draft * wbytes / s_w,
            f"{_count(p_draft)} trainable x {wbytes} B" + (f" / {N}" if s_w > 1 else "")),
        Row("drafter gradients", p_draft * gbytes / s_g,
            f"{_count(p_draft)} x {gbytes} B" + (f" / {N}" if s_g > 1 else "")),
        Row("optimizer (AdamW" + (" + fp32 master)" if mixed else ")"), p_draft * obytes / s_o,
            f"{_count(p_draft)} x {obytes} B" + (f" / {N}" if s_o > 1 else "")),
        Row("drafter activations", unroll * (n_dlayers * 34 * B * T * H * (act_b / 2) + B * T * k * H * act_b
                                             + 3 * B * T * vd * 4),
            f"{unroll} unrolled step(s) x ({n_dlayers} layer x 34*B*T*H{'' if mixed else ' x2'} + B*T*k*H*{act_b}"
            f" + 3*B*T*Vd*4), Vd={vd}"),
    ]
    from specdistill import targets as _targets

    name = f"default ({_targets.DEFAULT_NAME})" if target == "default" else target
    return Plan(target=str(name), target_params=p_target, drafter=f"{drafter}"
                + (f" ({d.variant})" if d.variant else ""), drafter_params=p_draft,
                devices=N, topology=topo, micro_batch=B, seq_len=T, rows=rows,
                notes=notes)


def render(plan: Plan) -> str:
    topo = {"single": "1 device", "ddp": "DDP", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3",
            "zero1": "DeepSpeed ZeRO-1", "fsdp": "FSDP (full shard)"}[plan.topology]
    lines = [
        f"target  {plan.target}: {plan.target_params:,} parameters",
        f"drafter {plan.drafter}: {plan.drafter_params:,} trainable parameters",
        f"{plan.devices} device(s), {topo}, micro-batch {plan.micro_batch} x sequence {plan.seq_len}",
        "",
    ]
    w = max(len(r.name) for r in plan.rows) + 2
    lines.append(f"{'per device':<{w}}{'bytes':>14}  formula")
    for r in plan.rows:
        lines.append(f"{r.name:<{w}}{human(r.bytes):>14}  {r.formula}")
    lines.append(f"{'total':<{w}}{human(plan.total):>14}  (+ ~1 GiB CUDA context / allocator slack per GPU)")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


# ------------------------------------------------------------------ CLI


def cmd_plan(args) -> None:
    plan = make_plan(args.target, args.gpus, zero=args.zero or 0, fsdp=args.fsdp, drafter=args.drafter,
                     drafter_overrides=args.overrides, micro_batch=args.micro_batch, seq_len=args.seq_len,
                     target_dtype=args.target_dtype, precision=args.precision, shard_target=args.shard_target)
    print(json.dumps(plan.to_dict(), indent=1) if args.json else render(plan))


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="memory per device: target weights + activations + drafter + optimizer",
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="model dir, config.json, .gguf, 'default' or hub id (if cached)")
    p.add_argument("--gpus", type=int, default=1, help="data-parallel devices in total")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--zero", type=int, choices=[1, 2, 3], help="DeepSpeed ZeRO stage")
    g.add_argument("--fsdp", action="store_true", help="FSDP full shard (same sharding as ZeRO-3)")
    p.add_argument("--drafter", default="eagle", help="drafter family (registry name)")
    p.add_argument("--micro-batch", type=int, default=4, help="samples per device per forward")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sample")
    p.add_argument("--target-dtype", default="bfloat16", help="dtype of the frozen target's weights")
    p.add_argument("--precision", default="bf16", help="drafter training precision: bf16/fp16 (mixed) or fp32")
    p.add_argument("--shard-target", choices=["auto", "yes", "no"], default="auto",
                   help="shard the frozen target over the devices (auto: with ZeRO-3/FSDP)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("overrides", nargs="*", help="drafter.key=value overrides (e.g. drafter.draft_vocab_size=32000)")
    p.set_defaults(func=cmd_plan)
