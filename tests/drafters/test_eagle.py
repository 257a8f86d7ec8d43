"""EAGLE family: losses decrease, only drafter params train, TTT uses the drafter's own outputs and
matches decode-time attention, vocab maps round-trip, proposers give valid trees and are lossless."""

import pytest
import torch
from conftest import make_llama, make_tokenizer
from safetensors.torch import load_file, save_file

from specdistill.config import ConfigError
from specdistill.data.vocab import count_tokens, vocab_map_from_counts
from specdistill.drafters import REGISTRY
from specdistill.drafters.eagle import EagleConfig, EagleDrafter
from specdistill.targets import TargetModel
from specdistill.verify.proposer import ProposerState

LAYERS3 = [1, 2, 3]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny matmuls gain nothing from threads, and on a shared, loaded CPU the OpenMP barrier waits
    # made them ~50x slower; restored afterwards so other test modules keep their setting.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def target():
    # 4 layers so EAGLE-3 has distinct low/mid/high features; seeded, built in-process. A random
    # llama's next-token distribution is nearly uniform; scaling the final norm sharpens it to
    # something like a trained model's, so divergences are large enough to measure learning.
    model = make_llama(layers=4, seed=1)
    with torch.no_grad():
        model.model.norm.weight.mul_(6.0)
    return TargetModel(model, make_tokenizer(), name="tiny-llama-4")


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 128, (3, 20), generator=g)
    lm = torch.zeros_like(ids)
    lm[:, 6:] = 1
    lm[2, 15:] = 0  # a shorter sample: right padding carries no loss
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": lm}


def _samples(batch):
    return [{"input_ids": i.tolist(), "loss_mask": m.tolist()} for i, m in zip(batch["input_ids"], batch["loss_mask"])]


def _build(target, batch, **kw):
    kw.setdefault("layer_ids", LAYERS3 if kw.get("variant", "eagle3") == "eagle3" else [])
    cfg = EagleConfig(**kw)
    torch.manual_seed(0)
    d = EagleDrafter(cfg, target)
    if cfg.draft_vocab_size:
        d.set_vocab_map(*vocab_map_from_counts(count_tokens(_samples(batch), target.vocab_size), cfg.draft_vocab_size))
    return d


def _target_out(target, d, batch, logits=False):
    layers = REGISTRY["eagle"].target_layers(d.cfg, target.config)
    return target(batch["input_ids"], batch["attention_mask"], layers=layers, return_logits=logits)


VARIANTS = {
    "eagle1": dict(variant="eagle1", feature_noise=0.1),
    "eagle3": dict(variant="eagle3", draft_vocab_size=64),
    "eagle3_hass": dict(variant="eagle3", draft_vocab_size=64, hass_topk=8, hass_align_steps=4),
    "eagle1_hass": dict(variant="eagle1", hass_topk=8, hass_align_steps=3),
    "eagle1_small_vocab": dict(variant="eagle1", draft_vocab_size=64),
}


def _fit(d, batch, tout, steps: int, lr: float) -> list:
    """A few Adam steps on a fixed batch (the test's own loop; the product's lives in train/).
    Returns each step's LossOutput (taken before that step's update)."""
    opt = torch.optim.Adam(d.trainable_parameters(), lr=lr)
    outs = []
    for _ in range(steps):
        out = d.loss(batch, tout)
        opt.zero_grad()
        (out.loss / out.num_tokens).backward()
        opt.step()
        outs.append(out)
    return outs


@pytest.mark.parametrize("name", list(VARIANTS))
def test_loss_decreases_and_only_drafter_trains(target, batch, name):
    d = _build(target, batch, **VARIANTS[name])
    tout = _target_out(target, d, batch)
    target_before = {k: v.clone() for k, v in target.state_dict().items()}
    params_before = {k: v.detach().clone() for k, v in d.named_parameters()}
    hist = [((o.loss / o.num_tokens).item(), o.metrics["loss_token_step0"].item() / o.num_tokens)
            for o in _fit(d, batch, tout, steps=30, lr=3e-3)]
    (first, first_tok), (last, last_tok) = hist[0], hist[-1]
    assert last < first, (name, first, last)
    # The token loss (a divergence, 0 at a perfect match) must fall by a lot; the total can have a
    # floor (EAGLE-1's feature loss, HASS's top-K cross-entropy includes the target's entropy).
    assert last_tok < 0.7 * first_tok, (name, first_tok, last_tok)
    for k, v in target.state_dict().items():
        assert torch.equal(v, target_before[k]), k
    changed = [k for k, v in d.named_parameters() if not torch.equal(v, params_before[k])]
    assert set(changed) == set(params_before), set(params_before) - set(changed)
    # The target's tensors are never parameters or saved state of the drafter.
    assert not any(k.startswith(("embed", "target_")) for k in d.state_dict())
    target_ptrs = {t.data_ptr() for t in target.parameters()}
    assert not any(p.data_ptr() in target_ptrs for p in d.parameters())
    # Not even as buffers: DDP would re-broadcast the 2 x 113 MB embedding/head every step.
    assert not any(bf.data_ptr() in target_ptrs for bf in d.buffers())


