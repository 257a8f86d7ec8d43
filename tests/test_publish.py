"""`specdistill publish`: dry run, local repository, model card from eval.json, refusal, token hygiene."""

from __future__ import annotations

import json
import logging

import pytest
import yaml
from conftest import make_llama, make_tokenizer

from specdistill.cli import main
from specdistill.export import card, hub

FAKE_TOKEN = "hf_FAKEfakeFAKEfake0123456789abcdefXYZ"


def _fig(tau, alpha, tps, base_tps, speedup, n):
    """One block of figures in the shape `specdistill eval` writes (verify/evaluate.py, metrics.summarize)."""
    return {"generations": n, "new_tokens": 64 * n, "target_passes": int(64 * n / tau), "tau": tau, "alpha": alpha,
            "draft_tokens": 300, "draft_tokens_accepted": 120, "draft_efficiency": 0.4, "wall_time_s": 3.2,
            "draft_time_s": 0.5, "verify_time_s": 2.7, "tokens_per_s": tps,
            "baseline": {"generations": n, "new_tokens": 64 * n, "tau": 1.0, "tokens_per_s": base_tps},
            "speedup": speedup}


EVAL = {
    "overall": dict(_fig(2.7353, [0.7, 0.54, 0.4], 55.5, 33.8, 1.64, 4), identical_to_greedy=True,
                    identical_questions="4/4"),
    "categories": {
        "writing": dict(_fig(2.3456, [0.61, 0.42, 0.3], 47.2, 33.5, 1.41, 2), questions=2),
        "math_reasoning": dict(_fig(3.125, [0.8, 0.66, 0.5], 63.1, 33.7, 1.87, 2), questions=2),
    },
    "questions": [{"question_id": 1, "category": "writing", "turns": [], "identical_to_greedy": True}],
    "settings": {
        "target": "tiny-llama", "questions": "spec_bench", "limit_per_category": 2, "max_new_tokens": 64,
        "temperature": 0.0, "num_draft_tokens": 4, "torch_threads": 2,
        "command": "specdistill eval --drafter checkpoints/run/export/vllm --limit-per-category 2",
    },
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A training run with a real EAGLE-3 export in the vLLM and SGLang layouts."""
    import torch

    from specdistill import config, drafters, export
    from specdistill.targets import TargetModel

    run = tmp_path_factory.mktemp("run")
    cfg = config.load(None, ["drafter.name=eagle", "target.name=tiny-llama", "data.source=convs.jsonl",
                             "train.max_steps=7", "train.micro_batch_size=2", "train.grad_accum=2",
                             f"train.output_dir={run}"])
    config.dump(cfg, run / "config.yaml")
    (run / "step_7").mkdir()
    (run / "step_7" / "trainer_state.json").write_text(json.dumps(
        {"step": 7, "tokens_seen": 12345, "num_processes": 2}))
    (run / "latest").write_text("step_7")
    torch.manual_seed(0)
    target = TargetModel(make_llama(layers=8), make_tokenizer(), name="tiny-llama", license="mit")
    d = drafters.build(cfg.drafter, target)
    cfg.export.formats = ["vllm", "sglang"]
    out = export.write(d, cfg.export, run / "export", target)
    for f in out.values():
        (f / "eval.json").write_text(json.dumps(EVAL))
    return run


def test_dry_run_lists_exact_files_and_sizes(run_dir, capsys):
    exp = run_dir / "export" / "vllm"
    res = hub.publish(exp, repo_id="me/tiny-eagle3", dry_run=True)
    names = [n for n, _ in res["files"]]
    assert names == sorted(["README.md", "config.json", "eval.json", "model.safetensors",
                            "specdistill_export.json"])
    sizes = dict(res["files"])
    for n in names:
        if n != "README.md":
            assert sizes[n] == (exp / n).stat().st_size
    out = capsys.readouterr().out
    assert "me/tiny-eagle3" in out and f"{sizes['model.safetensors']:,d} B" in out
    assert not (exp / "README.md").exists()  # the export itself is untouched


def test_to_dir_writes_complete_repository_and_card(run_dir, tmp_path):
    exp = run_dir / "export" / "vllm"
    dest = tmp_path / "repo"
    main(["publish", str(exp), "--to", str(dest), "--repo-id", "me/tiny-eagle3"])
    assert sorted(p.name for p in dest.iterdir() if p.name != hub.MARKER) == sorted(
        ["README.md", "config.json", "eval.json", "model.safetensors", "specdistill_export.json"])
    assert (dest / hub.MARKER).is_file()  # what lets a later --force replace this directory
    assert (dest / "model.safetensors").read_bytes() == (exp / "model.safetensors").read_bytes()
    text = (dest / "README.md").read_text()
    fm = yaml.safe_load(text.split("---\n")[1])
    assert fm["license"] in ("mit", "other")  # "mit" once the export metadata carries target.license
    assert fm["base_model"] == "tiny-llama"
    assert "speculative-decoding" in fm["tags"] and "eagle3" in fm["tags"]
    # measured numbers and the exact command come from eval.json
    assert EVAL["settings"]["command"] in text
    head = "| category | questions | generations | new_tokens | tau | alpha | draft_efficiency | tokens_per_s " \
           "| baseline_tokens_per_s | speedup | identical_to_greedy | identical_questions |"
    assert head in text
    assert "| writing | 2 | 2 | 128 | 2.346 | 0.610, 0.420, 0.300 | 0.400 | 47.200 | 33.500 | 1.410 |  |  |" in text
    assert "| **overall** |  | 4 | 256 | 2.735 | 0.700, 0.540, 0.400 | 0.400 | 55.500 | 33.800 | 1.640 | true | 4/4 |" \
        in text
    assert "num_draft_tokens = 4" in text and "[{" not in text  # settings, not the per-question records
    # training facts from the run's config.yaml and latest trainer_state.json
    assert "`convs.jsonl`" in text and "| training steps | 7 |" in text and "12,345" in text
    assert "2 x 2 accumulation x 2 processes" in text
    # serving commands
    k = json.loads((exp / "config.json").read_text())["speculators_config"]["proposal_methods"][0]["speculative_tokens"]
    assert (f"vllm serve tiny-llama --speculative-config "
            f"'{{\"method\":\"eagle3\",\"model\":\"me/tiny-eagle3\",\"num_speculative_tokens\":{k}}}'") in text
    assert "### transformers" in text


def test_sglang_export_card_has_sglang_command(run_dir, tmp_path):
    text = card.build_card(run_dir / "export" / "sglang", "me/tiny-eagle3-sglang")
    assert "--speculative-algorithm EAGLE3" in text
    assert "--speculative-draft-model-path me/tiny-eagle3-sglang" in text


def test_missing_eval_is_refused_unless_forced(run_dir, tmp_path):
    import shutil

    exp = tmp_path / "noeval"
    shutil.copytree(run_dir / "export" / "vllm", exp)
    (exp / "eval.json").unlink()
    with pytest.raises(hub.PublishError, match="no eval.json"):
        hub.publish(exp, repo_id="me/x", dry_run=True)
    with pytest.raises(SystemExit, match="no eval.json"):
        main(["publish", str(exp), "--to", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()
    hub.publish(exp, to=tmp_path / "r", force=True)
    assert "Not evaluated" in (tmp_path / "r" / "README.md").read_text()


def test_to_refuses_nonempty_dir_and_bad_inputs(run_dir, tmp_path):
    exp = run_dir / "export" / "vllm"
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "keep.txt").write_text("x")
    with pytest.raises(hub.PublishError, match="not empty"):
        hub.publish(exp, to=dest)
    assert (dest / "keep.txt").exists()
    with pytest.raises(hub.PublishError, match="org/name"):
        hub.publish(exp, repo_id="not a repo", dry_run=True)
    with pytest.raises(hub.PublishError, match="not found"):
        hub.publish(tmp_path / "nope", repo_id="me/x", dry_run=True)
    with pytest.raises(hub.PublishError, match="inside"):
        hub.publish(exp, to=exp / "sub")


class FakeApi:
    calls: list = []
    tokens: list = []
    fail: str | None = None

    def __init__(self, token=None, **kw):
        FakeApi.tokens.append(token)

    def create_repo(self, **kw):
        FakeApi.calls.append(("create_repo", kw))

    def create_branch(self, **kw):
        FakeApi.calls.append(("create_branch", kw))

    def upload_folder(self, **kw):
        from pathlib import Path

        files = sorted(p.name for p in Path(kw["folder_path"]).iterdir())
        FakeApi.calls.append(("upload_folder", dict(kw, files=files)))
        if FakeApi.fail:
            raise RuntimeError(FakeApi.fail)

        class Info:
            commit_url = f"https://hub.example/{kw['repo_id']}/commit/abc123"
        return Info()


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeApi.calls, FakeApi.tokens, FakeApi.fail = [], [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    return FakeApi


def test_upload_uses_token_and_never_prints_it(run_dir, fake_hub, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    exp = run_dir / "export" / "vllm"
    main(["-v", "publish", str(exp), "--repo-id", "me/tiny-eagle3", "--private", "--revision", "v1"])
    assert fake_hub.tokens == [FAKE_TOKEN]
    kinds = [c[0] for c in fake_hub.calls]
    assert kinds == ["create_repo", "create_branch", "upload_folder"]
    assert fake_hub.calls[0][1]["private"] is True and fake_hub.calls[0][1]["repo_id"] == "me/tiny-eagle3"
    up = fake_hub.calls[2][1]
    assert up["revision"] == "v1"
    assert up["files"] == sorted(["README.md", "config.json", "eval.json", "model.safetensors",
                                  "specdistill_export.json"])
    out = capsys.readouterr()
    assert "commit/abc123" in out.out
    for text in (out.out, out.err, caplog.text):
        assert FAKE_TOKEN not in text


def test_hub_error_is_scrubbed_of_token(run_dir, fake_hub, capsys, caplog):
    fake_hub.fail = f"401 Unauthorized for token {FAKE_TOKEN}"
    with pytest.raises(SystemExit) as e:
        main(["publish", str(run_dir / "export" / "vllm"), "--repo-id", "me/x"])
    msg = str(e.value)
    assert "401 Unauthorized" in msg and FAKE_TOKEN not in msg
    out = capsys.readouterr()
    assert FAKE_TOKEN not in out.out + out.err + caplog.text


def test_no_token_is_a_clear_error(run_dir, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(hub, "get_token", lambda: None)
    with pytest.raises(hub.PublishError, match="HF_TOKEN"):
        hub.publish(run_dir / "export" / "vllm", repo_id="me/x")


def test_card_tolerates_other_eval_shapes(tmp_path):
    exp = tmp_path / "e"
    exp.mkdir()
    (exp / "config.json").write_text("{}")
    (exp / "model.safetensors").write_bytes(b"\0")
    (exp / "specdistill_export.json").write_text(json.dumps(
        {"format": "native", "family": "eagle", "variant": "eagle1", "target": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    ev = {"argv": ["specdistill", "eval", "x y"], "categories": [{"category": "qa", "tau": 1.5}], "tau": 1.5}
    (exp / "eval.json").write_text(json.dumps(ev))
    text = card.build_card(exp, "me/d")
    assert "specdistill eval 'x y'" in text
    assert "| qa | 1.500 |" in text and "| **overall** | 1.500 |" in text
    fm = yaml.safe_load(text.split("---\n")[1])
    assert fm["license"] == "apache-2.0"  # the embedded default target's license
    assert "eagle1" in fm["tags"]
    assert "specdistill export" in text  # native layout: points to the engine exports


@pytest.fixture
def own_run(run_dir, tmp_path):
    """A private copy of the run (these tests try to damage it)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, symlinks=True)
    return run


