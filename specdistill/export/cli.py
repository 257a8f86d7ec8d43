"""`specdistill export <checkpoint or native export dir> [--formats native,sglang,vllm] [--out DIR]`.

The input is a Trainer run directory (its `latest` checkpoint is used), one `step_<n>/` directory,
or a native export. The target named in the run's config.yaml (or the native export's config.json,
or --target) is loaded for its sizes, layer count and shared tensors; every format is checked
against its engine contract before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({_one_line(e)})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    return data


def load_any(path: str | Path, target_name: str = ""):
    """(drafter, target, run_cfg | None) from a run dir, step dir or native export dir."""
    import yaml

    from specdistill import config, loading, targets
    from specdistill.export import native

    path = Path(path)
    if native.is_native_dir(path) or native.is_engine_export(path):
        meta_file = "config.json" if native.is_native_dir(path) else "specdistill_export.json"
        meta = _read_json(path / meta_file)
        name = target_name or ("default" if meta.get("target") == targets.DEFAULT_NAME else meta.get("target", ""))
        target = targets.load(name or "default")
        return loading.load_drafter(path, target), target, None
    step = native.checkpoint_dir(path)
    if step is None:
        raise FileNotFoundError(f"{path}: neither a Trainer checkpoint (run dir with `latest`, or step_<n>/ with "
                                "drafter.safetensors beside ../config.yaml) nor a native export (config.json with "
                                "specdistill_format=native)")
    cfg_file = step.parent / "config.yaml"
    try:
        run_cfg = config.from_dict(yaml.safe_load(cfg_file.read_text()) or {})
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file}: not valid YAML ({_one_line(e)})") from None
    tcfg = run_cfg.target
    if target_name:
        tcfg.name = target_name
    target = targets.load(tcfg)
    return loading.load_drafter(step, target), target, run_cfg


def cmd_export(args) -> int:
    from specdistill import export
    from specdistill.config import ExportConfig

    drafter, target, run_cfg = load_any(args.path, args.target)
    ecfg = ExportConfig(**vars(run_cfg.export)) if run_cfg is not None else ExportConfig()
    if args.formats:
        ecfg.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if args.dtype:
        ecfg.dtype = args.dtype
    if args.out:
        ecfg.out_dir = args.out
    if not ecfg.out_dir:
        src = Path(args.path)
        run_dir = src.parent if (src / "drafter.safetensors").exists() else src
        ecfg.out_dir = str(run_dir / "export") if run_cfg is not None else str(src.parent / "export")
    written = export.write(drafter, ecfg, ecfg.out_dir, target)
    print(json.dumps({fmt: str(p) for fmt, p in written.items()}, indent=1))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a trained drafter in the formats serving engines load",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="run dir (uses `latest`), step_<n>/ dir, or a native/SGLang/vLLM export dir")
    p.add_argument("--formats", default="", help="comma-separated subset of native,sglang,vllm "
                   "(default: every format the drafter supports)")
    p.add_argument("--out", default="", help="export root (one folder per format); default <run dir>/export")
    p.add_argument("--dtype", default="", choices=["", "float32", "bfloat16", "float16"],
                   help="weights dtype (default: the run's export.dtype, bfloat16)")
    p.add_argument("--target", default="", help="override the target named in the run's config")
    p.set_defaults(func=cmd_export)