def test_loss_contract_sums_and_metrics(target, batch):
    d = _build(target, batch, variant="eagle3", draft_vocab_size=64, ttt_steps=2)
    out = d.loss(batch, _target_out(target, d, batch))
    # Loss positions: loss_mask[p+1] == 1 with p >= 1.
    expected = int(batch["loss_mask"][:, 2:].sum())
    assert out.num_tokens == expected == int(d.num_loss_tokens(batch))
    assert int(out.metrics["tokens_step0"]) == expected
    assert int(out.metrics["tokens_step1"]) <= expected
    assert set(k for k in out.metrics if k.startswith("correct_step")) == {"correct_step0", "correct_step1"}
    # Using precomputed target logits gives the same loss as recomputing them from last_hidden.
    out2 = d.loss(batch, _target_out(target, d, batch, logits=True))
    assert torch.allclose(out.loss, out2.loss, atol=1e-4)


def test_ttt_step_feeds_own_previous_output(target, batch, monkeypatch):
    d = _build(target, batch, variant="eagle3", draft_vocab_size=64, ttt_steps=3)
    seen_in, seen_out = [], []
    orig_step_input, orig_layers = d.step_input, d.layers_forward

    def step_input(features, embed, step):
        seen_in.append((step, features))
        return orig_step_input(features, embed, step)

    def layers_forward(*a, **k):
        out, kv = orig_layers(*a, **k)
        seen_out.append(out)
        return out, kv

    monkeypatch.setattr(d, "step_input", step_input)
    monkeypatch.setattr(d, "layers_forward", layers_forward)
    tout = _target_out(target, d, batch)
    d.loss(batch, tout)
    assert [s for s, _ in seen_in] == [0, 1, 2]
    feats = d.target_features(tout.hidden_states)[:, :-1]
    assert torch.equal(seen_in[0][1], feats)
    for j in (1, 2):
        assert seen_in[j][1] is seen_out[j - 1], f"step {j} must read step {j - 1}'s own output"
        assert not torch.allclose(seen_in[j][1], d.fc(feats))


@pytest.mark.parametrize("variant", ["eagle1", "eagle3"])
def test_ttt_attention_matches_decode_time_drafting(target, batch, variant, monkeypatch):
    """Unrolled step j at index t must equal what the proposer computes when drafting position t+j
    after committing positions 0..t with target features (extended causal+diagonal attention)."""
    kw = dict(variant=variant, ttt_steps=3) if variant == "eagle3" else dict(variant=variant, hass_align_steps=3)
    d = _build(target, batch, **kw)
    outs = []
    orig = d.layers_forward
    monkeypatch.setattr(d, "layers_forward", lambda *a, **k: (lambda r: (outs.append(r[0]), r)[1])(orig(*a, **k)))
    tout = _target_out(target, d, batch)
    d.loss(batch, tout)
    monkeypatch.setattr(d, "layers_forward", orig)
    ids = batch["input_ids"][0]
    hs = {i: h[0] for i, h in tout.hidden_states.items()}
    t = 9
    pr = d.proposer(target, mode="chain", k=1, dtype="float32")
    with torch.no_grad():
        pr._commit(ProposerState(ids[: t + 2], {i: h[: t + 1] for i, h in hs.items()}))
        assert torch.allclose(pr.last_out, outs[0][0, t], atol=1e-5)
        out = pr.last_out
        for j in (1, 2):
            tok = ids[t + 1 + j].view(1, 1)
            emb = d.embed(tok)
            # _run writes the new position's keys/values into the preallocated draft cache itself
            o = pr._run(d.step_input(out[None, None], emb, 1), emb, torch.tensor([t + j]), None)
            out = o[0, -1]
            assert torch.allclose(out, outs[j][0, t], atol=1e-5), f"step {j}"


def test_vocab_map_round_trip(tmp_path, target, batch):
    counts = count_tokens(_samples(batch), target.vocab_size)
    d2t, t2d = vocab_map_from_counts(counts, 40)
    tid = torch.arange(40) + d2t
    assert torch.equal(t2d.nonzero().flatten(), tid)  # draft ids follow target-id order
    d = _build(target, batch, variant="eagle3", draft_vocab_size=40)
    assert torch.equal(d.draft_ids, tid)
    assert torch.equal(d.lm_head.weight, target.lm_head.weight[tid])  # head rows start from the target's
    sd = d.export_state_dict()
    assert sd["d2t"].dtype == torch.int64 and sd["t2d"].dtype == torch.bool
    assert sd["lm_head.weight"].shape == (40, target.hidden_size)
    save_file({k: v.contiguous() for k, v in d.state_dict().items()}, str(tmp_path / "d.safetensors"))
    fresh = EagleDrafter(d.cfg, target)
    fresh.load_state_dict(load_file(str(tmp_path / "d.safetensors")))
    assert torch.equal(fresh.draft_ids, tid) and torch.equal(fresh.t2d, t2d)


