"""`specdistill eval`, question loading, drafter loading and metrics."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import make_llama, make_tokenizer

from specdistill import loading
from specdistill.data.questions import Question, default_path, load_questions
from specdistill.targets import TargetModel
from specdistill.verify import metrics
from specdistill.verify.evaluate import format_table, parse_tree, plot, run_eval
from specdistill.verify.proposer import DraftTree, Proposer
from specdistill.verify.proposers import DraftModelProposer, PromptLookupProposer
from specdistill.verify.verifier import GenerationResult, Verifier


def test_shipped_questions_are_spec_bench():
    qs = load_questions()
    assert default_path().exists() and len(qs.questions) == 480 and not qs.skipped
    assert len(qs.categories()) == 13
    two = load_questions(limit_per_category=2, categories=["writing", "math_reasoning"])
    assert [q.category for q in two.questions] == ["writing", "writing", "math_reasoning", "math_reasoning"]


def test_bad_question_lines_are_skipped_and_named(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text('{"question_id": 1, "category": "a", "turns": ["hi"]}\n'
                 "not json\n"
                 '{"question_id": 2, "category": "a", "turns": []}\n'
                 '{"category": "b", "turns": ["x"]}\n'
                 '\n'
                 '{"question_id": 3, "turns": ["two", "turns"]}\n')
    qs = load_questions(p)
    assert [q.question_id for q in qs.questions] == [1, 3]
    assert len(qs.skipped) == 3
    assert qs.skipped[0].startswith(f"{p}:2: invalid JSON")
    assert f"{p}:3:" in qs.skipped[1] and "turns" in qs.skipped[1]
    assert f"{p}:4:" in qs.skipped[2] and "question_id" in qs.skipped[2]


def test_alpha_and_tau_definitions():
    r1 = GenerationResult([1] * 7, 3, [4, 2, 1], [3, 1, 0], [4, 2, 1], [4, 4, 4])
    r2 = GenerationResult([1] * 2, 2, [1, 1], [0, 0], [1, 0], [2, 0])
    s = metrics.summarize([r1, r2])
    assert s["tau"] == 9 / 5
    # position 1 reached 4 times (offered >= 1), accepted twice; position 2: reached twice, accepted once
    assert s["alpha"] == [2 / 4, 1 / 2, 1 / 1, 0 / 1]
    assert s["draft_efficiency"] == 4 / 14


def test_pld_loader_and_tree_option(tiny_target):
    p = loading.load_proposer("pld", tiny_target, num_draft_tokens=3, tree=(2,))
    assert isinstance(p, PromptLookupProposer) and p.k == 3 and p.branches == 2
    assert parse_tree("3,2,1") == (3, 2, 1)
    with pytest.raises(ValueError, match="--tree"):
        parse_tree("3,a")


def test_truncated_draft_shares_target_weights():
    target = TargetModel(make_llama(layers=3), make_tokenizer(), name="tiny3")
    p = loading.load_proposer("truncated:1", target, num_draft_tokens=2)
    assert isinstance(p, DraftModelProposer)
    assert p.model.model.layers[0] is target.model.model.layers[0] and len(p.model.model.layers) == 1
    assert p.model.lm_head is target.model.lm_head
    with pytest.raises(ValueError, match="truncated:3"):
        loading.load_proposer("truncated:3", target)


def test_hf_dir_loader_checks_vocabulary(tmp_path, tiny_target):
    good, bad = tmp_path / "good", tmp_path / "bad"
    make_llama(seed=4).save_pretrained(good)
    make_tokenizer().save_pretrained(good)
    make_llama(vocab_size=96).save_pretrained(bad)
    assert isinstance(loading.load_proposer(str(good), tiny_target), DraftModelProposer)
    assert isinstance(loading.load_proposer(f"hf:{good}", tiny_target), DraftModelProposer)
    with pytest.raises(ValueError, match="vocabulary size 96"):
        loading.load_proposer(str(bad), tiny_target)


def test_registered_export_format_loader_wins(tmp_path, tiny_target):
    """A saved drafter is read by the loader of the export format that claims its directory (one
    registry, export/formats.py), then asked for its proposer with the verifier's options."""
    from specdistill.export import formats

    d = tmp_path / "export"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"specdistill": {"family": "toy"}}))

    class Toy(Proposer):
        def propose(self, state):
            return DraftTree.empty()

    class ToyDrafter:
        def eval(self):
            return self

        def to(self, device):
            return self

        def proposer(self, target, options):
            assert options.num_draft_tokens == 3
            return Toy()

    def is_toy(path):
        return (path / "config.json").exists() and "toy" in (path / "config.json").read_text()

    with pytest.raises(ValueError, match="not a drafter specdistill can load.*contents"):
        loading.load_proposer(str(d), tiny_target)
    formats.register(formats.ExportFormat("toyfmt", build=None, check=None, engine="test", claims=is_toy,
                                          load=lambda path, target: ToyDrafter()))
    try:
        assert isinstance(loading.load_proposer(str(d), tiny_target, num_draft_tokens=3), Toy)
    finally:
        formats.REGISTRY.pop("toyfmt")