def _snapshot(root):
    return sorted((p.relative_to(root).as_posix(), p.stat().st_size) for p in root.rglob("*"))


def test_force_never_replaces_a_parent_sibling_or_foreign_dir(own_run, tmp_path):
    exp = own_run / "export" / "vllm"
    before = _snapshot(own_run)
    home = tmp_path / "home"  # `--to ~ --force`
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id").write_text("key")
    for dest, match in [(own_run / "export", "contains the export"), (own_run, "contains the export"),
                        (own_run / "export" / "sglang", "not a repository"), (home, "not a repository"),
                        (own_run / "step_7", "not a repository")]:
        with pytest.raises(SystemExit, match=match):
            main(["publish", str(exp), "--to", str(dest), "--force"])
    assert _snapshot(own_run) == before and (home / ".ssh" / "id").read_text() == "key"


def test_force_replaces_only_an_unchanged_earlier_publish(own_run, tmp_path):
    exp = own_run / "export" / "vllm"
    dest = tmp_path / "repo"
    hub.publish(exp, to=dest)
    with pytest.raises(hub.PublishError, match="--force"):
        hub.publish(exp, to=dest)
    hub.publish(exp, to=dest, force=True)
    (dest / "mine.txt").write_text("x")
    with pytest.raises(hub.PublishError, match="mine.txt"):
        hub.publish(exp, to=dest, force=True)
    assert (dest / "mine.txt").read_text() == "x"