def test_reduced_vocab_without_map_is_an_error(target, batch):
    d = EagleDrafter(EagleConfig(layer_ids=LAYERS3, draft_vocab_size=32), target)
    with pytest.raises(RuntimeError, match="set_vocab_map"):
        d.loss(batch, _target_out(target, d, batch))
    with pytest.raises(ValueError, match="vocab map"):
        d.set_vocab_map(torch.zeros(31, dtype=torch.int64), torch.zeros(128, dtype=torch.bool))


def test_config_errors_name_the_key(target):
    with pytest.raises(ConfigError, match="drafter.variant"):
        EagleConfig(variant="eagle2")
    with pytest.raises(ConfigError, match="drafter.feature_loss_weight"):
        EagleConfig(variant="eagle3", feature_loss_weight=1.0)
    with pytest.raises(ConfigError, match="drafter.layer_ids"):
        EagleDrafter(EagleConfig(layer_ids=[1, 2, 9]), target)
    with pytest.raises(ConfigError, match="drafter.layer_ids"):
        EagleDrafter(EagleConfig(), target)  # 4 layers: defaults [2, 2, 1] collide
    assert EagleConfig(variant="eagle1").resolved_layer_ids(30) == [30]
    assert EagleConfig().resolved_layer_ids(30) == [2, 15, 27]
    assert EagleConfig(hass_align_steps=4).unroll_steps() == 4
    assert EagleConfig(variant="eagle1", hass_align_steps=3).unroll_steps() == 3
    assert EagleConfig(variant="eagle1").unroll_steps() == 1
    assert EagleConfig(variant="eagle1").token_weight() == 0.1


def test_to_dtype_reaches_frozen_target_tensors(target, batch):
    d = _build(target, batch, variant="eagle1")
    h = d.to(torch.bfloat16)
    assert h.embed_weight.dtype == torch.bfloat16 and h.target_head is h.embed_weight  # tied stays tied
    assert target.embed_tokens.weight.dtype == torch.float32  # the target itself is untouched


