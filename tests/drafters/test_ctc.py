"""CTC drafter: loss decreases, collapse and prefix beam search on hand-written frames, blanks never
reach the verifier, the candidate trie is deterministic, greedy verification equals the target,
sampling stays lossless, the native export reloads bit-identically (and is the only format)."""

import itertools
import math

import pytest
import torch
from conftest import make_llama, make_tokenizer

from specdistill.config import ConfigError
from specdistill.data.vocab import count_tokens, vocab_map_from_counts
from specdistill.drafters import REGISTRY
from specdistill.drafters.ctc import (
    CtcConfig,
    CtcDrafter,
    ctc_collapse,
    ctc_prefix_beam_search,
    merge_candidates,
)
from specdistill.targets import TargetModel
from specdistill.verify.proposer import ProposerOptions, ProposerState
from specdistill.verify.verifier import Verifier


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def target():
    model = make_llama(layers=4, seed=1)
    with torch.no_grad():
        model.model.norm.weight.mul_(6.0)  # a sharper next-token distribution, as in test_eagle.py
    return TargetModel(model, make_tokenizer(), name="tiny-llama-4")


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 128, (3, 20), generator=g)
    lm = torch.zeros_like(ids)
    lm[:, 6:] = 1
    lm[2, 15:] = 0
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": lm}


def _build(target, batch=None, **kw):
    cfg = CtcConfig(**kw)
    torch.manual_seed(0)
    d = CtcDrafter(cfg, target)
    d.spec = REGISTRY["ctc"]
    if cfg.draft_vocab_size:
        samples = [{"input_ids": i.tolist(), "loss_mask": m.tolist()}
                   for i, m in zip(batch["input_ids"], batch["loss_mask"])]
        d.set_vocab_map(*vocab_map_from_counts(count_tokens(samples, target.vocab_size), cfg.draft_vocab_size))
    return d


def _tout(target, d, batch):
    layers = REGISTRY["ctc"].target_layers(d.cfg, target.config)
    with torch.no_grad():
        return target(batch["input_ids"], batch["attention_mask"], layers=layers)


def _fit(d, batch, tout, steps, lr=3e-3):
    opt = torch.optim.Adam(d.trainable_parameters(), lr=lr)
    outs = []
    for _ in range(steps):
        out = d.loss(batch, tout)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        outs.append(out)
    return outs


def test_collapse_hand_written():
    B = 9
    assert ctc_collapse([1, 1, B, 1, 2, 2], B) == [1, 1, 2]
    assert ctc_collapse([B, B, B], B) == []
    assert ctc_collapse([3, B, B, 3, 3, 4, B, 4], B) == [3, 3, 4, 4]
    assert ctc_collapse([0, 0, 0], B) == [0]  # id 0 is a real token, not the blank
    assert ctc_collapse([5, 6, 5], B) == [5, 6, 5]


def test_prefix_beam_search_is_exact_on_a_small_alphabet():
    """Wide enough, the beam search returns every collapsed sequence with its summed alignment
    probability, matching an enumeration of all C^S frame paths."""
    g = torch.Generator().manual_seed(3)
    S, C, blank = 4, 4, 3
    lp = torch.log_softmax(torch.randn(S, C, generator=g) * 2, -1)
    want: dict[tuple, float] = {}
    for path in itertools.product(range(C), repeat=S):
        key = tuple(ctc_collapse(path, blank))
        want[key] = want.get(key, 0.0) + math.exp(sum(float(lp[i, c]) for i, c in enumerate(path)))
    got = ctc_prefix_beam_search(lp, blank, beam_width=1000, frame_topk=C)
    assert {p: round(math.exp(s), 9) for p, s in got} == {p: round(v, 9) for p, v in want.items()}
    best = max(want.items(), key=lambda kv: kv[1])[0]
    assert got[0][0] == best
    assert all(blank not in p for p, _ in got)


def test_merge_candidates_trie_budget_depth_deterministic():
    cands = [(1, 2, 3), (1, 2, 4), (1, 5), (6,), (1, 2, 3)]
    toks, par = merge_candidates(cands, budget=100, max_depth=10)
    assert toks == [1, 2, 3, 4, 5, 6] and par == [-1, 0, 1, 1, 0, -1]
    assert merge_candidates(cands, budget=100, max_depth=10) == (toks, par)
    assert merge_candidates(cands, budget=4, max_depth=10) == ([1, 2, 3, 4], [-1, 0, 1, 1])
    assert merge_candidates(cands, budget=100, max_depth=2) == ([1, 2, 5, 6], [-1, 0, 0, -1])
    # No two siblings ever share a token.
    kids = {}
    for t, p in zip(toks, par):
        assert t not in kids.setdefault(p, set())
        kids[p].add(t)


