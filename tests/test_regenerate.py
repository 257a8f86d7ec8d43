"""Self-distillation regeneration: ShareGPT output the data pipeline reads, resume, greedy == target's own."""

from __future__ import annotations

import json

import pytest
import torch

from specdistill.data import regenerate as rg


def _lines(p):
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def test_regenerate_writes_sharegpt_and_resumes(tmp_path, tiny_target, tiny_conversations):
    out = tmp_path / "regen.jsonl"
    s1 = rg.regenerate(tiny_conversations, tiny_target, out, max_new_tokens=4, batch_size=2, limit=3)
    assert s1["written"] == 3 and s1["turns"] == 6
    recs = _lines(out)
    assert [r["id"] for r in recs] == ["c0", "c1", "c2"]
    for r, src in zip(recs, tiny_conversations):
        conv = r["conversations"]
        assert [m["from"] for m in conv] == ["human", "gpt", "human", "gpt"]
        assert conv[0]["value"] == src["conversations"][0]["value"]  # user turns kept
        assert r["regenerated"]["turns"] == 2 and r["regenerated"]["new_tokens"] <= 8
    # a crash mid-write leaves a torn line: it is dropped and the run continues after the done ids
    with open(out, "a") as f:
        f.write('{"id": "c3", "conversa')
    s2 = rg.regenerate(tiny_conversations, tiny_target, out, max_new_tokens=4, batch_size=2, limit=5)
    assert s2["skipped_done"] == 3 and s2["written"] == 2
    recs2 = _lines(out)
    assert [r["id"] for r in recs2] == ["c0", "c1", "c2", "c3", "c4"]
    assert recs2[:3] == recs


def test_greedy_turns_are_the_targets_own_greedy_answers(tmp_path, tiny_target, tiny_conversations):
    out = tmp_path / "r.jsonl"
    rg.regenerate(tiny_conversations[:3], tiny_target, out, max_new_tokens=6, batch_size=3)
    tok = tiny_target.tokenizer
    for rec in _lines(out):
        conv = rec["conversations"]
        msgs = [{"role": "user", "content": conv[0]["value"]}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        x = torch.tensor([list(ids)])
        new = []
        for _ in range(6):  # plain greedy decoding, one token at a time, no padding
            nxt = int(tiny_target.model(x).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], 1)
        assert conv[1]["value"] == tok.decode(new, skip_special_tokens=True)


def test_output_is_a_valid_data_source(tmp_path, tiny_target, tiny_conversations):
    from specdistill.data.sources import iter_conversations
    from specdistill.data.stats import SkipCounter

    out = tmp_path / "r.jsonl"
    rg.regenerate(tiny_conversations[:4], tiny_target, out, max_new_tokens=3, batch_size=4)
    c = SkipCounter()
    convs = list(iter_conversations(str(out), c))
    assert len(convs) + c.total_skipped == 4
    assert all(m["role"] in ("user", "assistant") for cv in convs for m in cv.messages)


def test_prompt_limit_cuts_conversation(tmp_path, tiny_target, tiny_conversations):
    out = tmp_path / "r.jsonl"
    n_first = len(rg.Generator(tiny_target).prompt_ids(
        [{"role": "user", "content": tiny_conversations[0]["conversations"][0]["value"]}]))
    s = rg.regenerate(tiny_conversations[:1], tiny_target, out, max_new_tokens=3, max_prompt_tokens=n_first + 4)
    rec = _lines(out)[0]
    assert len(rec["conversations"]) == 2 and s["turns_cut_by_length"] == 1


def test_output_path_keyed_by_settings(tiny_target, sharegpt_file):
    a = rg.output_path("root", str(sharegpt_file), tiny_target, {"max_new_tokens": 4, "temperature": 0.0})
    b = rg.output_path("root", str(sharegpt_file), tiny_target, {"max_new_tokens": 8, "temperature": 0.0})
    assert a != b and a.suffix == ".jsonl" and a.name.startswith("convs-")
    assert a == rg.output_path("root", str(sharegpt_file), tiny_target, {"max_new_tokens": 4, "temperature": 0.0})