def test_bf16_autocast_loss_is_finite_and_backprops(target, batch):
    d = _build(target, batch, variant="eagle3", draft_vocab_size=64, hass_topk=4)
    tout = _target_out(target, d, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = d.loss(batch, tout)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert d.fc.weight.grad is not None and torch.isfinite(d.fc.weight.grad).all()


def _check_tree(tree, t2d, max_nodes, max_depth):
    n = len(tree)
    assert 0 < n <= max_nodes
    assert tree.parents.shape == tree.tokens.shape
    depth = []
    for i, p in enumerate(tree.parents.tolist()):
        assert -1 <= p < i
        depth.append(1 if p < 0 else depth[p] + 1)
    assert max(depth) <= max_depth
    assert bool(t2d[tree.tokens].all()), "draft tokens must be target ids inside the draft vocabulary"


def test_proposer_chain_and_tree_shapes(target, batch):
    d = _build(target, batch, variant="eagle3", draft_vocab_size=64)
    ids = batch["input_ids"][0]
    tout = _target_out(target, d, batch)
    hs = {i: h[0, :11] for i, h in tout.hidden_states.items()}
    chain = d.proposer(target, mode="chain", k=5)
    assert chain.target_layers == tuple(LAYERS3)
    c = chain.propose(ProposerState(ids[:12], hs))
    assert c.is_chain() and len(c) == 5
    _check_tree(c, d.t2d, 5, 5)
    tree = d.proposer(target, mode="tree", topk=3, budget=10, depth=4)
    tr = tree.propose(ProposerState(ids[:12], hs))
    _check_tree(tr, d.t2d, 10, 4)
    assert not tr.is_chain()
    # The chain's first token is the tree's best root child (both are greedy from the same state).
    assert tr.tokens[0] == c.tokens[0]
    # A second call with fewer new positions than expected is a clear error, not silent drift.
    with pytest.raises(ValueError, match="positions"):
        chain.propose(ProposerState(ids[:14], {i: h[:1] for i, h in hs.items()}))


@pytest.mark.parametrize("mode", ["chain", "tree"])
@pytest.mark.parametrize("variant", ["eagle1", "eagle3"])
def test_proposer_in_greedy_verifier_is_lossless(target, batch, mode, variant):
    from specdistill.verify.verifier import Verifier

    kw = dict(variant=variant, draft_vocab_size=64) if variant == "eagle3" else dict(variant=variant)
    if variant == "eagle1" and mode == "tree":
        kw["draft_vocab_size"] = 48  # EAGLE-1 with a reduced vocabulary slices the frozen target head
    d = _build(target, batch, **kw).eval()
    # A little training so drafts are sometimes right and the accept/rollback paths all run.
    tout = _target_out(target, d, batch)
    _fit(d, batch, tout, steps=10, lr=3e-3)
    ver = Verifier(target)
    prompt = batch["input_ids"][1, :8]
    ref = ver.generate(prompt, None, max_new_tokens=24, eos_token_ids=[])
    res = ver.generate(prompt, d.proposer(target, mode=mode, k=4, topk=3, budget=8, depth=3),
                       max_new_tokens=24, eos_token_ids=[])
    assert res.tokens == ref.tokens
    assert res.steps < 24 + 1


def test_self_target_is_fully_accepted_on_eagle1(target):
    """An EAGLE-1 drafter whose layer reproduces the target's last layer would be exact; here we
    at least check the registry wiring: spec fields and export formats."""
    spec = REGISTRY["eagle"]
    assert spec.config_cls is EagleConfig
    assert set(spec.export_formats) == {"native", "sglang", "vllm"}
    assert "2503.01840" in spec.paper and "2408.15766" in spec.paper


@pytest.mark.embedded
def test_overfit_on_real_target_drafts_the_memorised_continuation():
    """On the embedded SmolLM2 target: after overfitting one greedy continuation, the chain drafted
    from the verifier-style state (target features of the committed prefix) reproduces it for about
    as many tokens as training-time-test steps were trained. Catches layer-id, position or
    train/decode attention mismatches that tiny random targets cannot show."""
    from specdistill import targets

    target = targets.load("default")
    tok = target.tokenizer
    enc = tok.apply_chat_template([{"role": "user", "content": "Write a short story about a cat."}],
                                  add_generation_prompt=True, return_tensors="pt")
    prompt = (enc["input_ids"] if hasattr(enc, "keys") else enc)[0]
    with torch.no_grad():
        seq = target.model.generate(prompt[None], max_new_tokens=24, do_sample=False)[0]
    p = prompt.numel()
    lm = torch.zeros_like(seq)
    lm[p:] = 1
    b = {"input_ids": seq[None], "attention_mask": torch.ones_like(seq)[None], "loss_mask": lm[None]}
    d = EagleDrafter(EagleConfig(variant="eagle3", draft_vocab_size=512, ttt_steps=3), target)
    d.set_vocab_map(*vocab_map_from_counts(count_tokens(_samples(b), target.vocab_size), 512))
    assert d.layer_ids == [2, 15, 27]
    tout = target(b["input_ids"], b["attention_mask"], layers=d.layer_ids, return_logits=False)
    _fit(d, b, tout, steps=40, lr=1e-3)
    d.eval()
    hs = {i: h[0] for i, h in tout.hidden_states.items()}
    pr = d.proposer(target, mode="chain", k=3, dtype="float32")
    accepted = []
    for n in range(p + 1, seq.numel() - 3):
        pr.reset(None)
        draft = pr.propose(ProposerState(seq[:n], {i: h[:n - 1] for i, h in hs.items()}))
        k = 0
        while k < 3 and draft.tokens[k] == seq[n + k]:
            k += 1
        accepted.append(k)
    assert sum(accepted) / len(accepted) >= 2.0, accepted


@pytest.mark.parametrize("j", [1, 2, 3])
def test_ttt_attention_equals_masked_sdpa(j, monkeypatch):
    """The diagonal TTT attention equals SDPA over [step-0 keys, keys of steps 1..j] with the
    causal-then-diagonal mask, in value and in gradients (GQA: 4 query heads over 2 kv heads)."""
    import torch.nn.functional as F
    from transformers import LlamaConfig

    from specdistill.drafters import layers as layers_mod
    from specdistill.drafters.layers import DraftAttention

    lc = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    attn = DraftAttention(lc, 32)
    g = torch.Generator().manual_seed(j)
    b, t, d = 2, 7, 8
    q, k, v = (torch.randn(b, n, t, d, generator=g, requires_grad=True) for n in (4, 2, 2))
    k0, v0 = (torch.randn(b, 2, t, d, generator=g, requires_grad=True) for _ in range(2))
    hk = [torch.randn(b, 2, t, d, generator=g, requires_grad=True) for _ in range(j - 1)]
    hv = [torch.randn(b, 2, t, d, generator=g, requires_grad=True) for _ in range(j - 1)]
    i = torch.arange(t)
    mask = torch.cat([i[None, :] <= i[:, None]] + [i[None, :] == i[:, None]] * j, 1)
    ref = F.scaled_dot_product_attention(q, torch.cat([k0] + hk + [k], 2), torch.cat([v0] + hv + [v], 2),
                                         attn_mask=mask, enable_gqa=True)
    dk = torch.stack(hk, 3) if hk else None
    dv = torch.stack(hv, 3) if hv else None
    leaves = [q, k, v, k0, v0] + hk + hv
    w = torch.randn(ref.shape, generator=g)
    g_ref = torch.autograd.grad((ref * w).sum(), leaves)
    # on CPU the flash-kernel path; then the materialised path that other devices take
    for path in ("flash", "materialised"):
        if path == "materialised":
            monkeypatch.setattr(layers_mod.TTTAttention, "apply", layers_mod.ttt_attention_materialised)
        got = attn._ttt_attention(q, k, v, k0, dk, v0, dv)
        assert torch.allclose(got, ref, atol=1e-5), path
        g_got = torch.autograd.grad((got * w).sum(), leaves)
        for a, c in zip(g_got, g_ref):
            assert torch.allclose(a, c, atol=1e-5), path


def test_ttt_attention_bf16_close_to_fp32():
    """Under bf16 autocast the flash-kernel TTT attention stays within bf16 rounding of the fp32 value,
    gradients included (the merge through the log-sum-exp is accumulated in fp32)."""
    from transformers import LlamaConfig

    from specdistill.drafters.layers import DraftAttention

    lc = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    attn = DraftAttention(lc, 64)
    g = torch.Generator().manual_seed(0)
    b, t, d = 2, 33, 16
    q, k, v = (torch.randn(b, n, t, d, generator=g) for n in (4, 2, 2))
    k0, v0 = (torch.randn(b, 2, t, d, generator=g) for _ in range(2))
    dk, dv = (torch.randn(b, 2, t, 1, d, generator=g) for _ in range(2))
    w = torch.randn(b, 4, t, d, generator=g)
    outs, grads = [], []
    for dt in (torch.float32, torch.bfloat16):
        leaves = [x.to(dt).requires_grad_() for x in (q, k, v, k0, dk, v0, dv)]
        out = attn._ttt_attention(*leaves)
        assert out.dtype == dt
        outs.append(out.float())
        grads.append([x.float() for x in torch.autograd.grad((out.float() * w).sum(), leaves)])
    assert (outs[0] - outs[1]).abs().max() < 0.05
    for a, c in zip(*grads):
        assert (a - c).abs().max() <= 0.05 * a.abs().max() + 0.05


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_drafted_tokens_are_embedded_by_their_target_id(target, batch, mode, monkeypatch):
    """With a reduced vocabulary, a draft step reads the embedding of the drafted token's *target*
    id. Here the 32 draft ids map to target ids 96..127, so reading row `draft id` would be caught
    (it was a bug: chain/tree positions >= 2 read unrelated embeddings and were almost never accepted)."""
    d = _build(target, batch, variant="eagle3", draft_vocab_size=32)
    t2d = torch.zeros(target.vocab_size, dtype=torch.bool)
    t2d[96:128] = True
    d.set_vocab_map(torch.full((32,), 96), t2d)
    ids = batch["input_ids"][0]
    tout = _target_out(target, d, batch)
    hs = {i: h[0, :10] for i, h in tout.hidden_states.items()}
    kw = {"mode": "chain", "k": 4} if mode == "chain" else {"mode": "tree", "depth": 3, "topk": 2, "budget": 6}
    pr = d.proposer(target, dtype="float32", **kw)
    pr.reset()
    pr._commit(ProposerState(ids[:11], hs))
    seen = []
    orig = d.embed
    monkeypatch.setattr(d, "embed", lambda x: (seen.append(x.flatten().tolist()), orig(x))[1])
    tree = pr.propose(ProposerState(ids[:11], {}))
    flat = [t for call in seen for t in call]
    assert flat and all(96 <= t < 128 for t in flat), flat
    if mode == "chain":
        assert flat == tree.tokens[:-1].tolist()


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_confidence_threshold_shortens_drafts_and_stays_lossless(target, batch, mode):
    """min_prob (eval --draft-confidence): drafts keep only tokens (chain) or nodes (tree) whose
    probability reaches it (a chain keeps a prefix of its full draft), an unreachable threshold gives empty drafts (plain
    decoding steps), and greedy output is unchanged."""
    from specdistill.verify.verifier import Verifier

    d = _build(target, batch, variant="eagle3", draft_vocab_size=64).eval()
    _fit(d, batch, _target_out(target, d, batch), steps=10, lr=3e-3)
    ids = batch["input_ids"][0]
    hs = {i: h[0, :11] for i, h in _target_out(target, d, batch).hidden_states.items()}
    kw = dict(mode=mode, k=5, topk=3, budget=10, depth=4, dtype="float32")
    full = d.proposer(target, **kw).propose(ProposerState(ids[:12], hs))
    pr = d.proposer(target, min_prob=0.3, **kw)
    cut = pr.propose(ProposerState(ids[:12], hs))
    assert len(cut) <= len(full)
    if mode == "chain":
        assert cut.tokens.tolist() == full.tokens[: len(cut)].tolist()
    assert len(d.proposer(target, min_prob=0.999999, **kw).propose(ProposerState(ids[:12], hs))) == 0
    ver = Verifier(target)
    prompt = batch["input_ids"][1, :8]
    ref = ver.generate(prompt, None, max_new_tokens=20, eos_token_ids=[])
    for p in (0.3, 0.999999):
        res = ver.generate(prompt, d.proposer(target, min_prob=p, **kw), max_new_tokens=20, eos_token_ids=[])
        assert res.tokens == ref.tokens
    with pytest.raises(ValueError, match="min_prob"):
        d.proposer(target, min_prob=1.0, **kw)


def test_proposer_maps_the_verifier_options_and_keeps_eagle_overrides(target, batch):
    """Drafter protocol: proposer(target, ProposerOptions) maps a chain to k, a tree (3, 2) to depth 2,
    topk 3 and budget 3 + 3*2 = 9, the confidence threshold to min_prob; keyword overrides win."""
    import math

    from specdistill.verify.proposer import ProposerOptions

    d = _build(target, batch, variant="eagle3")
    p = d.proposer(target, ProposerOptions(num_draft_tokens=3))
    assert (p.mode, p.k, p.min_logp) == ("chain", 3, -math.inf)
    p = d.proposer(target, ProposerOptions(tree=(3, 2), confidence_threshold=0.25))
    assert (p.mode, p.depth, p.topk, p.budget) == ("tree", 2, 3, 9) and p.min_logp == math.log(0.25)
    p = d.proposer(target, ProposerOptions(tree=(3, 2)), budget=4, dtype="float32")
    assert (p.mode, p.budget, p.depth) == ("tree", 4, 2)
    p = d.proposer(target)  # no options: EagleProposer's own defaults
    assert (p.mode, p.k) == ("chain", 5)


def test_fit_builds_the_draft_vocabulary_from_label_frequencies(target, batch):
    """Drafter protocol: fit() installs the top-Vd label tokens as the draft vocabulary (so the loss
    runs), and leaves a full-vocabulary drafter untouched."""
    d = EagleDrafter(EagleConfig(layer_ids=LAYERS3, draft_vocab_size=32), target)
    assert not bool(d.vocab_map_ready)
    d.fit(_samples(batch), target)  # no data_key: nothing is cached on disk
    want_d2t, want_t2d = vocab_map_from_counts(count_tokens(_samples(batch), target.vocab_size), 32)
    assert bool(d.vocab_map_ready) and torch.equal(d.d2t, want_d2t) and torch.equal(d.t2d, want_t2d)
    assert torch.isfinite(d.loss(batch, _target_out(target, d, batch)).loss)
    full = EagleDrafter(EagleConfig(layer_ids=LAYERS3), target)
    before = {k: v.clone() for k, v in full.state_dict().items()}
    full.fit(_samples(batch), target)
    assert all(torch.equal(before[k], v) for k, v in full.state_dict().items())


def test_export_info_and_engine_map_load(target, batch):
    """export_info() carries what the EAGLE writers read; an engine-export state dict (d2t/t2d, no
    readiness flag) installs the map through load_state_dict, and an inconsistent one is refused."""
    d = _build(target, batch, variant="eagle3", draft_vocab_size=48)
    info = d.export_info()
    assert info["variant"] == "eagle3" and info["layer_ids"] == LAYERS3 and info["draft_vocab_size"] == 48
    assert info["num_target_layers"] == 4 and info["vocab_size"] == 128 and info["num_layers"] == 1
    assert info["unroll_steps"] == 3 and info["llama_config"].hidden_size == target.hidden_size
    assert _build(target, batch, variant="eagle1").export_info()["variant"] == "eagle1"
    sd = d.export_state_dict()
    assert "vocab_map_ready" not in sd
    fresh = EagleDrafter(d.cfg, target)
    assert not bool(fresh.vocab_map_ready)
    fresh.load_state_dict(sd, strict=False)
    assert bool(fresh.vocab_map_ready) and torch.equal(fresh.draft_ids, d.draft_ids)
    bad = dict(sd, d2t=torch.zeros_like(sd["d2t"]))  # every draft id -> target id i: disagrees with t2d
    with pytest.raises(ValueError, match="vocab map is inconsistent"):
        EagleDrafter(d.cfg, target).load_state_dict(bad, strict=False)


# --- EAGLE-3.1 options (fc_norm, norm_output; speculators PR 610, SpecForge PR 568) -------------------


@pytest.mark.parametrize("flag", ["fc_norm", "norm_output"])
def test_eagle31_flag_changes_the_function_and_decode_matches_training(target, batch, flag, monkeypatch):
    """Off by default (same weights and loss as before); on, fc_norm changes step 0 through learnt
    per-layer norms and norm_output changes only the unrolled steps (they read norm(out)); the proposer
    drafts exactly what the unrolled training steps compute."""
    kw = dict(variant="eagle3", draft_vocab_size=64, ttt_steps=3)
    off, on = _build(target, batch, **kw), _build(target, batch, **kw, **{flag: True})
    assert EagleConfig().fc_norm is False and EagleConfig().norm_output is False
    sd_off, sd_on = off.state_dict(), on.state_dict()
    assert all(torch.equal(sd_on[k], v) for k, v in sd_off.items())
    assert sorted(set(sd_on) - set(sd_off)) == (["fc_norm.0.weight", "fc_norm.1.weight", "fc_norm.2.weight"]
                                                if flag == "fc_norm" else [])
    tout = _target_out(target, off, batch)
    m_off, m_on = off.loss(batch, tout).metrics, on.loss(batch, tout).metrics
    step0_same = torch.allclose(m_off["loss_token_step0"], m_on["loss_token_step0"])
    assert step0_same == (flag == "norm_output")
    assert not torch.allclose(m_off["loss_token_step1"], m_on["loss_token_step1"])
    if flag == "fc_norm":
        with torch.no_grad():
            on.fc_norm[1].weight.mul_(3.0)  # the learnt weight is used, on its own layer's slice
        assert not torch.allclose(on.loss(batch, tout).metrics["loss_token_step0"], m_on["loss_token_step0"])
        on.zero_grad()
        out = on.loss(batch, tout)
        out.loss.backward()
        assert all(n.weight.grad is not None and n.weight.grad.abs().sum() > 0 for n in on.fc_norm)
        on.zero_grad()
    outs = []
    orig = on.layers_forward
    monkeypatch.setattr(on, "layers_forward", lambda *a, **k: (lambda r: (outs.append(r[0]), r)[1])(orig(*a, **k)))
    with torch.no_grad():
        on.loss(batch, tout)
    monkeypatch.setattr(on, "layers_forward", orig)
    ids = batch["input_ids"][0]
    hs = {i: h[0] for i, h in tout.hidden_states.items()}
    t = 9
    pr = on.proposer(target, mode="chain", k=1, dtype="float32")
    with torch.no_grad():
        pr._commit(ProposerState(ids[: t + 2], {i: h[: t + 1] for i, h in hs.items()}))
        assert torch.allclose(pr.last_out, outs[0][0, t], atol=1e-5)
        out = pr.last_out
        for j in (1, 2):
            emb = on.embed(ids[t + 1 + j].view(1, 1))
            out = pr._run(on.step_input(out[None, None], emb, 1), emb, torch.tensor([t + j]), None)[0, -1]
            assert torch.allclose(out, outs[j][0, t], atol=1e-5), f"step {j}"


def test_eagle31_flags_need_eagle3(target):
    for flag in ("fc_norm", "norm_output"):
        with pytest.raises(ConfigError, match=flag):
            EagleConfig(variant="eagle1", **{flag: True})


def test_eagle31_flags_survive_export_and_reload_and_mismatches_are_refused(tmp_path, target, batch):
    """native, SGLang and vLLM exports write fc_norm/norm_output (explicitly, also when off) and the
    fc_norm tensors; each reloads to the same loss. A config.json whose flags disagree with the
    export's drafter_config, or that sets a switch the drafter lacks, is refused on load."""
    import json
    import shutil

    from specdistill import drafters
    from specdistill import export as ex
    from specdistill.config import ExportConfig
    from specdistill.loading import load_drafter

    def build(**kw):  # through the registry: exports read the family spec off the drafter
        d = drafters.build(EagleConfig(layer_ids=LAYERS3, draft_vocab_size=64, ttt_steps=2, **kw), target)
        d.set_vocab_map(*vocab_map_from_counts(count_tokens(_samples(batch), target.vocab_size), 64))
        return d

    d = build(fc_norm=True, norm_output=True)
    with torch.no_grad():
        for i, n in enumerate(d.fc_norm):
            n.weight.mul_(1.0 + 0.5 * i)
    out = ex.write(d, ExportConfig(formats=["native", "sglang", "vllm"], dtype="float32"), tmp_path / "on", target)
    tout = _target_out(target, d, batch)
    ref = d.loss(batch, tout).loss
    for fmt in ("sglang", "vllm"):
        cfg = json.loads((out[fmt] / "config.json").read_text())
        assert cfg["fc_norm"] is True and cfg["norm_output"] is True, fmt
        st = load_file(str(out[fmt] / "model.safetensors"))
        assert torch.equal(st["fc_norm.2.weight"], d.fc_norm[2].weight.detach()), fmt
    for fmt in ("native", "sglang", "vllm"):
        back = load_drafter(out[fmt], target)
        assert back.cfg.fc_norm and back.cfg.norm_output, fmt
        assert torch.allclose(back.loss(batch, tout).loss, ref, atol=1e-5), fmt
    plain = build()
    out_off = ex.write(plain, ExportConfig(formats=["vllm"], dtype="float32"), tmp_path / "off", target)
    cfg_off = json.loads((out_off["vllm"] / "config.json").read_text())
    assert cfg_off["fc_norm"] is False and cfg_off["norm_output"] is False
    assert not any(k.startswith("fc_norm") for k in load_file(str(out_off["vllm"] / "model.safetensors")))
    for src, edit, match in ((out["vllm"], {"norm_output": False}, "norm_output=false"),
                             (out_off["vllm"], {"norm_output": True}, "norm_output=true"),
                             (out_off["vllm"], {"norm_before_fc": True}, "sets norm_before_fc, which")):
        bad = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        shutil.copytree(src, bad)
        c = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**c, **edit}))
        with pytest.raises(ValueError, match=match):
            load_drafter(bad, target)