@pytest.mark.parametrize("kw", [dict(), dict(draft_vocab_size=48, max_ctc_positions=12)])
def test_loss_decreases_and_only_drafter_trains(target, batch, kw):
    d = _build(target, batch, **kw).train()
    before = {k: v.clone() for k, v in target.model.state_dict().items()}
    tout = _tout(target, d, batch)
    outs = _fit(d, batch, tout, steps=25)
    first, last = outs[0], outs[-1]
    assert first.num_tokens == int(d.num_loss_tokens(batch)) > 0
    assert float(last.metrics["loss_ctc"]) < 0.7 * float(first.metrics["loss_ctc"])
    assert float(last.loss.detach()) < float(first.loss.detach())
    assert all(torch.equal(v, before[k]) for k, v in target.model.state_dict().items())


def test_labels_are_the_targets_greedy_next_tokens(target, batch, monkeypatch):
    """The CTC labels of drafter index t are the target's argmax at positions t+1..t+L, cut at the end of
    the assistant span (padding row 2 stops at 15)."""
    d = _build(target, batch, ctc_label_len=3, feature_loss_weight=0, token_loss_weight=0)
    tout = _tout(target, d, batch)
    seen = {}
    import specdistill.drafters.ctc as mod

    def spy(log_probs, targets, input_lengths, target_lengths, blank, reduction):
        seen.update(targets=targets.clone(), lengths=target_lengths.clone(), blank=blank, frames=input_lengths)
        return log_probs.sum() * 0

    monkeypatch.setattr(mod.losses, "ctc", spy)
    d.loss(batch, tout)
    with torch.no_grad():
        top = target.model(batch["input_ids"]).logits.argmax(-1)
    sel = batch["loss_mask"][:, 1:].bool().clone()
    sel[:, 0] = False
    b, p = sel.nonzero(as_tuple=True)
    assert seen["blank"] == target.vocab_size  # an extra class, never token 0
    assert bool((seen["frames"] == d.cfg.ctc_frames).all())
    for r, (bi, pi) in enumerate(zip(b.tolist(), p.tolist())):
        n = 0
        while n < 3 and pi + n <= 18 and batch["loss_mask"][bi, pi + n + 1]:
            n += 1
        assert int(seen["lengths"][r]) == n
        assert seen["targets"][r, :n].tolist() == top[bi, pi:pi + n].tolist()


def _state(target, d, ids):
    hs = target(ids[None], layers=d.layer_ids).hidden_states
    return ProposerState(ids, {i: h[0, :-1] for i, h in hs.items()})


def test_hand_written_slots_collapse_into_the_tree_and_blanks_never_reach_it(target, batch, monkeypatch):
    d = _build(target, batch, draft_vocab_size=48, ctc_frames=5, ctc_label_len=3).eval()
    B = d.blank_id
    frames = [7, B, 7, 9, 9]  # -> draft ids (7, 7, 9)
    runner_up = [True]

    def fake_slots(out):
        z = torch.full((out.shape[0], 5, B + 1), -60.0)
        for s, c in enumerate(frames):
            z[:, s, c] = 0.0
            if runner_up[0]:
                z[:, s, 11] = -3.0  # a runner-up token in every frame: alternative candidates
        return z

    prop = d.proposer(target, ProposerOptions(tree=(2, 1, 1)), dtype="float32")
    monkeypatch.setattr(prop.drafter, "slot_logits", fake_slots)
    ids = batch["input_ids"][0, :10]
    tree = prop.propose(_state(target, d, ids))
    best = prop.last_candidates[0][0]
    assert best == (7, 7, 9)
    d2t = d.draft_ids
    assert tree.tokens[:3].tolist() == [int(d2t[7]), int(d2t[7]), int(d2t[9])]
    assert tree.parents[:3].tolist() == [-1, 0, 1]
    allowed = set(d2t.tolist())
    assert all(int(t) in allowed for t in tree.tokens)
    assert all(B not in c for c, _ in prop.last_candidates)
    # All frames blank: nothing to draft (an empty tree), never a blank node.
    frames[:] = [B] * 5
    runner_up[0] = False
    prop.reset(None)
    assert len(prop.propose(_state(target, d, ids))) == 0


