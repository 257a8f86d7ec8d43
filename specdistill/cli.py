"""`specdistill` command line: train, cp, ls, config, data, eval, export, publish, plan.

Subcommands that belong to a library area live in that area's module, which exposes
`register(subparsers)`; this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import runpy
import shutil
import sys
from pathlib import Path

from specdistill import config

RECIPES_DIR = config.RECIPE_CONFIG_DIR.parent  # recipes/ of a checkout, or the copy in an installed wheel

# (module, what it adds); each exposes register(subparsers)
SUBCOMMAND_MODULES = [
    "specdistill.data.cli",  # data stats | features | regenerate
    "specdistill.scoring",  # eval
    "specdistill.export.cli",  # export
    "specdistill.export.hub",  # publish
    "specdistill.plan",  # plan
    "specdistill.online.retrain",  # retrain (scheduled online distillation on query logs)
]


def _recipe_path(name: str) -> Path:
    p = RECIPES_DIR / f"{name}.py"
    if not p.exists():
        avail = sorted(x.stem for x in RECIPES_DIR.glob("*.py"))
        raise SystemExit(f"unknown recipe {name!r}; available: {', '.join(avail)}")
    return p


def cmd_train(args) -> None:
    """`specdistill train eagle key=value ...` == `python recipes/eagle.py key=value ...` (one process).
    For several processes use `accelerate launch recipes/<name>.py` or ./launch.sh."""
    from specdistill.locks import LockHeldError

    path = _recipe_path(args.recipe)
    overrides, rest = [], list(args.overrides)
    while rest:  # --threads may come among the overrides (they are taken as the remainder of the line)
        tok = rest.pop(0)
        if tok == "--threads" or tok.startswith("--threads="):
            val = tok.partition("=")[2] or (rest.pop(0) if rest else "")
            if not val.isdigit():
                raise config.ConfigError(f"--threads ({val!r}) must be an integer >= 0")
            args.threads = int(val)
        else:
            overrides.append(tok)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # from the start: target load and data preparation too
        overrides.append(f"train.threads={args.threads}")
    sys.argv = [str(path), *overrides]
    try:
        runpy.run_path(str(path), run_name="__main__")
    except LockHeldError as e:  # another run holds train.output_dir (checkpoint errors are ValueErrors)
        if args.verbose:
            raise
        print(f"specdistill train: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_cp(args) -> None:
    src = _recipe_path(args.recipe)
    dst = Path(args.dest)
    if dst.exists() and not args.force:
        raise SystemExit(f"{dst} exists; pass --force to overwrite")
    shutil.copy(src, dst)
    yml = config.recipe_yaml(args.recipe)
    if yml.exists():
        shutil.copy(yml, dst.with_suffix(".yaml"))
    print(f"copied {src} -> {dst}" + (f" and {yml.name} -> {dst.with_suffix('.yaml')}" if yml.exists() else ""))


def cmd_ls(args) -> None:
    from specdistill import drafters

    print("recipes:")
    for p in sorted(RECIPES_DIR.glob("*.py")):
        text = p.read_text()
        doc = (text.split('"""')[1].strip().splitlines() or [""])[0] if '"""' in text else ""
        print(f"  {p.stem:<14} {doc}")
    print("drafter families:")
    for name, spec in sorted(drafters.REGISTRY.items()):
        print(f"  {name:<14} exports: {', '.join(spec.export_formats)}  ({spec.paper})")


def cmd_config(args) -> None:
    cfg = config.load(args.recipe, args.overrides)
    print("\n".join(config.describe(cfg)))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="specdistill", description=__doc__.splitlines()[0])
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run a recipe in this process (accelerate launch for several)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="key=value config overrides")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default; same as train.threads); 1 is much faster when "
                        "other jobs share the cores")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("cp", help="copy a recipe and its YAML to edit them")
    p.add_argument("recipe")
    p.add_argument("dest")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_cp)

    p = sub.add_parser("ls", help="list recipes and drafter families")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("config", help="print a recipe's resolved config with every key documented")
    p.add_argument("recipe", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_config)

    for mod_name in SUBCOMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name == mod_name:  # that area is not part of this build
                continue
            raise
        mod.register(sub)
    return ap


# Commands that read files a user points at; a load error there is one line naming the file (fsutil).
_LOAD_COMMANDS = {"export": "path", "eval": "drafter", "publish": "export_dir"}


def _with_load_errors(args):
    if args.command not in _LOAD_COMMANDS or args.verbose:
        return args.func(args)
    from specdistill.fsutil import describe_load_error

    try:
        return args.func(args)
    except Exception as e:
        line = describe_load_error(e, getattr(args, _LOAD_COMMANDS[args.command], None))
        if line is None:
            raise
        print(f"specdistill {args.command}: {line}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv=None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        rc = _with_load_errors(args)
    except (config.ConfigError, FileNotFoundError, ValueError) as e:
        # User errors (bad key, missing file, malformed input) get one clear line, not a traceback.
        if args.verbose:
            raise
        print(f"specdistill {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if isinstance(rc, int) and rc:
        raise SystemExit(rc)


if __name__ == "__main__":
    main()
