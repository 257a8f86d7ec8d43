"""The export-format registry: each format module registers its writer, its engine contract check and
the engine that reads it once, at import (export/__init__.py imports them explicitly). Adding a format
is one module; `export.write`, the loaders and the model card read this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ExportFormat:
    name: str
    """Folder name under the export root and the value of `export.formats`."""
    build: Callable
    """build(drafter, target, dtype) -> (config dict, tensors): nothing is written yet."""
    check: Callable
    """check(config, tensors, num_target_layers): raise ContractError where the engine would misread it."""
    engine: str
    """Who reads it (for messages and the model card)."""
    engine_gap: Callable | None = None
    """engine_gap(drafter) -> why this format cannot express the instance, or None."""
    claims: Callable[[Path], bool] | None = None
    """claims(path) -> True when `path` is a directory of this format that `load` reads back."""
    load: Callable | None = None
    """load(path, target) -> drafter, rebuilding exactly what the files hold (refusing what it cannot)."""
    card_serving: Callable | None = None
    """card_serving(card_inputs, repo) -> markdown lines: how engines serve this format (export/card.py)."""
    files: Callable | None = None
    """files(drafter, target, out_dir, dtype) -> {name: writer(path)}: files beyond config.json/model.safetensors
    (e.g. tokenizer files, generation_config.json); may raise ContractError before anything is written."""


REGISTRY: dict[str, ExportFormat] = {}


def register(fmt: ExportFormat) -> ExportFormat:
    if fmt.name in REGISTRY:
        raise ValueError(f"export format {fmt.name!r} is registered twice")
    REGISTRY[fmt.name] = fmt
    return fmt


def get(name: str) -> ExportFormat:
    if name not in REGISTRY:
        raise ValueError(f"export.formats: unknown format {name!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[name]


def claiming(path: Path) -> ExportFormat | None:
    """The registered format whose loader reads the directory `path`, or None."""
    for fmt in REGISTRY.values():
        if fmt.claims is not None and fmt.claims(path):
            return fmt
    return None
