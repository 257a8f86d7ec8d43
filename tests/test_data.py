"""Data pipeline: sources skip-and-count, template-derived loss masks, truncation, split, cache."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import CHATML_TEMPLATE, LLAMA3_TEMPLATE, make_tokenizer

from specdistill.config import DataConfig
from specdistill.data import (
    ChatEncoder,
    Conversation,
    SkipCounter,
    SourceError,
    build,
    collate,
    iter_conversations,
    length_grouped_order,
    split_of,
)

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"

MULTI = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "hello you"},
    {"role": "user", "content": "more please"},
    {"role": "assistant", "content": "ok then, here is more"},
]

# SmolLM2's shape: a default system prompt is injected when the conversation has none
DEFAULT_SYSTEM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nyou are a bot<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Not prefix-stable: earlier assistant turns are re-rendered differently once a later turn exists
# (as reasoning templates do with their thinking blocks)
UNSTABLE_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['role'] == 'assistant' and not loop.last %}{{ 'old: ' }}{% endif %}"
    "{{ message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Templates may refuse conversations, like Llama-2/Mistral's "roles must alternate"
STRICT_TEMPLATE = (
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def masked_spans(tok, ids, mask) -> list[str]:
    """The text of each run of loss tokens (tokens joined exactly, no decode spacing)."""
    d = np.diff(np.concatenate([[0], np.asarray(mask), [0]]))
    starts, ends = np.nonzero(d == 1)[0], np.nonzero(d == -1)[0]
    return ["".join(tok.convert_ids_to_tokens([int(i) for i in ids[a:b]])) for a, b in zip(starts, ends)]


def encode(tok, messages, max_length=512, min_loss_tokens=1, truncate_prompt=True):
    counter = SkipCounter()
    out = ChatEncoder(tok, max_length, min_loss_tokens, truncate_prompt).encode_batch(
        [Conversation("x", messages, "t")], counter)
    return out[0][1] if out else None, counter


# ---------------------------------------------------------------------------------------------
# loss mask


@pytest.mark.parametrize("template,end", [(CHATML_TEMPLATE, "<|im_end|>"), (LLAMA3_TEMPLATE, "<|eot_id|>")])
def test_mask_is_exactly_assistant_content_and_end_token(template, end):
    tok = make_tokenizer(template)
    enc, counter = encode(tok, MULTI)
    assert counter.kept == 0 and not counter.skipped
    # the ids are the template's own tokenization
    assert enc.input_ids.tolist() == tok.apply_chat_template(MULTI, tokenize=True)["input_ids"]
    assert masked_spans(tok, enc.input_ids, enc.loss_mask) == ["hello you" + end, "ok then, here is more" + end]
    assert enc.turns == 2 and not enc.truncated


def test_mask_skips_injected_default_system_prompt_and_headers():
    tok = make_tokenizer(DEFAULT_SYSTEM_TEMPLATE)
    enc, _ = encode(tok, MULTI[1:])
    text = "".join(tok.convert_ids_to_tokens(enc.input_ids.tolist()))
    assert text.startswith("<|im_start|>system\nyou are a bot")
    assert masked_spans(tok, enc.input_ids, enc.loss_mask) == ["hello you<|im_end|>", "ok then, here is more<|im_end|>"]


def test_not_prefix_stable_template_falls_back_to_search():
    tok = make_tokenizer(UNSTABLE_TEMPLATE)
    enc_obj = ChatEncoder(tok, 512, 1)
    out = enc_obj.encode_batch([Conversation("x", MULTI, "t")], SkipCounter())
    enc = out[0][1]
    assert masked_spans(tok, enc.input_ids, enc.loss_mask) == ["hello you<|im_end|>", "ok then, here is more<|im_end|>"]
    assert enc_obj.stats["searched_spans"] >= 1


def test_template_exception_is_counted_not_raised():
    tok = make_tokenizer(STRICT_TEMPLATE)
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "ccccc"}]
    good = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "ccccc"}]
    counter = SkipCounter()
    out = ChatEncoder(tok, 512, 1).encode_batch([Conversation("b", bad, "f:1"), Conversation("g", good, "f:2")], counter)
    assert [c.id for c, _ in out] == ["g"]
    assert counter.skipped["template_error"] == 1
    assert "f:1" in counter.examples[0] and "alternate" in counter.examples[0]


def test_no_chat_template_is_a_clear_error():
    tok = make_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        ChatEncoder(tok)


# ---------------------------------------------------------------------------------------------
# truncation


def test_truncation_cuts_at_turn_boundary():
    tok = make_tokenizer()
    full, _ = encode(tok, MULTI)
    first_end = int(np.nonzero(full.loss_mask)[0][0]) + len("hello you") + 1  # index after <|im_end|>
    enc, _ = encode(tok, MULTI, max_length=len(full.input_ids) - 3)
    assert enc.truncated and len(enc.input_ids) == first_end
    assert masked_spans(tok, enc.input_ids, enc.loss_mask) == ["hello you<|im_end|>"]


def test_truncation_inside_first_turn_then_too_long():
    tok = make_tokenizer()
    full, _ = encode(tok, MULTI)
    start = int(np.nonzero(full.loss_mask)[0][0])
    enc, _ = encode(tok, MULTI, max_length=start + 5, min_loss_tokens=4, truncate_prompt=False)
    assert enc.truncated and len(enc.input_ids) == start + 5
    assert masked_spans(tok, enc.input_ids, enc.loss_mask) == ["hello"]
    enc, counter = encode(tok, MULTI, max_length=start + 2, min_loss_tokens=4, truncate_prompt=False)
    assert enc is None and counter.skipped["too_long"] == 1
    enc, counter = encode(tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                          min_loss_tokens=4)
    assert enc is None and counter.skipped["too_short"] == 1


LONG_PROMPT = " ".join(f"word{i}" for i in range(120)) + " so what is the last word?"


def first_turn_conversation(reply="it is word119", system=True):
    msgs = [{"role": "user", "content": LONG_PROMPT}, {"role": "assistant", "content": reply},
            {"role": "user", "content": "and the first?"}, {"role": "assistant", "content": "word0"}]
    return ([{"role": "system", "content": "be brief"}] if system else []) + msgs


@pytest.mark.parametrize("template,end", [(CHATML_TEMPLATE, "<|im_end|>"), (LLAMA3_TEMPLATE, "<|eot_id|>")])
def test_prompt_truncation_keeps_a_conversation_whose_first_prompt_is_too_long(template, end):
    tok = make_tokenizer(template)
    msgs = first_turn_conversation()
    full, _ = encode(tok, msgs, max_length=4096)
    assert int(np.nonzero(full.loss_mask)[0][0]) > 200  # the first reply starts past max_length below
    enc, counter = encode(tok, msgs, max_length=200, min_loss_tokens=4)
    assert enc is not None and counter.notes["prompt_truncated"] == 1 and not counter.skipped
    assert len(enc.input_ids) <= 200 and enc.truncated and enc.turns == 2
    # the whole first reply fits, and so does the short turn after it (both within 3/4 of the room);
    # exactly the replies are masked, not the headers
    assert masked_spans(tok, enc.input_ids, enc.loss_mask) == ["it is word119" + end, "word0" + end]
    text = "".join(tok.convert_ids_to_tokens(enc.input_ids.tolist()))
    # the template's text and the system message are intact; the user text kept is the newest part,
    # starting at a word, and it uses the room the reply leaves
    assert "system" in text and "be brief" + end in text
    kept = text[text.index("user"):].split(end)[0].rsplit("\n", 1)[-1]
    assert LONG_PROMPT.endswith(kept) and kept.startswith("word") and len(kept) > 80
    assert len(enc.input_ids) >= 200 - 10
    # the ids are the template's own tokenization of the shortened conversation
    short = [dict(m) for m in msgs]
    short[1]["content"] = kept
    assert enc.input_ids.tolist() == tok.apply_chat_template(short, tokenize=True)["input_ids"][:len(enc.input_ids)]
    # off: skipped as before
    enc, counter = encode(tok, msgs, max_length=200, min_loss_tokens=4, truncate_prompt=False)
    assert enc is None and counter.skipped["too_long"] == 1 and not counter.notes


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, LLAMA3_TEMPLATE])
def test_prompt_truncation_with_a_reply_longer_than_max_length(template):
    """A reply that cannot fit whole gets 3/4 of the room; the prompt keeps its newest part in the rest."""
    tok = make_tokenizer(template)
    reply = "the answer goes on and on " * 20
    enc, counter = encode(tok, first_turn_conversation(reply, system=False), max_length=200, min_loss_tokens=4)
    assert counter.notes["prompt_truncated"] == 1 and len(enc.input_ids) == 200
    spans = masked_spans(tok, enc.input_ids, enc.loss_mask)
    assert len(spans) == 1 and reply.strip().startswith(spans[0]) and 100 < len(spans[0]) < 160
    text = "".join(tok.convert_ids_to_tokens(enc.input_ids.tolist()))
    assert "so what is the last word?" in text and "word0 " not in text


def test_prompt_truncation_leaves_fitting_and_hopeless_conversations_alone():
    tok = make_tokenizer()
    # the first reply fits: nothing is cut, later turns are cut at a boundary as before
    enc, counter = encode(tok, MULTI, max_length=70)
    off, _ = encode(tok, MULTI, max_length=70, truncate_prompt=False)
    assert enc.truncated and enc.turns == 1 and not counter.notes
    assert enc.input_ids.tolist() == off.input_ids.tolist() and enc.loss_mask.tolist() == off.loss_mask.tolist()
    # the prompt is short and the reply long: the reply is cut inside, the prompt stays whole
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * 300}]
    enc, counter = encode(tok, msgs, max_length=64)
    assert not counter.notes and enc.truncated and len(enc.input_ids) == 64
    # even an empty prompt leaves too few loss tokens: still too_long, nothing noted
    enc, counter = encode(tok, first_turn_conversation(), max_length=16, min_loss_tokens=4)
    assert enc is None and counter.skipped["too_long"] == 1 and not counter.notes


def test_prompt_truncation_cuts_the_earliest_user_message_first():
    tok = make_tokenizer()
    msgs = [{"role": "system", "content": "s" * 30}, {"role": "user", "content": "old " * 60},
            {"role": "user", "content": "new question here"}, {"role": "assistant", "content": "answer"}]
    enc, counter = encode(tok, msgs, max_length=112, min_loss_tokens=4)
    text = "".join(tok.convert_ids_to_tokens(enc.input_ids.tolist()))
    assert counter.notes["prompt_truncated"] == 1 and len(enc.input_ids) <= 112
    assert "s" * 30 in text and "new question here" in text and "old old" in text
    assert masked_spans(tok, enc.input_ids, enc.loss_mask) == ["answer<|im_end|>"]


def test_first_pass_shortcut_gives_same_samples_as_full_rendering():
    """The char-budget first pass (prune + cut) must not change any sample."""
    tok = make_tokenizer()
    convs = [Conversation(str(i), [{"role": "user", "content": "q " * (3 * i + 1) + "long " * (40 * (i % 3))},
                                   {"role": "assistant", "content": "answer " * (5 + 7 * i)},
                                   {"role": "user", "content": "again"},
                                   {"role": "assistant", "content": "x" * (40 * i + 3)}], "t") for i in range(12)]
    fast = ChatEncoder(tok, 64, 1)
    slow = ChatEncoder(tok, 64, 1)
    slow.char_budget = 10**9
    fast_counter = SkipCounter()
    a, b = fast.encode_batch(convs, fast_counter), slow.encode_batch(convs, SkipCounter())
    assert [c.id for c, _ in a] == [c.id for c, _ in b] and len(a) >= 6
    assert fast_counter.notes["prompt_truncated"] >= 2
    assert any(len(fast._cut(fast.render(c.messages)[0])) < len(fast.render(c.messages)[0]) for c in convs)
    for (_, x), (_, y) in zip(a, b):
        assert x.input_ids.tolist() == y.input_ids.tolist() and x.loss_mask.tolist() == y.loss_mask.tolist()
        assert x.truncated == y.truncated


# ---------------------------------------------------------------------------------------------
# sources: skip and count


def read_all(path, limit=0):
    counter = SkipCounter()
    convs = list(iter_conversations(str(path), counter, limit))
    return convs, counter


def test_truncated_json_array_keeps_complete_records(tmp_path, tiny_conversations):
    text = json.dumps(tiny_conversations, indent=1)
    p = tmp_path / "cut.json"
    p.write_text(text[: int(len(text) * 0.6)])
    convs, counter = read_all(p)
    assert 5 < len(convs) < len(tiny_conversations)
    assert counter.skipped == {"truncated_file": 1}
    assert [c.id for c in convs] == [r["id"] for r in tiny_conversations[: len(convs)]]


def test_jsonl_with_broken_lines_and_every_bad_kind(tmp_path):
    good = {"id": "ok", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    lines = [
        json.dumps(good).encode(),
        b'{"id": "broken", "conversations": [',  # invalid_json
        json.dumps({"id": "e", "conversations": []}).encode(),  # empty
        json.dumps({"id": "e2", "messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}).encode(),
        json.dumps({"id": "na", "conversations": [{"from": "human", "value": "only a question"}]}).encode(),
        json.dumps({"id": "ur", "conversations": [{"from": "robot", "value": "?"}, {"from": "gpt", "value": "x"}]}).encode(),
        json.dumps({"id": "bs", "text": "no conversation here"}).encode(),  # bad_shape
        json.dumps({"id": "bs2", "messages": [{"role": "user", "content": 3}]}).encode(),  # bad_shape
        b"[1, 2, 3]",  # bad_shape (not an object)
        b'{"id": "u8", "conversations": [{"from": "human", "value": "caf\xe9"}, {"from": "gpt", "value": "x"}]}',
        json.dumps({"id": "sur", "conversations": [{"from": "human", "value": "\ud83d"}, {"from": "gpt", "value": "x"}]}).encode(),
        json.dumps({"id": "oa", "messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": [{"type": "text", "text": "parts"}]}]}).encode(),
        b"",
        b'{"id": "tail", "conversations": [{"from": "human", "val',  # truncated_file (no final newline)
    ]
    p = tmp_path / "mixed.jsonl"
    p.write_bytes(b"\n".join(lines))
    convs, counter = read_all(p)
    assert [c.id for c in convs] == ["ok", "oa"]
    assert convs[1].messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "parts"}]
    assert dict(counter.skipped) == {"invalid_json": 1, "empty": 2, "no_assistant_turn": 1, "unknown_role": 1,
                                     "bad_shape": 3, "invalid_utf8": 2, "truncated_file": 1}
    assert counter.examples[0].startswith(f"{p}:2: skipped (invalid_json)")


def test_invalid_utf8_inside_json_array_skips_only_that_record(tmp_path):
    recs = [{"id": f"r{i}", "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "MARK"}]}
            for i in range(3)]
    raw = json.dumps(recs).encode()
    raw = raw.replace(b"MARK", b"MA\xff\xfeRK", 1)  # only in record 0
    p = tmp_path / "bad.json"
    p.write_bytes(raw)
    convs, counter = read_all(p)
    assert [c.id for c in convs] == ["r1", "r2"]
    assert dict(counter.skipped) == {"invalid_utf8": 1}
    assert "[record 0]" in counter.examples[0]


def test_repairs_are_noted_not_skipped(tmp_path):
    rec = {"id": "r", "conversations": [{"from": "gpt", "value": "continuation"}, {"from": "human", "value": "q"},
                                        {"from": "chatgpt", "value": "a"}, {"from": "human", "value": ""},
                                        {"from": "gpt", "value": "dropped"}]}
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps(rec) + "\n")
    convs, counter = read_all(p)
    assert convs[0].messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert counter.notes == {"dropped_leading_assistant": 1, "cut_at_empty_message": 1}


def test_unreadable_files_are_clear_errors_naming_the_file(tmp_path):
    cases = {"missing.json": None, "adir": "dir", "notjson.json": b"hello, world", "empty.jsonl": b"  \n",
             "object.json": b'{\n  "data": []\n}\n'}
    for name, content in cases.items():
        p = tmp_path / name
        if content == "dir":
            p.mkdir()
        elif content is not None:
            p.write_bytes(content)
        with pytest.raises(SourceError, match=str(p).replace("\\", "\\\\")):
            read_all(p)
    if os.geteuid() != 0:  # root reads anything, so the permission case only holds for users
        p = tmp_path / "locked.jsonl"
        p.write_text("{}\n")
        p.chmod(0)
        with pytest.raises(SourceError, match="locked.jsonl"):
            read_all(p)


def test_hf_source_without_datasets_says_how_to_install(tmp_path):
    pytest.importorskip("specdistill")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(SourceError, match="pip install datasets"):
            read_all(f"hf:{tmp_path}")
        return
    p = tmp_path / "d.jsonl"
    p.write_text((SAMPLES / "openai_sample.jsonl").read_text())
    convs, _ = read_all(f"hf:{p}")
    assert len(convs) == 3


def test_hf_source_reads_local_files_through_datasets(tmp_path, monkeypatch):
    """The hf: code path with a stand-in `datasets` module (the real one is an optional install)."""
    import sys
    import types

    calls = []

    def load_dataset(kind, data_files=None, split=None):
        calls.append((kind, data_files, split))
        return [json.loads(x) for x in Path(data_files).read_text().splitlines()]

    fake = types.ModuleType("datasets")
    fake.load_dataset = load_dataset
    fake.load_from_disk = lambda p: pytest.fail("not a save_to_disk folder")
    fake.DatasetDict = dict
    monkeypatch.setitem(sys.modules, "datasets", fake)
    convs, counter = read_all(f"hf:{SAMPLES / 'openai_sample.jsonl'}#train")
    assert [c.id for c in convs] == ["sample-oa-0", "sample-oa-1", "sample-oa-2"] and not counter.skipped
    assert calls == [("json", str(SAMPLES / "openai_sample.jsonl"), "train")]
    fake.load_dataset = lambda *a, **k: (_ for _ in ()).throw(ConnectionError("offline"))
    with pytest.raises(SourceError, match="hf:some/hub-id.*offline"):
        read_all("hf:some/hub-id")


def test_shipped_samples_parse_in_both_shapes():
    for name, n in [("sharegpt_sample.jsonl", 4), ("sharegpt_sample.json", 4), ("openai_sample.jsonl", 3)]:
        convs, counter = read_all(SAMPLES / name)
        assert len(convs) == n and not counter.skipped, name


# ---------------------------------------------------------------------------------------------
# prepared datasets: split, cache, collate


def test_split_is_deterministic_and_seeded():
    ids = [f"c{i}" for i in range(2000)]
    a = [split_of(i, 0, 0.1) for i in ids]
    assert a == [split_of(i, 0, 0.1) for i in ids]
    assert 120 < a.count("val") < 280
    assert a != [split_of(i, 1, 0.1) for i in ids]


def test_build_caches_and_reuses(tmp_path, sharegpt_file, tiny_tokenizer):
    cfg = DataConfig(source=str(sharegpt_file), max_length=96, min_loss_tokens=2, val_fraction=0.2,
                     prepared_dir=str(tmp_path / "prep"))
    train, val, s1 = build(cfg, tiny_tokenizer)
    assert not s1["cached"] and len(train) + len(val) == 24 and len(val) >= 1
    assert (Path(s1["prepared_dir"]) / "summary.json").exists()
    assert s1["counts"]["kept"] == 24
    train2, val2, s2 = build(cfg, tiny_tokenizer)
    assert s2["cached"] and s2["prepared_dir"] == s1["prepared_dir"]
    assert [val2.conversation_id(i) for i in range(len(val2))] == [val.conversation_id(i) for i in range(len(val))]
    assert train2[3] == train[3]
    sample = train[0]
    assert set(sample) == {"input_ids", "loss_mask"} and len(sample["input_ids"]) == len(sample["loss_mask"]) <= 96
    # a different setting or a changed source file is a different cache entry
    _, _, s3 = build(DataConfig(**{**cfg.__dict__, "max_length": 80}), tiny_tokenizer)
    assert s3["prepared_dir"] != s1["prepared_dir"]
    _, _, s5 = build(DataConfig(**{**cfg.__dict__, "truncate_prompt": False}), tiny_tokenizer)
    assert s5["prepared_dir"] not in (s1["prepared_dir"], s3["prepared_dir"])
    assert s5["settings"]["truncate_prompt"] is False and s1["settings"]["truncate_prompt"] is True
    sharegpt_file.write_text(sharegpt_file.read_text() + " ")
    _, _, s4 = build(cfg, tiny_tokenizer)
    assert not s4["cached"] and s4["prepared_dir"] != s1["prepared_dir"]
    entries = [p.name for p in (tmp_path / "prep").iterdir()]
    assert len([e for e in entries if not e.startswith(".")]) == 4
    assert not [e for e in entries if ".tmp" in e]  # no temporary folders left behind


def _build_in_child(args):
    cfg, q = args
    _, _, summary = build(cfg, make_tokenizer())
    q.put(summary["cached"])


def test_concurrent_builds_prepare_once(tmp_path, sharegpt_file):
    """Every rank of a multi-process launch calls build(); only one may do the work."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    cfg = DataConfig(source=str(sharegpt_file), max_length=96, prepared_dir=str(tmp_path / "prep"))
    procs = [ctx.Process(target=_build_in_child, args=((cfg, q),)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert sorted(q.get(timeout=5) for _ in procs) == [False, True, True]


def test_build_with_no_usable_conversation_is_an_error(tmp_path, tiny_tokenizer):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"id": 1, "conversations": []}\nnot json\n')
    with pytest.raises(SourceError, match="no usable conversation"):
        build(DataConfig(source=str(p), prepared_dir=str(tmp_path / "prep")), tiny_tokenizer)


def test_build_counts_prompt_truncation(tmp_path, tiny_tokenizer):
    p = tmp_path / "long.jsonl"
    p.write_text("\n".join(json.dumps({"id": f"l{i}", "messages": first_turn_conversation()}) for i in range(3)))
    cfg = DataConfig(source=str(p), max_length=128, prepared_dir=str(tmp_path / "prep"))
    _, _, on = build(cfg, tiny_tokenizer)
    assert on["counts"]["kept"] == 3 and on["counts"]["notes"] == {"prompt_truncated": 3}
    assert on["truncated_samples"] == 3 and on["all"]["length_max"] <= 128
    with pytest.raises(SourceError, match="too_long"):
        build(DataConfig(**{**cfg.__dict__, "truncate_prompt": False}), tiny_tokenizer)


def test_collate_pads_right_and_masks():
    batch = [{"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}, {"input_ids": [8], "loss_mask": [1]}]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["loss_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="sample 0"):
        collate([{"input_ids": [1, 2], "loss_mask": [1]}], 0)


def test_length_grouped_order_is_a_permutation_with_less_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 500, size=1000)
    order = length_grouped_order(lengths, batch_size=8, seed=0)
    assert sorted(order) == list(range(1000))

    def padding(o):
        return sum(int(lengths[o[k:k + 8]].max() * 8 - lengths[o[k:k + 8]].sum()) for k in range(0, 1000, 8))
    assert padding(order) < 0.3 * padding(list(rng.permutation(1000)))


def test_cli_data_stats(tmp_path, capsys, monkeypatch, tiny_tokenizer):
    from specdistill.data import cli

    monkeypatch.setattr(cli, "load_tokenizer", lambda name: tiny_tokenizer)
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    out_json = tmp_path / "s.json"
    args = parser.parse_args(["data", "stats", str(SAMPLES / "sharegpt_sample.jsonl"), "--max-length", "256",
                              "--prepared-dir", str(tmp_path / "p"), "--out", str(out_json)])
    args.func(args)
    text = capsys.readouterr().out
    assert "kept 4 conversations" in text and "loss tokens" in text
    assert json.loads(out_json.read_text())["counts"]["kept"] == 4
    args = parser.parse_args(["data", "stats", str(tmp_path / "nope.json"), "--prepared-dir", str(tmp_path / "p")])
    with pytest.raises(SystemExit, match="nope.json"):
        args.func(args)


# ---------------------------------------------------------------------------------------------
# the real embedded data + tokenizer


@pytest.mark.embedded
def test_embedded_sharegpt_with_smollm2_tokenizer(tmp_path):
    from specdistill.data.cli import load_tokenizer

    tok = load_tokenizer("default")
    cfg = DataConfig(source="default", limit=200, max_length=512, prepared_dir=str(tmp_path))
    train, val, summary = build(cfg, tok)
    assert summary["conversations_valid"] == 200
    assert 150 < summary["counts"]["kept"] <= 200
    assert summary["alignment"]["searched_spans"] == 0  # SmolLM2's template is prefix-stable
    ids = train[0]["input_ids"]
    mask = np.array(train[0]["loss_mask"])
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\n")  # SmolLM2 injects its default system prompt
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ends = [i for i, t in enumerate(ids) if t == im_end]
    # every masked run ends on <|im_end|> or at the truncation point; the system/user parts are unmasked
    assert mask[ends[0]] == 0 and mask[ends[1]] == 0  # system and first user turn
    assert mask.sum() > 0 and mask[: ends[1] + 1].sum() == 0
