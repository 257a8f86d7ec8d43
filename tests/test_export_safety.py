"""Export directories survive re-exports, crashes and other users: eval.json kept, old copy restored,
stale staging folders cleaned, umask modes, atomic eval.json; load errors are one line naming the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_llama, make_tokenizer
from safetensors.torch import load_file

from specdistill import fsutil
from specdistill.export import common, hub


def _write(out, w: float = 1.0):
    return common.write_export(out, {"architectures": ["X"]}, {"w": torch.full((4,), w)}, {"format": "native"})


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_reexport_keeps_eval_json_and_marks_it_stale_when_weights_change(tmp_path):
    out = tmp_path / "native"
    _write(out)
    (out / "eval.json").write_text('{"overall": {"tau": 2.0}}')
    (out / "eval.png").write_bytes(b"png")
    (out / "NOTES.md").write_text("mine")
    _write(out)  # same weights: the measurement still holds
    assert (out / "eval.json").read_text() == '{"overall": {"tau": 2.0}}'
    assert (out / "eval.png").read_bytes() == b"png" and (out / "NOTES.md").read_text() == "mine"
    assert not common.eval_is_stale(out)
    _write(out, w=2.0)  # new weights: kept, but publish must not present it as theirs
    assert load_file(str(out / "model.safetensors"))["w"][0] == 2.0
    assert (out / "eval.json").exists() and common.eval_is_stale(out)
    with pytest.raises(hub.PublishError, match="re-exported"):
        hub.check_export(out, force=False)
    hub.check_export(out, force=True)
    (out / "eval.json").write_text('{"overall": {"tau": 2.5}}')  # `specdistill eval` measured the new weights
    assert not common.eval_is_stale(out)
    hub.check_export(out, force=False)


def test_second_rename_failing_restores_the_old_export(tmp_path, monkeypatch):
    out = tmp_path / "native"
    _write(out)
    (out / "eval.json").write_text("{}")
    real, calls = os.replace, []

    def flaky(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError(5, "Input/output error (simulated)", str(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError, match="simulated"):
        _write(out, w=3.0)
    monkeypatch.setattr(os, "replace", real)
    assert load_file(str(out / "model.safetensors"))["w"][0] == 1.0 and (out / "eval.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["native"]  # no .tmp/.old folder left


def test_stale_staging_folders_are_cleaned_and_a_lost_export_restored(tmp_path):
    out = tmp_path / "native"
    _write(out)
    pid = _dead_pid()
    for kind in ("tmp", "old"):
        junk = tmp_path / f".native.{kind}{pid}"
        junk.mkdir()
        (junk / "model.safetensors").write_bytes(b"\0" * 1000)
    _write(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["native"]
    # a crash between the two renames: only `.native.old<pid>` holds the export
    (out / "eval.json").write_text("{}")
    os.replace(out, tmp_path / f".native.old{pid}")
    (tmp_path / f".native.tmp{pid}").mkdir()
    _write(out, w=4.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["native"]
    assert (out / "eval.json").exists() and common.eval_is_stale(out)  # restored first, then carried over


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_exported_weights_are_readable_per_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        out = _write(tmp_path / "native")
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json", "specdistill_export.json"):
        assert (out / name).stat().st_mode & 0o777 == mode, name


def _tiny_target():
    from specdistill.targets import TargetModel

    return TargetModel(make_llama(layers=4), make_tokenizer(), name="tiny-llama-4")


def _half_writes(monkeypatch, path_names):
    """A disk that fills up half-way through writing any file (Path.write_text or os.fdopen)."""
    import pathlib

    class Half:
        def __init__(self, f, name):
            self.f, self.name = f, name

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(28, "No space left on device", self.name)

        def __getattr__(self, k):
            return getattr(self.f, k)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    real_open, real_fdopen = pathlib.Path.open, os.fdopen

    def path_open(self, mode="r", *a, **k):
        f = real_open(self, mode, *a, **k)
        return Half(f, str(self)) if "w" in mode and self.name in path_names else f

    def fdopen(fd, mode="r", *a, **k):
        f = real_fdopen(fd, mode, *a, **k)
        return Half(f, f"fd {fd}") if "w" in mode else f

    monkeypatch.setattr(pathlib.Path, "open", path_open)
    monkeypatch.setattr(os, "fdopen", fdopen)


def test_eval_json_is_written_atomically(tmp_path, monkeypatch):
    from specdistill import cli, targets

    target = _tiny_target()
    monkeypatch.setattr(targets, "load", lambda *a, **k: target)
    monkeypatch.setattr(sys, "argv", ["specdistill", "eval"])
    out = tmp_path / "ev"
    argv = ["eval", "--drafter", "pld", "--limit", "1", "--max-new-tokens", "4", "--no-baseline",
            "--no-progress", "--threads", "1", "--out", str(out)]
    threads = torch.get_num_threads()
    try:
        cli.main(argv)
        before = {n: (out / n).read_bytes() for n in ("eval.json", "eval.png")}
        json.loads(before["eval.json"])
        _half_writes(monkeypatch, {"eval.json", "eval.png"})
        with pytest.raises((OSError, SystemExit)):
            cli.main(argv)
    finally:
        torch.set_num_threads(threads)
    assert {n: (out / n).read_bytes() for n in ("eval.json", "eval.png")} == before
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "eval.png"]  # no temp file left


@pytest.fixture
def native_export(tmp_path, monkeypatch):
    from specdistill import drafters, targets
    from specdistill import export as ex
    from specdistill.config import ExportConfig
    from specdistill.drafters.eagle import EagleConfig

    target = _tiny_target()
    monkeypatch.setattr(targets, "load", lambda *a, **k: target)
    d = drafters.build(EagleConfig(layer_ids=[1, 2, 3], draft_vocab_size=0), target)
    return ex.write(d, ExportConfig(formats=["native"], dtype="float32"), tmp_path / "export", target)["native"]


def _one_line_error(capsys, argv) -> str:
    from specdistill import cli

    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    err = [ln for ln in err if not ln.startswith(("INFO", "WARNING"))]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_corrupt_weights_are_one_line_naming_the_file(native_export, tmp_path, capsys, monkeypatch):
    weights = native_export / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    line = _one_line_error(capsys, ["export", str(native_export), "--formats", "sglang", "--out", str(tmp_path / "o")])
    assert line.startswith(f"specdistill export: {weights}: ") and "safetensors" in line
    monkeypatch.setattr(sys, "argv", ["specdistill", "eval"])
    line = _one_line_error(capsys, ["eval", "--drafter", str(native_export), "--limit", "1", "--no-progress"])
    assert line.startswith(f"specdistill eval: {weights}: ")


def test_corrupt_json_is_one_line_naming_the_file(native_export, tmp_path, capsys):
    meta = native_export / "specdistill_export.json"
    meta.write_text('{"format": "nat')
    (native_export / "eval.json").write_text("{}")
    line = _one_line_error(capsys, ["publish", str(native_export), "--to", str(tmp_path / "r")])
    assert line.startswith(f"specdistill publish: {meta}: ") and "JSON" in line


def test_weights_only_refusal_never_advises_disabling_it(tmp_path):
    import argparse

    f = tmp_path / "optimizer.pt"
    torch.save({"x": argparse.Namespace(a=1)}, f)  # an object a weights_only load refuses
    with pytest.raises(Exception) as e:
        torch.load(f, weights_only=True)
    assert "weights_only" in str(e.value)
    line = fsutil.describe_load_error(e.value, tmp_path)
    assert line.startswith(f"{f}: ") and "\n" not in line
    reason = line[len(f"{f}: "):]
    assert "weights_only" not in reason and "argparse.Namespace" in reason and "allowlist" not in reason


def test_tools_replace_only_directories_they_made(tmp_path):
    """Benchmarks given an output directory (osd_simulation --out, gpu_reference --work / prepare --force)
    rebuild only a directory they made themselves, never a user's directory or its parent."""
    from specdistill.fsutil import fresh_owned_dir

    user = tmp_path / "home"
    user.mkdir()
    (user / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not made by this tool"):
        fresh_owned_dir(user, ".marker")
    assert (user / "precious.txt").read_text() == "keep"
    own = fresh_owned_dir(tmp_path / "run", ".marker")
    (own / "old_output").write_text("x")
    fresh_owned_dir(own, ".marker")
    assert sorted(p.name for p in own.iterdir()) == [".marker"]
    (tmp_path / "afile").write_text("f")
    with pytest.raises(FileExistsError, match="not a directory"):
        fresh_owned_dir(tmp_path / "afile", ".marker")