def test_frozen_lm_head_stays_the_target_rows_after_a_step(target, batch):
    d = _build(target, batch, variant="eagle3", draft_vocab_size=64, freeze_lm_head=True)
    rows = d.head_rows().detach().clone()
    assert torch.equal(d.lm_head.weight, rows)
    assert all(p is not d.lm_head.weight for p in d.trainable_parameters())
    norm_before = d.norm.weight.detach().clone()
    _fit(d, batch, _target_out(target, d, batch), steps=2, lr=1e-2)
    assert torch.equal(d.lm_head.weight, rows)
    assert not torch.equal(d.norm.weight, norm_before)  # the final norm still trains
    with pytest.raises(ConfigError, match="freeze_lm_head"):
        EagleConfig(variant="eagle3", freeze_lm_head=True, init_from_target=False)


def test_per_step_loss_norm_divides_each_step_by_its_own_tokens(target, batch):
    kw = dict(variant="eagle3", draft_vocab_size=64, ttt_steps=3, step_loss_decay=1.0)
    batch = dict(batch, loss_mask=torch.ones_like(batch["loss_mask"]))  # loss from the start: step j loses j rows
    a, b = _build(target, batch, **kw), _build(target, batch, step_loss_norm="per_step", **kw)
    tout = _target_out(target, a, batch)
    oa, ob = a.loss(batch, tout), b.loss(batch, tout)
    n0 = oa.num_tokens
    expected = sum(oa.metrics[f"loss_token_step{j}"] * n0 / oa.metrics[f"tokens_step{j}"] for j in range(3))
    assert int(oa.metrics["tokens_step2"]) < n0  # later steps have fewer positions: the option changes the loss
    assert torch.allclose(ob.loss, expected, rtol=1e-5)
    assert ob.loss > oa.loss
    with pytest.raises(ConfigError, match="step_loss_norm"):
        EagleConfig(step_loss_norm="mean")


