"""Data readers keep every valid record and count every bad one (issue 11, part 4).

A seeded generator (no hypothesis) writes mixed valid/invalid records as JSONL and as JSON arrays:
the kept ids must equal the valid ids, in order, and the skips must match the bad records by
reason. tests/data/fuzz/ holds a small fixed corpus made by this generator plus hand-made files;
`python tests/test_data_robust.py` rewrites it (and its manifest, from the generator's ground truth).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

import pytest

from specdistill.config import DataConfig
from specdistill.data import SkipCounter, build, iter_conversations
from specdistill.data.questions import load_questions
from specdistill.data.sources import MAX_DEPTH

FUZZ = Path(__file__).resolve().parent / "data" / "fuzz"
BOM = b"\xef\xbb\xbf"
NON_DICT = "not_object"


def read(path):
    counter = SkipCounter(log_first=50)
    ids = [c.id for c in iter_conversations(str(path), counter)]
    return ids, counter


# ---------------------------------------------------------------------------------------------
# the generator


def _valid(rng: random.Random, rid: str) -> dict:
    turns = rng.randint(1, 3)
    shape = rng.choice(["sharegpt", "openai", "parts"])
    msgs = []
    for t in range(turns):
        q, a = f"question {rid}.{t} {rng.random():.3f}", f"answer {rid}.{t} é ☃ {{[,]}} \"x\""
        if shape == "sharegpt":
            msgs += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        elif shape == "openai":
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        else:
            msgs += [{"role": "user", "content": [{"type": "text", "text": q}]},
                     {"role": "assistant", "content": [{"type": "text", "text": a}]}]
    return {"id": rid, "conversations" if shape == "sharegpt" else "messages": msgs}


def _dump(rec, indent) -> bytes:
    return json.dumps(rec, indent=indent).encode()


def _break_syntax(rng: random.Random, text: bytes) -> bytes:
    """Mutate a record's text until it no longer parses; its opening `{"id": ...` stays intact."""
    keep = text.index(b",") + 1  # after the id
    for _ in range(100):
        op = rng.choice(["drop_close", "drop_char", "insert", "truncate"])
        if op == "drop_close":
            out = text[:-1]
        elif op == "truncate":
            out = text[:rng.randint(keep, len(text) - 2)]
        else:
            spots = [i for i in range(keep, len(text)) if text[i:i + 1] in b'"{}[],:']
            i = rng.choice(spots)
            # no "{" inserted: it could open a complete conversation object inside the broken record
            out = text[:i] + text[i + 1:] if op == "drop_char" else text[:i] + rng.choice(list(b'}[],:"x')).to_bytes(1, "big") + text[i:]
        try:
            json.loads(out)
        except ValueError:
            return out
    raise AssertionError("could not break the record")


def _bad(rng: random.Random, rid: str, kind: str, indent) -> tuple[bytes, str]:
    """(text, expected skip reason) of one bad record of `kind`."""
    ok = _valid(rng, rid)
    if kind == "syntax":
        return _break_syntax(rng, _dump(ok, indent)), "invalid_json"
    if kind == "bad_byte":
        return _dump(ok, indent).replace(b"answer", b"ans\xff\xfewer", 1), "invalid_utf8"
    if kind == "deep":
        n = MAX_DEPTH + rng.randint(1, 200)
        return f'{{"id": "{rid}", "conversations": {"[" * n}{"]" * n}}}'.encode(), "bad_shape"
    recs = {
        "empty": ({"id": rid, "conversations": []}, "empty"),
        "no_assistant": ({"id": rid, "conversations": [{"from": "human", "value": "only a question"}]},
                         "no_assistant_turn"),
        "unknown_role": ({"id": rid, "conversations": [{"from": "robot", "value": "?"}, {"from": "gpt", "value": "x"}]},
                         "unknown_role"),
        "no_key": ({"id": rid, "text": "no conversation here"}, "bad_shape"),
        "int_content": ({"id": rid, "messages": [{"role": "user", "content": 3}]}, "bad_shape"),
        NON_DICT: (rng.choice([[1, 2, 3], "just text", 42, None]), "bad_shape"),
        "surrogate": ({"id": rid, "messages": [{"role": "user", "content": "cut \ud83d emoji"},
                                               {"role": "assistant", "content": "x"}]}, "invalid_utf8"),
        "surrogate_id": ({**ok, "id": rid + "\udc80"}, "invalid_utf8"),
    }
    rec, reason = recs[kind]
    return _dump(rec, indent), reason


BAD_KINDS = ["syntax", "bad_byte", "deep", "empty", "no_assistant", "unknown_role", "no_key", "int_content",
             NON_DICT, "surrogate", "surrogate_id"]