def test_proposals_are_deterministic_and_valid(target, batch):
    d = _build(target, batch, draft_vocab_size=48, min_candidate_prob=0.0).eval()
    _fit(d.train(), batch, _tout(target, d, batch), steps=5)
    d.eval()
    ids = batch["input_ids"][1, :12]
    trees = []
    for _ in range(2):
        prop = d.proposer(target, ProposerOptions(tree=(3, 2)), dtype="float32")
        trees.append(prop.propose(_state(target, d, ids)))
    a, b = trees
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.parents, b.parents) and a.probs is None
    assert 0 < len(a) <= 9
    # The floor on a candidate's probability: an untrained drafter's spread-out sequences are not drafted.
    floor = d.proposer(target, ProposerOptions(tree=(3, 2), confidence_threshold=0.5), dtype="float32")
    assert len(floor.propose(_state(target, d, ids))) == 0
    chain = d.proposer(target, ProposerOptions(tree=(1, 1, 1)), dtype="float32")
    c = chain.propose(_state(target, d, ids))
    assert c.is_chain() and 0 < len(c) <= 3
    n = min(len(c), 2)  # the tree (3, 2) has depth 2; its first nodes are the best candidate's
    assert c.tokens[:n].tolist() == a.tokens[:n].tolist()
    default = d.proposer(target, ProposerOptions(num_draft_tokens=3), dtype="float32")
    assert default.num_candidates == d.cfg.num_candidates and default.depth == 3


@pytest.mark.parametrize("tree", [None, (3, 2, 1)])
def test_greedy_verification_is_identical_to_the_target(target, batch, tree):
    """Trained briefly on the target's own greedy continuation, the drafts are accepted (the accept and
    rollback paths run) and the output is token-identical to plain greedy decoding."""
    ver = Verifier(target)
    prompt = batch["input_ids"][1, :8]
    ref = ver.generate(prompt, None, max_new_tokens=20, eos_token_ids=[])
    seq = torch.cat([prompt, torch.tensor(ref.tokens)])[None]
    lm = torch.zeros_like(seq)
    lm[:, 8:] = 1
    regen = {"input_ids": seq, "attention_mask": torch.ones_like(seq), "loss_mask": lm}
    d = _build(target, regen, min_candidate_prob=0.0)
    _fit(d.train(), regen, _tout(target, d, regen), steps=20)
    d.eval()
    opts = ProposerOptions(num_draft_tokens=4, tree=tree or (1, 1, 1, 1))
    res = ver.generate(prompt, d.proposer(target, opts), max_new_tokens=20, eos_token_ids=[])
    assert res.tokens == ref.tokens
    assert res.tokens == ref.tokens and (tree is not None or all(n <= 4 for n in res.draft_size_per_step))
    assert max(res.draft_accepted_per_step) >= (2 if tree else 1)
    assert res.steps < len(ref.tokens)
    # An untrained drafter (drafts mostly rejected) is identical too.
    d0 = _build(target, batch, draft_vocab_size=48, min_candidate_prob=0.0).eval()
    res0 = ver.generate(prompt, d0.proposer(target, opts), max_new_tokens=12, eos_token_ids=[])
    assert res0.tokens == ref.tokens[:12] and sum(res0.draft_size_per_step) > 0


def test_sampling_through_the_verifier_matches_the_target():
    """probs=None (deterministic candidates): the first two sampled tokens follow the target (chi-square)."""
    from test_verify import V, assert_matches, sharp_target, target_rows

    tgt = sharp_target(vocab_size=V, hidden=32, seed=11, scale=4.0)
    d = CtcDrafter(CtcConfig(ctc_frames=3, ctc_label_len=2, beam_width=4, num_candidates=3, min_candidate_prob=0.0),
                   tgt).eval()
    with torch.no_grad():
        d.blank_bias.fill_(-5.0)  # frames non-blank: every step drafts a real tree
    ver = Verifier(tgt)
    prompt = [1, 4, 2, 5]
    p1, p2 = target_rows(tgt, prompt, 0.9, 0)
    prop = d.proposer(tgt, ProposerOptions(tree=(3, 1)), dtype="float32")
    counts = torch.zeros(V * V)
    for s in range(500):
        res = ver.generate(prompt, prop, max_new_tokens=3, temperature=0.9, seed=s, eos_token_ids=())
        counts[res.tokens[0] * V + res.tokens[1]] += 1
    assert_matches(counts, (p1[:, None] * p2).flatten())