def test_run_eval_multi_turn_on_tiny_target(tiny_target, tmp_path):
    qs = [Question(1, "writing", ["hello there", "and again"]), Question(2, "qa", ["what is it?"])]
    res = run_eval(tiny_target, PromptLookupProposer(3), qs, max_new_tokens=12, progress=False)
    assert res["overall"]["identical_to_greedy"] is True and res["overall"]["identical_questions"] == "2/2"
    assert set(res["categories"]) == {"writing", "qa"}
    assert len(res["questions"][0]["turns"]) == 2
    # the second turn's prompt holds the first answer, so it is longer than the first prompt
    t = res["questions"][0]["turns"]
    assert t[1]["prompt_tokens"] > t[0]["prompt_tokens"] + t[0]["new_tokens"] - 1
    assert res["overall"]["speedup"] > 0 and res["overall"]["baseline"]["tau"] == 1.0
    assert "overall" in format_table(res)
    plot(res, tmp_path / "eval.png")
    assert (tmp_path / "eval.png").stat().st_size > 1000


def test_lossy_proposer_is_caught(tiny_target):
    """identical_to_greedy must be able to fail: a verifier that accepts anything is detected."""

    class Liar(Verifier):
        def generate(self, prompt_ids, proposer=None, **kw):
            res = super().generate(prompt_ids, proposer, **kw)
            if proposer is not None and res.tokens:
                res.tokens[0] = (res.tokens[0] + 1) % 128
            return res

    import specdistill.verify.evaluate as ev

    orig = ev.Verifier
    ev.Verifier = Liar
    try:
        res = run_eval(tiny_target, PromptLookupProposer(3), [Question(1, "x", ["hi"])], max_new_tokens=4,
                       progress=False, warmup=False)
    finally:
        ev.Verifier = orig
    assert res["overall"]["identical_to_greedy"] is False


@pytest.mark.embedded
def test_eval_cli_pld_on_embedded_target(tmp_path, monkeypatch):
    from specdistill import cli

    monkeypatch.setattr(sys, "argv", ["specdistill", "eval"])
    out = tmp_path / "ev"
    threads = torch.get_num_threads()
    try:  # one thread: on a shared 2-core box two threads made decoding 10x slower
        rc = cli.main(["eval", "--drafter", "pld", "--limit-per-category", "1", "--categories",
                       "writing,translation", "--max-new-tokens", "16", "--out", str(out), "--no-progress",
                       "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert rc in (None, 0)
    res = json.loads((out / "eval.json").read_text())
    assert res["overall"]["identical_to_greedy"] is True
    assert set(res["categories"]) == {"writing", "translation"}
    assert res["settings"]["max_new_tokens"] == 16 and res["settings"]["drafter"] == "pld"
    assert all(t["new_tokens"] <= 16 for q in res["questions"] for t in q["turns"])
    assert res["overall"]["tau"] >= 1.0 and (out / "eval.png").exists()
    torch.testing.assert_close(res["overall"]["new_tokens"] / res["overall"]["target_passes"], res["overall"]["tau"])
