"""`specdistill data ...`: the data command group.

`data stats` lives here. Other data commands live in their own modules and join the group
through a hook, so this file does not change when they land: a module listed in
`EXTENSIONS` that exists and defines `register_data_subcommand(subparsers)` gets called with the
`data` group's subparsers and adds its own parser (setting `func=`).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import sys
import time
from pathlib import Path

EXTENSIONS = ("specdistill.data.features", "specdistill.data.regenerate")


def load_tokenizer(name: str = "default"):
    """Only the target's tokenizer (no weights): `data stats` needs nothing else."""
    from transformers import AutoTokenizer

    from specdistill import targets
    from specdistill.config import TargetConfig

    path, kwargs = targets.resolve(TargetConfig(name=name))
    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def add_data_args(p: argparse.ArgumentParser) -> None:
    """The DataConfig options shared by data subcommands (features/regenerate may reuse them)."""
    from specdistill.config import DataConfig

    d = DataConfig()
    p.add_argument("source", nargs="?", default=d.source,
                   help="default (embedded ShareGPT), a .json/.jsonl file, or hf:<path or id>[#split]")
    p.add_argument("--target", default="default", help="target whose tokenizer and chat template are used")
    p.add_argument("--max-length", type=int, default=d.max_length, help="max tokens per sample")
    p.add_argument("--min-loss-tokens", type=int, default=d.min_loss_tokens,
                   help="skip samples with fewer assistant tokens")
    p.add_argument("--limit", type=int, default=d.limit, help="use at most N conversations (0 = all)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help="validation share")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the train/validation split")
    p.add_argument("--prepared-dir", default=d.prepared_dir, help="cache of prepared datasets")


def data_config(args):
    from specdistill.config import DataConfig

    return DataConfig(source=args.source, max_length=args.max_length, min_loss_tokens=args.min_loss_tokens,
                      limit=args.limit, val_fraction=args.val_fraction, seed=args.seed,
                      prepared_dir=args.prepared_dir)


def cmd_stats(args) -> int:
    from specdistill.data import build
    from specdistill.data.sources import SourceError
    from specdistill.data.stats import format_summary, save_json

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    t0 = time.time()
    tok = load_tokenizer(args.target)
    t_tok = time.time() - t0
    try:
        _, _, summary = build(data_config(args), tok, verbose=False)
    except SourceError as e:
        raise SystemExit(f"error: {e}") from None
    summary["seconds_total"] = round(time.time() - t0, 2)
    summary["seconds_tokenizer_load"] = round(t_tok, 2)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
        print(f"summary: {summary['prepared_dir']}/summary.json  (total {summary['seconds_total']:.1f}s "
              f"incl. tokenizer load {t_tok:.1f}s)")
    if args.out:
        save_json(summary, Path(args.out))
    return 0


def register(subparsers) -> None:
    """Add `data` with its sub-subcommands to the top-level `specdistill` parser."""
    p = subparsers.add_parser("data", help="prepare conversations and inspect them",
                              description="Conversation data: statistics, features, regeneration.")
    sub = p.add_subparsers(dest="data_command", metavar="{stats,...}")
    sub.required = True
    s = sub.add_parser("stats", help="kept/skipped counts by reason and token statistics of a source",
                       description="Prepare (or reuse the cached) tokenized dataset of a source and print its "
                                   "kept/skipped counts by reason and token statistics.")
    add_data_args(s)
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.add_argument("--out", default="", help="also write the summary JSON to this file")
    s.set_defaults(func=cmd_stats)
    for name in EXTENSIONS:
        if importlib.util.find_spec(name) is None:
            continue
        hook = getattr(importlib.import_module(name), "register_data_subcommand", None)
        if hook is not None:
            hook(sub)


def main(argv=None) -> int:
    """Standalone entry (`python -m specdistill.data.cli stats default`) until the main CLI wires `register`."""
    parser = argparse.ArgumentParser(prog="specdistill")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