def test_output_key_follows_content_not_path_or_mtime(tmp_path, tiny_target, sharegpt_file):
    """A corpus made on one machine is continued on another: the key hashes the source's bytes, not
    where it is installed or when; changed bytes (same size) give a new key."""
    import os
    import shutil

    st = {"max_new_tokens": 4, "temperature": 0.0}
    copy = tmp_path / "elsewhere" / sharegpt_file.name
    copy.parent.mkdir()
    shutil.copy(sharegpt_file, copy)
    os.utime(copy, (1, 1))
    assert rg.output_path("r", str(copy), tiny_target, st) == rg.output_path("r", str(sharegpt_file), tiny_target, st)
    raw = bytearray(copy.read_bytes())
    raw[len(raw) // 2] ^= 1
    copy.write_bytes(bytes(raw))
    assert rg.output_path("r", str(copy), tiny_target, st) != rg.output_path("r", str(sharegpt_file), tiny_target, st)


def test_cli_regenerate(tmp_path, sharegpt_file):
    from conftest import make_llama, make_tokenizer

    from specdistill.cli import main

    tdir = tmp_path / "tiny"
    make_llama().save_pretrained(tdir)
    make_tokenizer().save_pretrained(tdir)
    args = ["data", "regenerate", str(sharegpt_file), "--target", str(tdir), "--max-new-tokens", "3",
            "--out", str(tmp_path / "out")]
    main(args + ["--limit", "2"])
    main(args + ["--limit", "3"])  # same key: continues the same file
    files = list((tmp_path / "out").glob("convs-*.jsonl"))
    assert len(files) == 1 and [r["id"] for r in _lines(files[0])] == ["c0", "c1", "c2"]


def test_cli_regenerate_bf16_writes_its_own_file(tmp_path, sharegpt_file, capsys):
    """--dtype bfloat16 regenerates with a bf16 copy of the target; the key records the dtype, so its
    answers never land in (or continue) the float32 corpus."""
    from conftest import make_llama, make_tokenizer

    from specdistill.cli import main

    tdir = tmp_path / "tiny"
    make_llama().save_pretrained(tdir)
    make_tokenizer().save_pretrained(tdir)
    args = ["data", "regenerate", str(sharegpt_file), "--target", str(tdir), "--max-new-tokens", "3",
            "--out", str(tmp_path / "out"), "--limit", "2"]
    main(args)
    main(args + ["--dtype", "bfloat16"])
    assert "not token-identical" in capsys.readouterr().err
    files = sorted((tmp_path / "out").glob("convs-*.jsonl"))
    assert len(files) == 2
    assert all([r["id"] for r in _lines(f)] == ["c0", "c1"] for f in files)
    with pytest.raises(SystemExit):
        main(args + ["--dtype", "float16"])  # not offered: fp16 matmuls are slow on CPUs


def test_finished_conversations_survive_an_interruption(tmp_path, tiny_target, tiny_conversations, monkeypatch):
    short = {"id": "s", "conversations": tiny_conversations[0]["conversations"][:2]}
    long = dict(tiny_conversations[1], id="l")
    real = rg.Generator.generate
    calls = []

    def flaky(self, prompts, call_index=0):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, prompts, call_index)

    monkeypatch.setattr(rg.Generator, "generate", flaky)
    out = tmp_path / "r.jsonl"
    try:
        rg.regenerate([short, long], tiny_target, out, max_new_tokens=3, batch_size=2, engine="hf")
    except KeyboardInterrupt:
        pass
    assert [r["id"] for r in _lines(out)] == ["s"]  # written the moment its only turn was done
    monkeypatch.setattr(rg.Generator, "generate", real)
    s = rg.regenerate([short, long], tiny_target, out, max_new_tokens=3, batch_size=2, engine="hf")
    assert s["skipped_done"] == 1 and [r["id"] for r in _lines(out)] == ["s", "l"]