def test_native_export_reloads_bit_identical_and_is_the_only_format(tmp_path, target, batch):
    from specdistill import export, loading
    from specdistill.config import ExportConfig

    d = _build(target, batch, draft_vocab_size=48)
    _fit(d.train(), batch, _tout(target, d, batch), steps=3)
    d.eval()
    assert d.export_formats() == ("native",)
    written = export.write(d, ExportConfig(formats=[], dtype="float32"), tmp_path, target)
    assert set(written) == {"native"}
    back = loading.load_drafter(written["native"], target)
    sd, sd2 = d.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert torch.equal(back.draft_ids, d.draft_ids) and back.blank_id == d.blank_id == 48
    o = torch.randn(2, target.hidden_size)
    with torch.no_grad():
        assert torch.equal(back.slot_logits(o), d.slot_logits(o))
    with pytest.raises(ValueError, match="does not support 'vllm'"):
        export.write(d, ExportConfig(formats=["vllm"]), tmp_path / "v", target)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="ctc_label_len"):
        CtcConfig(ctc_frames=2, ctc_label_len=3)
    with pytest.raises(ConfigError, match="ctc_frames"):
        CtcConfig(ctc_frames=0)
    with pytest.raises(ConfigError, match="layer_ids"):
        CtcConfig(layer_ids=[1, 2])


def test_recipe_trains_exports_native_and_scores(tmp_path):
    """recipes/ctc.py end to end on the tiny run inputs: train, a native export only, eval.json greedy-identical."""
    import json
    import runpy

    from conftest import write_tiny_run_inputs

    from specdistill import config

    tgt, convs, questions = write_tiny_run_inputs(tmp_path)
    out = tmp_path / "run"
    main = runpy.run_path(str(config.REPO_ROOT / "recipes" / "ctc.py"), run_name="recipe")["main"]
    main([f"target.name={tgt}", f"data.source={convs}", f"data.prepared_dir={tmp_path / 'prepared'}",
          "data.max_length=64", "data.val_fraction=0.1", "data.min_loss_tokens=2", "drafter.draft_vocab_size=48",
          "drafter.max_ctc_positions=16", f"train.output_dir={out}", "train.max_steps=3", "train.micro_batch_size=2",
          "train.save_every=3", "train.eval_every=0", "train.trackers=[none]", "train.progress=false",
          "train.mixed_precision=no", "train.max_minutes=0", f"eval.questions={questions}",
          "eval.limit_per_category=0", "eval.max_new_tokens=8", "export.dtype=float32"])
    exported = sorted(p.name for p in (out / "export").iterdir())
    assert exported == ["native"]
    ev = json.loads((out / "export" / "native" / "eval.json").read_text())
    assert ev["overall"]["identical_to_greedy"] is True


@pytest.mark.embedded
def test_overfit_on_real_target_drafts_the_memorised_continuation():
    """On the embedded SmolLM2 (id 0 is <|endoftext|>, so the blank is the extra id Vd = 512): after
    overfitting one greedy continuation, the best CTC candidate from verifier-style states reproduces
    it for >= 2 tokens on average, and the trie verifies token-identically to greedy decoding."""
    from specdistill import targets

    target = targets.load("default")
    enc = target.tokenizer.apply_chat_template([{"role": "user", "content": "Write a short story about a cat."}],
                                               add_generation_prompt=True, return_tensors="pt")
    prompt = (enc["input_ids"] if hasattr(enc, "keys") else enc)[0]
    ver = Verifier(target)
    ref = ver.generate(prompt, None, max_new_tokens=24, eos_token_ids=[])
    seq = torch.cat([prompt, torch.tensor(ref.tokens)])
    p = prompt.numel()
    lm = torch.zeros_like(seq)
    lm[p:] = 1
    b = {"input_ids": seq[None], "attention_mask": torch.ones_like(seq)[None], "loss_mask": lm[None]}
    d = _build(target, b, draft_vocab_size=512, min_candidate_prob=0.0)
    assert d.blank_id == 512 and d.layer_ids == [target.num_layers]
    tout = _tout(target, d, b)
    _fit(d.train(), b, tout, steps=40, lr=1e-3)
    d.eval()
    hs = {i: h[0] for i, h in tout.hidden_states.items()}
    pr = d.proposer(target, ProposerOptions(tree=(1, 1, 1)), dtype="float32")
    accepted = []
    for n in range(p + 1, seq.numel() - 3):
        pr.reset(None)
        draft = pr.propose(ProposerState(seq[:n], {i: h[:n - 1] for i, h in hs.items()}))
        k = 0
        while k < len(draft) and draft.tokens[k] == seq[n + k]:
            k += 1
        accepted.append(k)
    assert sum(accepted) / len(accepted) >= 2.0, accepted
    res = ver.generate(prompt, d.proposer(target, ProposerOptions(num_draft_tokens=4)), max_new_tokens=24,
                       eos_token_ids=[])
    assert res.tokens == ref.tokens and res.steps < len(ref.tokens) / 2
