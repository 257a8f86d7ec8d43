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


# ------------------------------------------------------------------ the import graph and the protocol

# Floors of the package: a module may import its own area and anything on a lower floor, never a
# higher one (STYLE.md "clean graph"). Command modules (`*.cli`, the `publish` command) sit on top.
FLOORS = {"errors": 0, "fsutil": 0, "locks": 0, "resources": 0, "config": 1, "adapters": 1, "cpu_kernels": 1,
          "targets": 2,
          "losses": 2, "data": 3, "verify": 4, "drafters": 5, "export": 6, "train": 6, "loading": 7,
          "scoring": 7, "pipeline": 7, "plan": 7, "online": 8, "cli": 9}
MODULE_FLOORS = {"specdistill.export.hub": 7, "specdistill.export.cli": 9, "specdistill.data.cli": 9,
                 # regeneration decodes with the target through the verifier's sampling: above verify/
                 "specdistill.data.regenerate": 5}
# The one allowed upward arrow: config parses the `drafter:` block with the registered family's
# dataclass, so it looks the registry up at call time (drafters never import config).
ALLOWED_UP = {("specdistill.config", "specdistill.drafters")}


def _module_name(p: Path) -> str:
    parts = p.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph(deferred_within_area: bool = True) -> dict[str, set[str]]:
    """specdistill module -> the specdistill modules it imports anywhere in its body (function-level
    imports included; `if TYPE_CHECKING:` blocks excluded, they never run). With
    deferred_within_area=False a function-level import of a module of the same area (e.g.
    data/sources.py dispatching `logs:` to data/querylogs.py at call time) is not an edge: it cannot
    form an import-time circle, and areas stay acyclic with every import counted."""
    import ast

    files = {_module_name(p): p for p in PKG.rglob("*.py") if "recipes" not in p.relative_to(PKG).parts}

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, p in files.items():
        tree = ast.parse(p.read_text())
        skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test)
                for child in node.body for n in ast.walk(child)}
        top_level = {id(n) for n in tree.body}
        deferred = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                    for n in ast.walk(f)} - top_level
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            for n in names:
                t = resolve(n) if n.startswith("specdistill") else None
                if t and t != mod and not mod.startswith(t + "."):  # a package's own __init__ is not an edge
                    if not deferred_within_area and id(node) in deferred and t.split(".")[:2] == mod.split(".")[:2]:
                        continue
                    graph[mod].add(t)
    return graph


def test_import_graph_has_no_cycle():
    graph = _import_graph(deferred_within_area=False)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_module_imports_a_higher_floor():
    def floor(m):
        if m in MODULE_FLOORS:
            return MODULE_FLOORS[m]
        parts = m.split(".")
        return FLOORS.get(parts[1], 99) if len(parts) > 1 else 99

    bad = [f"{m} (floor {floor(m)}) imports {t} (floor {floor(t)})" for m, ts in _import_graph().items()
           for t in ts if floor(t) > floor(m) and floor(m) != 99 and (m, t) not in ALLOWED_UP
           and m.split(".")[:2] != t.split(".")[:2]]
    assert not bad, "upward imports:\n" + "\n".join(sorted(bad))


# Attributes that only some family has: shared code reaches them through the Drafter protocol
# (export_info(), fit(), variant, ...) instead (drafters/base.py).
FAMILY_ATTRS = {"layer_ids", "set_vocab_map", "draft_vocab_size", "llama_config", "unroll_steps", "draft_ids",
                "midlayer", "head_rows", "vocab_map_ready", "d2t", "t2d", "proposer_from_options", "ttt_steps",
                "num_heads", "hass_topk", "keep_layers"}
SHARED = [PKG / "train", PKG / "verify", PKG / "export", PKG / "data", PKG / "pipeline.py", PKG / "plan.py",
          PKG / "loading.py", PKG / "scoring.py"]


def test_shared_code_never_probes_a_drafter():
    """No getattr/hasattr on a drafter or its config and no family-only attribute in shared code; a
    module-level helper of the same name (e.g. `common.layer_ids(...)`) is not an attribute of a drafter."""
    import io
    import tokenize

    offenders = []
    files = [p for d in SHARED for p in ([d] if d.suffix == ".py" else d.rglob("*.py"))]
    for p in files:
        toks = [t for t in tokenize.generate_tokens(io.StringIO(p.read_text()).readline)
                if t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)]
        for i, t in enumerate(toks[:-2]):
            where = f"{p.relative_to(ROOT)}:{t.start[0]}"
            if t.string in ("getattr", "hasattr") and toks[i + 1].string == "(" and \
                    toks[i + 2].string in ("drafter", "d", "dcfg", "src") and toks[i + 3].string in (",", "."):
                offenders.append(f"{where}: {t.string}({toks[i + 2].string}...")
            if t.string == "." and toks[i + 1].type == tokenize.NAME and toks[i + 1].string in FAMILY_ATTRS \
                    and toks[i - 1].string not in ("common", "vocab", "eagle1", "self"):
                offenders.append(f"{where}: .{toks[i + 1].string}")
            if t.string == "cfg" and toks[i + 1].string == "." and toks[i + 2].string == "variant":
                offenders.append(f"{where}: cfg.variant (use drafter.variant)")
    assert not offenders, "shared code probes drafters (use the protocol, drafters/base.py):\n" + "\n".join(offenders)