@pytest.mark.parametrize("variant", ["eagle1", "eagle3"])
def test_bf16_weights_drafting_copy_matches_fp32_math(target, batch, variant):
    """dtype=bf16_weights (auto on CPUs without native bf16): the copy's linears hold bf16 weights for the
    cpu_kernels kernel, the math stays fp32, so drafts equal an fp32 run on the same (bf16-rounded) values,
    and the drafter itself is left untouched."""
    from specdistill import cpu_kernels

    if cpu_kernels.unavailable_reason() is not None:
        pytest.skip(cpu_kernels.unavailable_reason())
    kw = dict(variant=variant, draft_vocab_size=64) if variant == "eagle3" else dict(variant=variant)
    d = _build(target, batch, **kw).eval()
    with torch.no_grad():
        for m in d.modules():
            if type(m) is torch.nn.Linear:
                m.weight.copy_(m.weight.to(torch.bfloat16).float())
                m.weight.mul_(4.0)  # sharper drafts: ties in a random drafter's argmax would be noise
    before = {k: v.clone() for k, v in d.state_dict().items()}
    ids = batch["input_ids"][0]
    hs = {i: h[0, :11] for i, h in _target_out(target, d, batch).hidden_states.items()}
    for mode in ("chain", "tree"):
        fp = d.proposer(target, mode=mode, k=5, topk=3, budget=10, depth=4, dtype="float32")
        bw = d.proposer(target, mode=mode, k=5, topk=3, budget=10, depth=4, dtype="bf16_weights")
        assert any(isinstance(m, cpu_kernels.Bf16WeightLinear) for m in bw.drafter.modules())
        assert bw.drafter is not d and bw._param().dtype == torch.float32
        a = fp.propose(ProposerState(ids[:12], hs))
        b = bw.propose(ProposerState(ids[:12], hs))
        assert a.tokens.tolist() == b.tokens.tolist() and a.parents.tolist() == b.parents.tolist(), mode
    assert all(torch.equal(v, before[k]) for k, v in d.state_dict().items())


