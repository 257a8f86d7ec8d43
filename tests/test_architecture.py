"""Keeps the layout honest (STYLE.md section 1): one loop, thin recipes, registry in sync."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "specdistill"
RECIPES = ROOT / "recipes"

LOOP_CALLS = re.compile(r"\.backward\(|optimizer\.step\(|\bopt\.step\(|zero_grad\(")


def _py_files(*dirs):
    for d in dirs:
        yield from (p for p in d.rglob("*.py") if ".venv" not in p.parts)


def test_no_training_loop_outside_train_package():
    offenders = []
    for p in _py_files(PKG, RECIPES):
        if (PKG / "train") in p.parents:
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if LOOP_CALLS.search(line.split("#")[0]):
                offenders.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "backward/optimizer steps belong in specdistill/train/:\n" + "\n".join(offenders)


def test_recipes_stay_short():
    for p in RECIPES.glob("*.py"):
        n = len(p.read_text().splitlines())
        assert n <= 100, f"{p.name} has {n} lines; move logic into the library (budget 100)"


def test_trainer_stays_readable():
    n = len((PKG / "train" / "trainer.py").read_text().splitlines())
    assert n <= 400, f"train/trainer.py has {n} lines (budget 400): split it"


def test_registry_in_sync_with_recipes_tests_docs():
    # A fresh interpreter, so test-only drafters registered by other tests do not count.
    names = subprocess.run(
        [sys.executable, "-c", "from specdistill import drafters; print(' '.join(sorted(drafters.REGISTRY)))"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout.split()
    papers = (ROOT / "docs" / "papers.md").read_text() if (ROOT / "docs" / "papers.md").exists() else ""
    for name in names:
        yamls = [p for p in (RECIPES / "configs").glob("*.yaml") if re.search(rf"name:\s*{name}\b", p.read_text())]
        assert yamls, f"drafter {name!r} has no recipe YAML selecting it"
        assert any((RECIPES / f"{y.stem}.py").exists() for y in yamls), f"drafter {name!r} has no recipe .py"
        assert list((ROOT / "tests").rglob(f"test_{name}*.py")), f"drafter {name!r} has no tests/.../test_{name}.py"
        assert re.search(rf"^#+ .*{name}", papers, re.I | re.M), f"drafter {name!r} has no docs/papers.md section"


def test_no_absolute_paths_in_configs():
    for p in (RECIPES / "configs").glob("*.yaml"):
        for i, line in enumerate(p.read_text().splitlines(), 1):
            body = line.split("#")[0]
            assert not re.search(r":\s*['\"]?(/|~|[A-Za-z]:\\)", body), f"{p.name}:{i}: absolute path in a config"


def test_no_debug_leftovers():
    bad = [p for p in PKG.rglob("*") if p.is_dir() and p.name.lower() in {"debug", "tmp", "testbug", "old"}]
    assert not bad, bad
    for p in _py_files(PKG):
        assert not re.search(r"^\s*breakpoint\(\)|pdb\.set_trace", p.read_text(), re.M), p


def test_safe_loading_only():
    for p in _py_files(PKG, RECIPES):
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{p.relative_to(ROOT)}:{i}: torch.load without weights_only=True"
            assert "trust_remote_code=True" not in line, f"{p.relative_to(ROOT)}:{i}: trust_remote_code forced on"