def test_symlinks_never_leave_the_export(own_run, tmp_path):
    exp = own_run / "export" / "vllm"
    secret = tmp_path / "secret.txt"
    secret.write_text("do not upload")
    (exp / "notes.txt").write_text("inside")
    (exp / "notes_link.txt").symlink_to(exp / "notes.txt")
    res = hub.publish(exp, repo_id="me/x", dry_run=True)
    assert "notes_link.txt" in dict(res["files"])  # a link inside the export ships as a copy of its file
    hub.publish(exp, to=tmp_path / "ok")
    assert not (tmp_path / "ok" / "notes_link.txt").is_symlink()
    assert (tmp_path / "ok" / "notes_link.txt").read_text() == "inside"
    (exp / "leak.txt").symlink_to(secret)
    with pytest.raises(hub.PublishError, match="leak.txt: symlink to a file outside the export"):
        hub.publish(exp, to=tmp_path / "r")
    assert not (tmp_path / "r").exists()
    (exp / "leak.txt").unlink()
    (exp / "sub").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(hub.PublishError, match="sub: symlink to a directory outside"):
        hub.publish(exp, repo_id="me/x", dry_run=True)


def test_to_an_existing_file_is_a_clear_error(run_dir, tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(SystemExit, match="not a directory"):
        main(["publish", str(run_dir / "export" / "vllm"), "--to", str(f), "--force"])
    assert f.read_text() == "x"