def test_late_step_loss_fraction_samples_later_steps_without_bias(target, batch):
    kw = dict(variant="eagle3", draft_vocab_size=64, ttt_steps=3)
    full, half = _build(target, batch, **kw), _build(target, batch, late_step_loss_fraction=0.5, **kw)
    tout = _target_out(target, full, batch)
    full.train()
    half.train()
    ref = full.loss(batch, tout)
    draws = []
    for seed in range(300):
        torch.manual_seed(seed)
        out = half.loss(batch, tout)
        # step 0 always scores every position; later steps score a random share of theirs
        assert torch.equal(out.metrics["loss_token_step0"], ref.metrics["loss_token_step0"])
        assert out.num_tokens == ref.num_tokens
        draws.append(float(out.loss.detach()))
    mean = sum(draws) / len(draws)
    spread = (sum((d - mean) ** 2 for d in draws) / (len(draws) - 1)) ** 0.5
    assert spread > 0  # the draws differ: the subsample is real
    assert abs(mean - float(ref.loss)) < 4 * spread / len(draws) ** 0.5  # unbiased: rescaled by 1/fraction
    kept = [int(half.loss(batch, tout).metrics["tokens_step1"]) for _ in range(50)]
    assert 0.35 < sum(kept) / 50 / int(ref.metrics["tokens_step1"]) < 0.65
    # evaluation (and the validation agreement) scores every position, as without the option
    half.eval()
    full.eval()
    ev_half, ev_full = half.loss(batch, tout), full.loss(batch, tout)
    assert torch.allclose(ev_half.loss, ev_full.loss)
    assert ev_half.metrics["tokens_step2"] == ev_full.metrics["tokens_step2"]
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="late_step_loss_fraction"):
            EagleConfig(late_step_loss_fraction=bad)