def generate(seed: int, n: int, bad_fraction: float = 0.2) -> list[tuple[bytes, str, str | None, str]]:
    """n records as (compact text, indented text, id if valid else None, bad kind or '', skip reason or '')."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if rng.random() < bad_fraction:
            kind = rng.choice(BAD_KINDS)
            state = rng.getstate()
            compact, reason = _bad(rng, f"b{i}", kind, None)
            rng.setstate(state)
            indented, _ = _bad(rng, f"b{i}", kind, 2)
            out.append((compact, indented, None, kind, reason))
        else:
            rec = _valid(rng, f"v{i}")
            out.append((_dump(rec, None), _dump(rec, 2), f"v{i}", "", ""))
    return out


def as_jsonl(recs) -> bytes:
    return b"".join(c + b"\n" for c, *_ in recs)


def as_array(recs, indent: bool) -> bytes:
    return b"[\n" + (b",\n" if indent else b", ").join(r[1] if indent else r[0] for r in recs) + b"\n]\n"


def expected(recs, array: bool) -> tuple[list[str], Counter]:
    """Valid ids and skips by reason. In an array a syntax error is resynchronised at the next
    object, so a non-object record right after a broken one is part of the skipped stretch."""
    ids, skips = [], Counter()
    after_broken = False
    for _, _, rid, kind, reason in recs:
        if rid is not None:
            ids.append(rid)
            after_broken = False
        elif array and kind == NON_DICT and after_broken:
            continue
        else:
            skips[reason] += 1
            after_broken = kind == "syntax"
    return ids, skips


def _merge_cut(skips: Counter) -> Counter:
    """A broken last record of an array may read as a cut-off file; count both as broken JSON."""
    out = Counter(skips)
    out["invalid_json"] += out.pop("truncated_file", 0)
    return +out


# ---------------------------------------------------------------------------------------------
# property tests


@pytest.mark.parametrize("seed", range(40))
def test_mixed_records_keep_every_valid_and_count_every_bad(tmp_path, seed):
    recs = generate(seed, 60, bad_fraction=0.35)
    for name, data, array in [("m.jsonl", as_jsonl(recs), False), ("c.json", as_array(recs, False), True),
                              ("i.json", as_array(recs, True), True)]:
        p = tmp_path / name
        p.write_bytes(data)
        ids, counter = read(p)
        want_ids, want_skips = expected(recs, array)
        assert ids == want_ids, (name, counter.examples)
        got = _merge_cut(counter.skipped) if array else +counter.skipped
        assert got == (_merge_cut(want_skips) if array else want_skips), (name, counter.examples)


@pytest.mark.parametrize("seed", range(6))
def test_record_boundaries_across_read_chunks(tmp_path, monkeypatch, seed):
    """The same, read 7 bytes at a time: tokens, UTF-8 sequences and the BOM split across reads."""
    from specdistill.data import sources

    monkeypatch.setattr(sources, "_CHUNK", 7)
    recs = generate(100 + seed, 30, bad_fraction=0.35)
    for name, data, array in [("m.jsonl", as_jsonl(recs), False), ("i.json", as_array(recs, True), True)]:
        p = tmp_path / name
        p.write_bytes(BOM + data)
        ids, counter = read(p)
        want_ids, want_skips = expected(recs, array)
        assert ids == want_ids, (name, counter.examples)
        assert _merge_cut(counter.skipped) == _merge_cut(want_skips), (name, counter.examples)


def test_deep_chain_in_a_broken_stretch_is_skipped_quickly(tmp_path):
    recs = generate(9, 4, bad_fraction=0.0)
    chain = b'{"id": "x", "conversations": [' + b'{"a": ' * 5_000 + b"1"
    p = tmp_path / "chain.json"
    p.write_bytes(b"[" + recs[0][0] + b", " + chain + b", " + b", ".join(r[0] for r in recs[1:]) + b"]")
    ids, counter = read(p)
    assert ids == ["v0", "v1", "v2", "v3"] and counter.total_skipped == 1, counter.examples


def test_clean_fuzzed_jsonl_of_190_records_counts_each_bad_by_reason(tmp_path):
    recs = generate(1234, 190)
    p = tmp_path / "f.jsonl"
    p.write_bytes(as_jsonl(recs))
    ids, counter = read(p)
    want_ids, want_skips = expected(recs, False)
    assert ids == want_ids and counter.skipped == want_skips
    assert len(ids) + counter.total_skipped == 190


# ---------------------------------------------------------------------------------------------
# the faults of the issue, one by one


def test_bom_json_array_and_jsonl_keep_every_record(tmp_path):
    recs = generate(3, 20, bad_fraction=0.0)
    for name, data in [("b.json", as_array(recs, True)), ("b.jsonl", as_jsonl(recs))]:
        p = tmp_path / name
        p.write_bytes(BOM + data)
        ids, counter = read(p)
        assert ids == [f"v{i}" for i in range(20)] and not counter.skipped, name


@pytest.mark.parametrize("broken,lost", [
    (b'{"id": "x", "conversations": [{"from": "human", "value": "q"} {"from": "gpt", "value": "a"}]}', 1),  # no comma
    (b'{"id": "x", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]', 1),  # no }
    (b'{"id": "x", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}', 1),  # no ]}
    (b'{"id": "x", "conversations": [{"from": "human", "value": "q}, {"from": "gpt", "value": "a"}]}', 1),  # no "
    (b'{"id": "x", "conversations": [{"from": "human" "value": "q"}]} garbage', 1),
    (b'{"id": "x", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}}', 0),  # stray }
    (b'{"id": "x", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]', 0),
    (b'{"id": "x", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, ,', 0),
])
def test_syntax_error_mid_array_resynchronises_at_the_next_record(tmp_path, broken, lost):
    recs = generate(5, 190, bad_fraction=0.0)
    for indent in (False, True):
        body = [r[1] if indent else r[0] for r in recs]
        body.insert(50, broken)
        p = tmp_path / "a.json"
        p.write_bytes(b"[" + (b",\n  " if indent else b",").join(body) + b"]")
        ids, counter = read(p)
        want = [f"v{i}" for i in range(190)]
        if lost == 0:  # the record itself is whole: only the stray characters after it go
            want.insert(50, "x")
        else:
            assert counter.skipped == {"invalid_json": 1}, counter.examples
            assert "[record 50]" in counter.examples[0] and "skipped (to the next record)" in counter.examples[0]
        assert ids == want, counter.examples
        assert counter.total_skipped == lost


def test_broken_stretch_to_the_end_of_an_array_is_counted(tmp_path):
    recs = generate(6, 10, bad_fraction=0.0)
    p = tmp_path / "t.json"
    p.write_bytes(b"[" + b",".join(r[0] for r in recs) + b', {"id": "cut", "conversations": [{"from": "hu')
    ids, counter = read(p)
    assert ids == [f"v{i}" for i in range(10)] and counter.skipped == {"truncated_file": 1}
    p.write_bytes(b"[" + b",".join(r[0] for r in recs) + b', {"id": "x" "conversations": []}]')
    ids, counter = read(p)
    assert len(ids) == 10 and counter.skipped == {"invalid_json": 1}
    assert "to the end of the file" in counter.examples[0]


def test_100k_deep_record_is_a_counted_bad_shape_in_every_reader(tmp_path, tiny_tokenizer):
    n = 100_000
    deep = f'{{"id": "deep", "conversations": {"[" * n}{"]" * n}}}'.encode()
    deep_open = f'{{"id": "deep2", "conversations": {"[" * n}'.encode()  # deep and never closed
    recs = generate(8, 6, bad_fraction=0.0)
    good = [r[0] for r in recs]
    lines = tmp_path / "d.jsonl"
    lines.write_bytes(b"\n".join(good[:3] + [deep, deep_open] + good[3:]) + b"\n")
    ids, counter = read(lines)
    assert ids == [f"v{i}" for i in range(6)] and counter.skipped == {"bad_shape": 2}
    array = tmp_path / "d.json"
    array.write_bytes(b"[" + b",".join(good[:3] + [deep] + good[3:]) + b"]")
    ids, counter = read(array)
    assert ids == [f"v{i}" for i in range(6)] and counter.skipped == {"bad_shape": 1}
    assert f"nested deeper than {MAX_DEPTH}" in counter.examples[0]
    # the whole `data stats` path: no RecursionError anywhere, the record counted as read
    _, _, summary = build(DataConfig(source=str(lines), max_length=96, min_loss_tokens=1,
                                     prepared_dir=str(tmp_path / "prep")), tiny_tokenizer, verbose=False)
    assert summary["records_read"] == 8 and summary["counts"]["skipped_by_reason"]["bad_shape"] == 2


def test_lone_surrogate_has_one_policy_in_json_and_jsonl(tmp_path):
    recs = [{"id": "s1", "messages": [{"role": "user", "content": "half \ud83d"}, {"role": "assistant", "content": "a"}]},
            {"id": "s2\udc80", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"id": "ok", "messages": [{"role": "user", "content": "pair \ud83d\ude00"},
                                      {"role": "assistant", "content": "a"}]}]
    for name, data in [("s.json", json.dumps(recs)), ("s.jsonl", "\n".join(json.dumps(r) for r in recs))]:
        p = tmp_path / name
        p.write_text(data)
        counter = SkipCounter()
        convs = list(iter_conversations(str(p), counter))
        assert [c.id for c in convs] == ["ok"] and counter.skipped == {"invalid_utf8": 2}, name
        assert convs[0].messages[0]["content"] == "pair \U0001f600"


def test_questions_file_skips_and_names_bad_lines(tmp_path):
    good = [json.dumps({"question_id": i, "category": "c", "turns": [f"q{i}"]}).encode() for i in range(4)]
    p = tmp_path / "q.jsonl"
    p.write_bytes(BOM + b"\n".join([
        good[0],
        b'{"question_id": 9, "category": "c", "turns": ["caf\xe9"]}',  # line 2: latin-1, not UTF-8
        good[1],
        b'{"question_id": 10, "turns": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # line 4: too deep
        json.dumps({"question_id": 11, "turns": ["half \ud83d"]}).encode(),  # line 5: lone surrogate
        b'{"question_id": 12, "turns": [',  # line 6: broken JSON
        good[2], good[3],
    ]) + b"\n")
    qs = load_questions(p)
    assert [q.question_id for q in qs.questions] == [0, 1, 2, 3]
    assert [s.split(": ", 1)[0] for s in qs.skipped] == [f"{p}:{n}" for n in (2, 4, 5, 6)]
    assert "not valid UTF-8" in qs.skipped[0] and "nested deeper" in qs.skipped[1]
    assert "surrogate" in qs.skipped[2] and "invalid JSON" in qs.skipped[3]


# ---------------------------------------------------------------------------------------------
# the fixed corpus


def test_fuzz_corpus_matches_its_manifest():
    manifest = json.loads((FUZZ / "expected.json").read_text())
    assert manifest and sum(f.stat().st_size for f in FUZZ.iterdir()) < 200_000
    for name, want in manifest.items():
        p = FUZZ / name
        if want.get("questions"):
            qs = load_questions(p)
            assert [q.question_id for q in qs.questions] == want["kept"], name
            assert [s.split(": ", 1)[0].rsplit(":", 1)[1] for s in qs.skipped] == [str(n) for n in want["skipped_lines"]]
            continue
        ids, counter = read(p)
        assert ids == want["kept"], (name, counter.examples)
        assert dict(counter.skipped) == want["skipped"], (name, counter.examples)


def _hand_made() -> dict[str, tuple[bytes, dict]]:
    recs = generate(11, 12, bad_fraction=0.0)
    c = [r[0] for r in recs]
    ids = [f"v{i}" for i in range(12)]
    errors = (c[0] + b", " + c[1][:-1] + b", " + c[2] + b" " + c[3] + b", x, " + c[4] + b"}, " + c[5] + b"], "
              + c[6] + b', {"id": "cut", "conversations": [{"from": "human", "value": "q}, ' + c[7] + b", ,"
              + c[8] + b", [1, 2], " + c[9] + b", " + c[10] + b", " + c[11] + b",]")
    questions = b"\n".join([
        json.dumps({"question_id": 1, "category": "a", "turns": ["hello"]}).encode(),
        b'{"question_id": 2, "turns": ["\xff\xfe"]}',
        json.dumps({"question_id": 3, "turns": ["a", "b"]}).encode(),
        b'{"question_id": 4, "turns": ["\\udc80"]}',
        b'{"question_id": 5, "turns": ' + b"[" * 1000 + b"]" * 1000 + b"}",
        json.dumps({"question_id": 6, "turns": ["last"]}).encode(),
    ]) + b"\n"
    return {
        # c1 lacks its closing brace, c3 its comma before it, "x" is garbage, c4 and c5 carry a stray
        # closer, a cut-off record, an empty element, a non-record list, a trailing comma
        "mid_array_errors.json": (b"[" + errors, {
            "kept": ids[:1] + ids[2:], "skipped": {"invalid_json": 3, "bad_shape": 1}}),
        "bom_array.json": (BOM + as_array(recs, True), {"kept": ids, "skipped": {}}),
        "bom_lines.jsonl": (BOM + as_jsonl(recs), {"kept": ids, "skipped": {}}),
        "questions_mixed.jsonl": (BOM + questions, {"questions": True, "kept": [1, 3, 6], "skipped_lines": [2, 4, 5]}),
    }


def write_corpus() -> None:
    FUZZ.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name, (data, want) in _hand_made().items():
        (FUZZ / name).write_bytes(data)
        manifest[name] = want
    recs = generate(7, 120, bad_fraction=0.25)
    for name, data, array in [("fuzz_seed7.jsonl", as_jsonl(recs), False),
                              ("fuzz_seed7_compact.json", as_array(recs, False), True),
                              ("fuzz_seed7_indented.json", as_array(recs, True), True)]:
        (FUZZ / name).write_bytes(data)
        ids, skips = expected(recs, array)
        manifest[name] = {"kept": ids, "skipped": dict(sorted(skips.items()))}
    (FUZZ / "expected.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    argparse.ArgumentParser(description="rewrite tests/data/fuzz/ and its manifest").parse_args()
    write_corpus()
    print(f"wrote {FUZZ}", file=sys.stderr)