def test_sampling_is_seeded(tmp_path, tiny_target, tiny_conversations):
    kw = {"max_new_tokens": 6, "batch_size": 2, "temperature": 1.0}
    a = rg.regenerate(tiny_conversations[:2], tiny_target, tmp_path / "a.jsonl", seed=1, **kw)
    rg.regenerate(tiny_conversations[:2], tiny_target, tmp_path / "b.jsonl", seed=1, **kw)
    rg.regenerate(tiny_conversations[:2], tiny_target, tmp_path / "c.jsonl", seed=2, **kw)
    ra, rb, rc = (_lines(tmp_path / f"{x}.jsonl") for x in "abc")
    assert a["written"] == 2 and ra == rb and ra != rc
    assert all(r["regenerated"]["temperature"] == 1.0 for r in ra)


def test_rounds_stay_full_as_conversations_finish(tmp_path, tiny_target, tiny_conversations, monkeypatch):
    """Conversations of 1 and 2 turns mixed: a finishing conversation's slot is refilled before the
    round runs, so every round but the last ones (source exhausted) has batch_size prompts."""
    convs = [dict(c, conversations=c["conversations"][:2] if i % 2 else c["conversations"])
             for i, c in enumerate(tiny_conversations[:12])]
    sizes = []
    orig = rg.Generator.generate

    def spy(self, prompts, call_index=0):
        sizes.append(len(prompts))
        return orig(self, prompts, call_index)

    monkeypatch.setattr(rg.Generator, "generate", spy)
    s = rg.regenerate(convs, tiny_target, tmp_path / "r.jsonl", max_new_tokens=2, batch_size=4, engine="hf")
    assert s["written"] == 12 and s["turns"] == 18 and sum(sizes) == 18
    assert sizes[:3] == [4, 4, 4], sizes


def test_static_engine_gives_the_hf_engines_greedy_answers(tmp_path, tiny_target, tiny_conversations, monkeypatch):
    """The static engine (preallocated cache, rows refilled in flight, packing, narrowing) writes the same
    greedy records as rounds of padded HF generate, at another batch size, with a cache small enough
    that the live columns get packed."""
    from conftest import make_llama, make_tokenizer

    from specdistill.targets import TargetModel

    model = make_llama(seed=2)
    with torch.no_grad():  # sharper than the default init, whose greedy text is one token repeated
        for w in model.parameters():
            if w.dim() == 2:
                w.mul_(6.0)
    tiny_target = TargetModel(model, make_tokenizer(), name="tiny-sharp")
    convs = [dict(c, conversations=c["conversations"][:2] if i % 3 else c["conversations"])
             for i, c in enumerate(tiny_conversations[:10])]
    kw = {"max_new_tokens": 7, "max_prompt_tokens": 200}
    h = rg.regenerate(convs, tiny_target, tmp_path / "hf.jsonl", batch_size=4, engine="hf", **kw)
    packs = []
    real_init, real_pack = rg.StaticBatch.__init__, rg.StaticBatch._pack
    monkeypatch.setattr(rg.StaticBatch, "__init__", lambda self, *a, **k: real_init(self, *a, columns=212))
    monkeypatch.setattr(rg.StaticBatch, "_pack", lambda self: (packs.append(self.t), real_pack(self))[1])
    s = rg.regenerate(convs, tiny_target, tmp_path / "st.jsonl", batch_size=3, engine="static", **kw)
    assert s["engine"] == "static" and h["engine"] == "hf" and len(packs) >= 1
    assert s["turns"] == h["turns"] == 14 and s["generated_tokens"] == h["generated_tokens"]
    a, b = (sorted(_lines(tmp_path / f"{x}.jsonl"), key=lambda r: r["id"]) for x in ("st", "hf"))
    assert a == b  # (written in another order: conversations finish at other times)
    answers = {m["value"] for r in a for m in r["conversations"] if m["from"] == "gpt"}
    assert len(answers) > 5  # varied text, not one repeated token


