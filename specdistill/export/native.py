"""specdistill's own format: reloads to the identical drafter through the registry.

    config.json              {"specdistill_format": "native", "family", "drafter_config", target facts}
    model.safetensors        the drafter's state dict, minus tensors it shares with the target
    specdistill_export.json  metadata (format, family, variant, target, layer ids + convention, commit)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from specdistill import adapters, drafters
from specdistill import config as _config
from specdistill.export import common, contracts, eagle1, formats

log = logging.getLogger(__name__)

FORMAT = "native"
FORMAT_VERSION = 1
ADAPTER_FILE = "target_adapter.safetensors"  # a trained target's LoRA (peft layout, with adapter_config.json)


def _target_storage(target) -> set[int]:
    return {t.data_ptr() for t in list(target.parameters()) + list(target.buffers())}


def build(drafter, target, dtype: str = "float32") -> tuple[dict, dict]:
    shared = _target_storage(target)
    # Tensors that are the target's own (e.g. a frozen shared embedding) are rebuilt from the target.
    sd = {k: v for k, v in drafter.state_dict().items() if v.data_ptr() not in shared}
    tensors = common.cast(sd, common.torch_dtype(dtype))
    spec = common.spec_of(drafter)
    cfg = {
        "specdistill_format": FORMAT,
        "format_version": FORMAT_VERSION,
        "family": spec.name,
        "drafter_config": common.drafter_config_dict(drafter),
        "target": common.target_name(target),
        "target_num_layers": int(target.num_layers),
        "target_hidden_size": int(target.hidden_size),
        "target_vocab_size": int(target.vocab_size),
        "layer_ids": common.layer_ids(drafter, target),
        "layer_convention": common.LAYER_CONVENTION,
        "torch_dtype": dtype,
    }
    return cfg, tensors


def check(cfg: dict, tensors: dict, num_target_layers: int) -> None:
    where = "native export"
    for k in ("family", "drafter_config", "target", "layer_ids"):
        if k not in cfg:
            raise contracts.ContractError(f"{where}: config key {k!r} is required and missing")
    if cfg["family"] not in drafters.REGISTRY:
        raise contracts.ContractError(f"{where}: family {cfg['family']!r} is not a registered drafter")
    if cfg["layer_ids"]:
        contracts.check_layer_ids(cfg["layer_ids"], num_target_layers + 1, where, "layer_ids", count=0,
                                  ascending=False)
    try:
        json.dumps(cfg)
    except TypeError as e:
        raise contracts.ContractError(f"{where}: drafter_config is not JSON-serialisable: {e}") from None
    if not tensors:
        raise contracts.ContractError(f"{where}: the drafter has no tensors of its own")


def write(drafter, target, out_dir: str | Path, dtype: str = "float32") -> Path:
    cfg, tensors = build(drafter, target, dtype)
    check(cfg, tensors, target.num_layers)
    meta = common.metadata(drafter, target, FORMAT, dtype)
    return common.write_export(Path(out_dir), cfg, tensors, meta)


def is_native_dir(path: str | Path) -> bool:
    p = Path(path) / "config.json"
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("specdistill_format") == FORMAT
    except (OSError, ValueError):
        return False


def _load_weights(drafter, sd: dict, target, where: str) -> None:
    own = {k for k, v in drafter.state_dict().items() if v.data_ptr() not in _target_storage(target)}
    missing = sorted(own - set(sd))
    unexpected = sorted(set(sd) - set(drafter.state_dict()))
    if missing or unexpected:
        raise ValueError(f"{where}: weights do not match the drafter built from its config "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    drafter.load_state_dict(sd, strict=False)


def load(path: str | Path, target, device: str | torch.device | None = None):
    """Rebuild the drafter from a native export directory for `target`."""
    path = Path(path)
    try:
        cfg = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not a native export (no config.json)") from None
    if cfg.get("specdistill_format") != FORMAT:
        raise ValueError(f"{path / 'config.json'}: specdistill_format is {cfg.get('specdistill_format')!r}, expected 'native'")
    for key, have in (("target_num_layers", target.num_layers), ("target_hidden_size", target.hidden_size),
                      ("target_vocab_size", target.vocab_size)):
        if key in cfg and cfg[key] != have:
            raise ValueError(f"{path / 'config.json'}: {key} is {cfg[key]} but the target has {have}; "
                             f"this drafter was trained for {cfg.get('target')!r}")
    if cfg.get("target") and cfg["target"] != common.target_name(target):
        log.warning("%s: drafter was exported for %r, loading it for %r", path, cfg["target"], common.target_name(target))
    spec = drafters.get(cfg["family"])
    dcfg = _config._merge(spec.config_cls(), cfg["drafter_config"], "drafter_config.")
    drafter = drafters.build(dcfg, target)
    _load_weights(drafter, load_file(str(path / "model.safetensors")), target, str(path / "model.safetensors"))
    if (path / ADAPTER_FILE).is_file():
        adapters.restore(drafter, target, load_file(str(path / ADAPTER_FILE)), str(path / ADAPTER_FILE))
    if device is not None:
        drafter = drafter.to(device)
    return drafter.eval()


def checkpoint_dir(path: str | Path) -> Path | None:
    """The step_<n>/ directory a Trainer run dir or step dir names, or None if it is neither."""
    path = Path(path)
    if (path / "drafter.safetensors").is_file() and (path.parent / "config.yaml").is_file():
        return path
    ptr = path / "latest"
    if ptr.is_file() and (path / "config.yaml").is_file():
        step = path / ptr.read_text().strip()
        if (step / "drafter.safetensors").is_file():
            return step
    return None


def load_checkpoint(path: str | Path, target, device: str | torch.device | None = None):
    """Rebuild the drafter from a Trainer checkpoint (run dir with `latest`, or one step_<n>/ dir)."""
    step = checkpoint_dir(path)
    if step is None:
        raise FileNotFoundError(f"{path}: not a checkpoint (expected step_<n>/drafter.safetensors beside "
                                "../config.yaml, or a run dir with a `latest` pointer)")
    import yaml

    run_cfg = _config.from_dict(yaml.safe_load((step.parent / "config.yaml").read_text()) or {})
    if run_cfg.drafter is None:
        raise ValueError(f"{step.parent / 'config.yaml'}: no drafter section")
    drafter = drafters.build(run_cfg.drafter, target)
    where = str(step / "drafter.safetensors")
    sd, adapter_sd = adapters.split(load_file(where))
    _load_weights(drafter, sd, target, where)
    adapters.restore(drafter, target, adapter_sd, where)  # a trained target's LoRA comes back with it
    if device is not None:
        drafter = drafter.to(device)
    return drafter.eval()


def is_engine_export(path: str | Path, fmt: str | None = None) -> bool:
    """An SGLang/vLLM directory written by specdistill (its metadata names the drafter config)."""
    p = Path(path) / "specdistill_export.json"
    if not p.is_file():
        return False
    try:
        meta = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format") in ((fmt,) if fmt else ("sglang", "vllm")) and "drafter_config" in meta


# speculators/SGLang architecture switches. One the drafter's config implements (a field of that name,
# EAGLE-3.1's fc_norm / norm_output) must agree with it; any other one that is set is refused: loading it
# would silently compute a different function.
UNSUPPORTED_FLAGS = ("norm_before_fc", "norm_output", "norm_before_residual", "fc_norm", "sliding_window")


def _refuse_unsupported_architecture(config_file: Path, drafter_cfg=None) -> None:
    try:
        cfg = json.loads(config_file.read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError) as e:
        raise ValueError(f"{config_file}: unreadable ({e})") from None
    layer = cfg.get("transformer_layer_config") or {}
    on = {k: bool(cfg.get(k) or (isinstance(layer, dict) and layer.get(k))) for k in UNSUPPORTED_FLAGS}
    implemented = {k: bool(getattr(drafter_cfg, k)) for k in UNSUPPORTED_FLAGS
                   if drafter_cfg is not None and isinstance(getattr(drafter_cfg, k, None), bool)}
    differ = [f"{k}={str(on[k]).lower()}" for k in implemented if on[k] != implemented[k]]
    if differ:
        raise ValueError(f"{config_file}: sets {', '.join(differ)} but its specdistill_export.json drafter_config "
                         "says otherwise; the two describe different functions, so it is refused")
    refused = [k for k in UNSUPPORTED_FLAGS if on[k] and k not in implemented]
    if refused:
        raise ValueError(f"{config_file}: sets {', '.join(refused)}, which specdistill's EAGLE drafter does not "
                         "implement (not supported yet); it would load but compute a different function, so it is "
                         "refused")


def load_engine_export(path: str | Path, target, device: str | torch.device | None = None):
    """Rebuild the drafter from an SGLang or vLLM export this package wrote (to score exactly what ships).

    Engine names map back to ours: `layers.0.*` is `midlayer.*` and `layers.{i}.*` (i >= 1, EAGLE-1
    with several layers) is `layers.{i-1}.*`. Tensors the engine takes from the target (EAGLE-1's
    embedding and LM head) are rebuilt from the target; absent d2t/t2d mean the full vocabulary."""
    path = Path(path)
    meta = json.loads((path / "specdistill_export.json").read_text())
    spec = drafters.get(meta["family"])
    dcfg = _config._merge(spec.config_cls(), meta["drafter_config"], "drafter_config.")
    _refuse_unsupported_architecture(path / "config.json", dcfg)
    drafter = drafters.build(dcfg, target)
    sd = {eagle1.from_engine_name(k): v for k, v in load_file(str(path / "model.safetensors")).items()}
    want = drafter.export_state_dict()
    own = set(drafter.state_dict())
    missing = sorted(k for k in want if k not in sd and k not in ("d2t", "t2d") and k in own)
    if missing:
        raise ValueError(f"{path / 'model.safetensors'}: tensors missing for the drafter: {missing[:5]}")
    unknown = sorted(set(sd) - own - set(want))
    if unknown:  # a tensor we would drop is a function we would not compute
        raise ValueError(f"{path / 'model.safetensors'}: tensors this drafter does not have: {unknown[:5]} "
                         "(written by another trainer or a newer specdistill?); refusing to load a different function")
    # A family installs what comes with the tensors (EAGLE: the d2t/t2d draft vocabulary) in load_state_dict.
    drafter.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    if device is not None:
        drafter = drafter.to(device)
    return drafter.eval()


def adapter_files(drafter, target, out_dir, dtype: str) -> dict:
    """A trained target's LoRA beside the drafter (peft layout: target_adapter.safetensors + adapter_config.json)."""
    if not target.has_adapters:
        return {}
    cfg = json.loads(json.dumps(target.lora_config.to_dict(),
                                default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    return {ADAPTER_FILE: common.safetensors_writer(common.cast(target.adapter_state_dict(), common.torch_dtype(dtype))),
            "adapter_config.json": common.json_writer(cfg)}


formats.register(formats.ExportFormat(name=FORMAT, build=build, check=check, engine="specdistill (eval, init_from)",
                                      claims=is_native_dir, load=load, files=adapter_files))
