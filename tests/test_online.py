"""Online distillation (`specdistill retrain`): logs, ledger, replay buffer, gate, crash safety, lock."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from conftest import write_tiny_run_inputs

from specdistill.data.stats import SkipCounter
from specdistill.locks import DirLock, LockHeldError
from specdistill.online import gate, retrain
from specdistill.online.ledger import Ledger
from specdistill.online.replay import Entry, ReplayBuffer, split_holdout


def _line(i: int, shape: str = "text") -> str:
    if shape == "openai":
        rec = {"id": f"q{i}", "messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                                           {"role": "assistant", "content": f"{2 * i}"}], "acceptance": 2.5}
    elif shape == "request":
        rec = {"request": {"messages": [{"role": "user", "content": f"what is {i} times 2?"}]},
               "response": {"choices": [{"message": {"content": f"{2 * i}"}}]}}
    else:
        rec = {"prompt": f"what is {i} plus {i}?", "t": i}
    return json.dumps(rec) + "\n"


def _write(path: Path, text: str | bytes, mode: str = "a") -> None:
    with open(path, mode + ("b" if isinstance(text, bytes) else "")) as f:
        f.write(text)


def _tree_hash(d: Path) -> dict:
    d = d.resolve()
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


# ------------------------------------------------------------------ logs + ledger (no model)


def test_logs_malformed_counted_partial_line_left_for_next_run(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    f = logs / "q.jsonl"
    _write(f, _line(0) + _line(1, "openai") + _line(2, "request") + "{not json\n" + '["a list"]\n'
           + json.dumps({"messages": [{"role": "wizard", "content": "x"}]}) + "\n")
    _write(f, b'{"prompt": "caf\xe9"}\n')
    _write(f, json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                                       {"role": "assistant", "content": "b"}]}) + "\n")
    _write(f, '{"prompt": "half writ')  # a writer is still appending this line
    c = SkipCounter()
    recs, led, _ = Ledger().scan(logs, c)
    assert [r.where for r in recs] == [f"{f.resolve()}:{i}" for i in (1, 2, 3)]
    assert recs[1].response == "2" and recs[1].acceptance == 2.5 and recs[2].response == "4"
    assert recs[0].prompt == [{"role": "user", "content": "what is 0 plus 0?"}] and recs[0].response is None
    assert c.to_dict()["skipped_by_reason"] == {"bad_shape": 2, "invalid_json": 1, "invalid_utf8": 1,
                                                "unknown_role": 1}
    assert any(f"{f.resolve()}:4: skipped (invalid_json)" in m for m in c.examples)
    assert c.notes["partial_last_line"] == 1
    _write(f, 'ten"}\n' + _line(9))  # the line is finished, one more comes
    c2 = SkipCounter()
    recs2, led2, ev = led.scan(logs, c2)
    assert [r.prompt[-1]["content"] for r in recs2] == ["half written", "what is 9 plus 9?"]
    assert recs2[0].where.endswith(":9") and ev["continued"] == [str(f.resolve())]
    assert led2.scan(logs, SkipCounter())[0] == []  # nothing new: nothing consumed twice


def test_ledger_appends_rotation_and_rewrite(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    f = logs / "q.jsonl"
    _write(f, "".join(_line(i) for i in range(3)))
    recs, led, _ = Ledger().scan(logs, SkipCounter())
    assert len(recs) == 3
    _write(f, _line(3))
    os.rename(f, logs / "q.jsonl.1")  # logrotate: the old file moves, a new one starts
    _write(f, _line(4) + _line(5))
    recs, led, ev = led.scan(logs, SkipCounter())
    assert sorted(r.prompt[0]["content"] for r in recs) == [f"what is {i} plus {i}?" for i in (3, 4, 5)]
    assert len(ev["rotated"]) == 1 and ev["replaced"] == [str(f.resolve())]
    # rewritten in place: same inode, other bytes before the offset -> read again, seen records dropped
    with open(f, "r+") as h:
        h.write(_line(5) + _line(4) + _line(6))
        h.truncate()
    recs, led, ev = led.scan(logs, SkipCounter())
    assert ev["rewritten"] == [str(f.resolve())] and ev["duplicates"] == 2
    assert [r.prompt[0]["content"] for r in recs] == ["what is 6 plus 6?"]


def test_replay_buffer_bounded_recent_and_reservoir():
    buf = ReplayBuffer(max_tokens=100, recent_fraction=0.5, seed=0)
    for i in range(60):
        buf.add([Entry(f"k{i}", [{"role": "user", "content": "x"}], tokens=10)])
        assert buf.tokens() <= 100
    assert [e.key for e in buf.recent] == [f"k{i}" for i in range(55, 60)]
    assert len(buf.reservoir) == 5 and all(int(e.key[1:]) < 55 for e in buf.reservoir)
    again = ReplayBuffer.from_dict(json.loads(json.dumps(buf.to_dict())), 100, 0.5, 0)
    assert [e.key for e in again.entries()] == [e.key for e in buf.entries()]
    assert len({e.key for e in buf.reservoir}) == 5  # a uniform sample of the 55 evicted, deterministic
    train, held = split_holdout([Entry(f"h{i}", []) for i in range(10)], [], 0.0, 3, 2, 0)
    assert len(train) == 7 and [e.key for e in held] == ["h8", "h7"]


# ------------------------------------------------------------------ gate (faked scores)


def _ev(tau, ident=True):
    return {"overall": {"tau": tau, "speedup": 1.0, "identical_to_greedy": ident}}


def test_gate_decides_promotes_atomically_and_rolls_back(tmp_path):
    assert gate.decide(_ev(1.5), _ev(1.4), 0.02)[0] is False  # worse: kept
    assert gate.decide(_ev(1.5), _ev(1.51), 0.02)[0] is False  # below the margin
    assert gate.decide(_ev(1.5), _ev(2.0, ident=False), 0.02)[0] is False  # lossy
    assert gate.decide(_ev(1.5), _ev(1.6), 0.02)[0] is True
    state = tmp_path / "state"
    serving = tmp_path / "serving"  # a real directory: the first promotion swaps it atomically
    serving.mkdir()
    (serving / "model.safetensors").write_bytes(os.urandom(256))
    before = _tree_hash(serving)
    chall = tmp_path / "chall"
    chall.mkdir()
    (chall / "model.safetensors").write_bytes(os.urandom(256))
    dest = gate.promote(serving, state, chall, "r1", _ev(1.6))
    assert serving.is_symlink() and serving.resolve() == dest.resolve()
    assert json.loads((serving / "eval.json").read_text())["overall"]["tau"] == 1.6
    hist = gate.load_history(state)
    assert [r["id"] for r in hist["releases"]] == ["initial", "r1"] and Path(hist["releases"][0]["path"]).is_dir()
    gate.rollback(serving, state)
    assert _tree_hash(serving) == before  # bit-identical previous drafter
    with pytest.raises(ValueError, match="nothing older"):
        gate.rollback(serving, state)


# ------------------------------------------------------------------ real runs on a tiny target


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny target and a 1-step EAGLE-3 export serving it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specdistill import config, export, pipeline

    root = tmp_path_factory.mktemp("online")
    target_dir, convs, _ = write_tiny_run_inputs(root)
    # the random tiny target answers only blanks; shrink the blank tokens' (tied) rows so greedy answers are text
    model, tok = AutoModelForCausalLM.from_pretrained(target_dir), AutoTokenizer.from_pretrained(target_dir)
    with torch.no_grad():
        for t in (" ", "\n"):
            model.get_input_embeddings().weight[tok.convert_tokens_to_ids(t)] *= 0.01
    model.save_pretrained(target_dir)
    cfg = config.load("eagle", [f"target.name={target_dir}", f"data.source={convs}", f"data.prepared_dir={root}/p",
                                "data.max_length=64", "data.min_loss_tokens=2", "drafter.layer_ids=[1,2,3]",
                                "drafter.draft_vocab_size=48", f"train.output_dir={root}/serve_run",
                                "train.max_steps=1", "train.trackers=[none]", "train.progress=false",
                                "train.mixed_precision=no", "train.save_every=0", "train.eval_every=0"])
    run = pipeline.train_drafter(cfg)
    native = export.write(run.drafter, cfg.export, root / "serve_export", run.target)["native"]
    return {"root": root, "target": target_dir, "native": native}


def _setup(world, tmp_path, n=8):
    import shutil

    serving = tmp_path / "serving"
    shutil.copytree(world["native"], serving)
    logs = tmp_path / "logs"
    logs.mkdir()
    _write(logs / "q.jsonl", "".join(_line(i) for i in range(n)))
    return serving, logs


def _argv(world, serving, logs, *extra):
    return [f"online.logs={logs}", f"online.serving={serving}", f"target.name={world['target']}",
            "data.max_length=64", "data.min_loss_tokens=1", "train.max_steps=2", "train.micro_batch_size=2",
            "train.mixed_precision=no", "eval.max_new_tokens=6", "online.max_new_tokens=6",
            "online.min_new_records=3", "online.holdout_min=2", "online.holdout_size=2", "online.holdout_fraction=0",
            *extra]


def _run(world, serving, logs, *extra):
    cfg, ocfg = retrain.load(_argv(world, serving, logs, *extra))
    return retrain.run(cfg, ocfg)


def test_retrain_end_to_end_trains_once_gates_and_appends(world, tmp_path):
    serving, logs = _setup(world, tmp_path)
    pub = tmp_path / "published"
    r1 = _run(world, serving, logs, "online.min_tau_gain=-100", f"online.publish_to={pub}",  # any lossless one passes
              f"online.guard_questions={world['root'] / 'q.jsonl'}", "online.max_guard_drop=100")
    assert r1["decision"] == "promoted", r1
    assert r1["scores"]["guard"]["challenger"]["identical_to_greedy"] is True  # the guard set was scored too
    assert r1["publish"]["to"] == str(pub) and (pub / "README.md").exists() and (pub / "eval.json").exists()
    assert r1["ingest"]["new_records"] == 8 and r1["ingest"]["held_out"] == 2 and r1["train"]["steps"] == 2
    assert r1["scores"]["challenger"]["identical_to_greedy"] is True and r1["scores"]["held_out_questions"] == 2
    assert serving.is_symlink() and Path(r1["release"]) == serving.resolve()
    state = Path(r1["state"])
    assert json.loads((state / "last_report.json").read_text())["decision"] == "promoted"
    r2 = _run(world, serving, logs)  # the same logs again: nothing new, no training
    assert r2["decision"] == "no_new_data" and r2["ingest"]["new_records"] == 0 and "train" not in r2
    _write(logs / "q.jsonl", "".join(_line(i) for i in range(100, 104)))
    held = _tree_hash(serving)
    r3 = _run(world, serving, logs, "online.min_tau_gain=100")  # nothing can gain 100: kept
    assert r3["ingest"]["new_records"] == 4 and r3["decision"] == "rejected", r3
    assert r3["buffer"]["records"] == 10 and _tree_hash(serving) == held
    from specdistill.cli import main

    main(["retrain", "status", "--serving", str(serving)])  # the CLI entry: status, then rollback
    main(["retrain", "rollback", "--serving", str(serving)])
    assert _tree_hash(serving) == _tree_hash(world["native"])


class Boom(RuntimeError):
    pass


def test_killed_runs_leave_serving_intact_and_the_next_run_completes(world, tmp_path, monkeypatch):
    from specdistill.drafters.eagle import EagleDrafter

    serving, logs = _setup(world, tmp_path)
    served = _tree_hash(serving)

    def fault_at(point):
        def f(p):
            if p == point:
                raise Boom(point)
        return f

    monkeypatch.setattr(retrain, "FAULT", fault_at("ingest"))  # before the ingest is committed
    with pytest.raises(Boom):
        _run(world, serving, logs, "online.min_tau_gain=-100")
    state = serving.parent / "serving.online"
    assert json.loads((state / "last_report.json").read_text())["decision"] == "failed"
    monkeypatch.setattr(retrain, "FAULT", None)
    real_loss, calls = EagleDrafter.loss, []

    def dying_loss(self, *a, **k):  # mid-training: the second optimizer step never happens
        calls.append(1)
        if len(calls) == 2:
            raise Boom("mid-training")
        return real_loss(self, *a, **k)

    monkeypatch.setattr(EagleDrafter, "loss", dying_loss)
    with pytest.raises(Boom):
        _run(world, serving, logs, "online.min_tau_gain=-100")
    monkeypatch.setattr(EagleDrafter, "loss", real_loss)
    assert _tree_hash(serving) == served and not serving.is_symlink()
    st = json.loads((state / "state.json").read_text())
    assert len(st["pending"]) == 6  # ingested, not yet trained on: kept for the next run
    for point in ("promote", "after_swap"):
        monkeypatch.setattr(retrain, "FAULT", fault_at(point))
        with pytest.raises(Boom):
            _run(world, serving, logs, "online.min_tau_gain=-100")
        if point == "promote":
            assert _tree_hash(serving) == served
        else:  # this run's recovery removed the release the crashed promotion had copied
            rep = json.loads((state / "last_report.json").read_text())
            assert any("never put in service" in x for x in rep["recovered"]), rep["recovered"]
    monkeypatch.setattr(retrain, "FAULT", None)
    # after_swap crashed after the atomic swap: serving is the new release (complete), history is repaired
    r = _run(world, serving, logs, "online.min_tau_gain=-100")
    assert any("after the swap" in x for x in r["recovered"]), r["recovered"]
    assert r["decision"] == "promoted" and r["ingest"]["new_records"] == 0 and r["train"]["steps"] == 2
    hist = gate.load_history(state)
    assert len(hist["releases"]) == 3 and all(Path(x["path"]).is_dir() for x in hist["releases"])
    assert not list((state / "releases").glob(".tmp-*")) and not list((state / "runs").glob("*"))
    assert len(json.loads((state / "state.json").read_text())["pending"]) == 0


def test_second_run_refused_by_the_lock_and_stale_lock_taken_over(world, tmp_path):
    serving, logs = _setup(world, tmp_path, n=0)
    state = serving.parent / "serving.online"
    with DirLock(state, "test holder"):
        with pytest.raises(LockHeldError, match="held by pid"):
            _run(world, serving, logs)
        from specdistill.cli import main

        with pytest.raises(SystemExit) as e:
            main(["retrain", "--logs", str(logs), "--serving", str(serving), f"target.name={world['target']}"])
        assert e.value.code == 3
    (state / ".lock").write_text("999999 deadhost 2026-01-01T00:00:00\n")  # a holder that died (no flock)
    r = _run(world, serving, logs)
    assert r["decision"] == "no_new_data" and r["stale_lock_taken_over"].startswith("999999")


def test_retrain_warm_starts_a_small_lm_drafter(world, tmp_path):
    """The same round for the small_lm family: the drafter section comes from the serving export."""
    from specdistill import config, drafters, export, pipeline

    if "small_lm" not in drafters.REGISTRY:
        pytest.skip("small_lm family not registered in this build")
    root = world["root"]
    cfg = config.load("seqkd", [f"target.name={world['target']}", f"data.source={root / 'convs.jsonl'}",
                                f"data.prepared_dir={root}/p2", "data.max_length=64", "data.min_loss_tokens=2",
                                "drafter.keep_layers=[0,1]", f"train.output_dir={tmp_path}/seqkd", "train.max_steps=1",
                                "train.trackers=[none]", "train.progress=false", "train.mixed_precision=no",
                                "train.save_every=0", "train.eval_every=0", "export.formats=[native]"])
    run = pipeline.train_drafter(cfg)
    native = export.write(run.drafter, cfg.export, tmp_path / "seqkd_export", run.target)["native"]
    serving, logs = tmp_path / "serving", tmp_path / "logs"
    serving.symlink_to(native)
    logs.mkdir()
    _write(logs / "q.jsonl", "".join(_line(i) for i in range(8)))
    r = _run(world, serving, logs, "online.min_tau_gain=-100")
    assert r["decision"] == "promoted" and r["train"]["steps"] == 2, r
    meta = json.loads((serving / "specdistill_export.json").read_text())
    assert meta["family"] == "small_lm" and meta["drafter_config"]["keep_layers"] == [0, 1]
    assert os.readlink(serving) != str(native) and _tree_hash(native) != _tree_hash(serving)


def test_logs_directory_is_a_data_source(tmp_path):
    """data.source=logs:<dir>: every complete record of every log file; a served response is the
    assistant turn; bad lines counted with file:line; a half-written last line is not read."""
    from specdistill.data.sources import iter_conversations, resolve
    from specdistill.data.stats import SkipCounter

    d = tmp_path / "logs"
    d.mkdir()
    (d / "a.jsonl.1").write_text(json.dumps({"prompt": "old question", "response": "old answer"}) + "\n")
    (d / "a.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "response": "hello"})
                               + "\n{broken\n" + json.dumps({"prompt": "no answer yet"}) + "\n"
                               + '{"prompt": "half wri')
    counter = SkipCounter()
    convs = list(iter_conversations(f"logs:{d}", counter))
    assert [c.messages[-1]["content"] for c in convs] == ["old answer", "hello", "no answer yet"]
    assert convs[0].messages[-1]["role"] == "assistant" and convs[2].messages[-1]["role"] == "user"
    assert counter.skipped.get("invalid_json") == 1, counter.skipped
    before = resolve(f"logs:{d}").identity()
    with (d / "a.jsonl").open("a") as f:
        f.write('tten"}\n')
    assert resolve(f"logs:{d}").identity() != before  # the cache key follows the logs
    assert len(list(iter_conversations(f"logs:{d}", SkipCounter()))) == 4


def test_gate_guard_set_blocks_a_challenger_that_gets_worse_elsewhere():
    def res(tau, ident=True):
        return {"overall": {"tau": tau, "identical_to_greedy": ident}}

    better = (res(1.2), res(1.5))  # held-out slice: serving, challenger
    assert gate.decide(*better, 0.02)[0]
    ok, why = gate.decide(*better, 0.02, guard=(res(1.30), res(1.18)), max_guard_drop=0.05)
    assert not ok and "guard-set tau 1.180" in why
    assert gate.decide(*better, 0.02, guard=(res(1.30), res(1.27)), max_guard_drop=0.05)[0]
    assert not gate.decide(*better, 0.02, guard=(res(1.30), res(1.4, ident=False)), max_guard_drop=0.05)[0]