def test_static_engine_keeps_finished_conversations_on_interruption(tmp_path, tiny_target, tiny_conversations,
                                                                   monkeypatch):
    short = {"id": "s", "conversations": tiny_conversations[0]["conversations"][:2]}
    long = dict(tiny_conversations[1], id="l")
    real = rg.StaticBatch.step
    calls = []

    def flaky(self, tokens, active):
        calls.append(1)
        if len(calls) == 3:  # the short conversation is done (3 tokens), the long one is in its 2nd turn
            raise KeyboardInterrupt
        return real(self, tokens, active)

    monkeypatch.setattr(rg.StaticBatch, "step", flaky)
    out = tmp_path / "r.jsonl"
    with pytest.raises(KeyboardInterrupt):
        rg.regenerate([short, long], tiny_target, out, max_new_tokens=3, batch_size=2, engine="static")
    assert [r["id"] for r in _lines(out)] == ["s"]
    monkeypatch.setattr(rg.StaticBatch, "step", real)
    s = rg.regenerate([short, long], tiny_target, out, max_new_tokens=3, batch_size=2, engine="static")
    assert s["skipped_done"] == 1 and [r["id"] for r in _lines(out)] == ["s", "l"]


def test_gzip_corpus_appends_and_survives_a_torn_member(tmp_path, tiny_target, tiny_conversations):
    import gzip

    out = tmp_path / "corpus.jsonl.gz"
    rg.regenerate(tiny_conversations, tiny_target, out, max_new_tokens=3, batch_size=2, limit=2)
    first = rg.read_records(out)
    with open(out, "ab") as f:  # a crash in the middle of writing the next member
        f.write(gzip.compress(b'{"id": "c2", "conversations": []}\n')[:15])
    s = rg.regenerate(tiny_conversations, tiny_target, out, max_new_tokens=3, batch_size=2, limit=4)
    assert s["skipped_done"] == 2 and s["total_written"] == 4
    recs = [json.loads(x) for x in gzip.open(out, "rt").read().splitlines()]  # any gzip reader sees it whole
    assert [r["id"] for r in recs] == ["c0", "c1", "c2", "c3"] and recs[:2] == first
    assert out.stat().st_size < len("".join(json.dumps(r) + "\n" for r in recs))


def test_static_extend_equals_a_fresh_prefill(tiny_target):
    """A row's cached tokens extended by new ones (a finished turn + the next prompt) give the logits of
    prefilling the whole sequence anew, with another row decoding beside it, through a pack and a clock
    jump that leaves the other row's columns with a gap."""
    torch.manual_seed(0)
    dec = rg.StaticBatch(tiny_target, 2, max_prompt=40, max_new=8, columns=60)
    first, other = torch.randint(8, 80, (9,)).tolist(), torch.randint(8, 80, (5,)).tolist()
    dec.prefill(0, first)
    dec.prefill(1, other)
    fed = [[], []]
    for _ in range(6):  # both rows decode; the clock moves on
        toks = torch.randint(8, 80, (2,))
        dec.step(toks, torch.ones(2, dtype=torch.bool))
        fed[0].append(int(toks[0]))
        fed[1].append(int(toks[1]))
    more = torch.randint(8, 80, (32,)).tolist()  # more than the columns before the clock: packs, clock jumps
    got = dec.extend(0, more)
    assert got is not None and int(dec.pos[0]) == 9 + 6 + 32 and dec.t == 47
    ref = rg.StaticBatch(tiny_target, 1, max_prompt=60, max_new=8).prefill(0, first + fed[0] + more)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # both rows keep decoding correctly after the extension
    nxt = dec.step(torch.tensor([5, 6]), torch.ones(2, dtype=torch.bool))
    for row, seq in ((0, first + fed[0] + more + [5]), (1, other + fed[1] + [6])):
        solo = rg.StaticBatch(tiny_target, 1, max_prompt=60, max_new=8).prefill(0, seq)
        torch.testing.assert_close(nxt[row], solo, atol=1e-5, rtol=1e-5)
    assert dec.extend(0, list(range(8, 8 + 40))) is None  # past the row's span: the caller re-prefills
