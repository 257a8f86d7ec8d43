"""small_lm family (Seq-KD, DistillSpec): vocabulary check, pruned init, losses, rollout, verification, reload."""

from __future__ import annotations

import pytest
import torch
from conftest import make_llama, make_tokenizer

from specdistill import drafters
from specdistill.drafters.small_lm import SmallLMConfig, SmallLMDrafter
from specdistill.errors import ConfigError
from specdistill.targets import TargetModel


@pytest.fixture
def target4():
    return TargetModel(make_llama(layers=4, seed=1), make_tokenizer(), name="tiny4")


def _batch(n=3, T=20, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, vocab, (n, T), generator=g)
    mask = torch.zeros(n, T, dtype=torch.long)
    mask[:, T // 2:] = 1
    return {"input_ids": ids, "attention_mask": torch.ones(n, T, dtype=torch.long), "loss_mask": mask}


def test_pruned_init_copies_the_chosen_layers_bit_exactly_and_shares_no_storage(target4):
    d = drafters.build(SmallLMConfig(keep_layers=[0, 2]), target4)
    assert d.lm.config.num_hidden_layers == 2
    src = target4.model.model
    for j, i in enumerate([0, 2]):
        for (k, a), (k2, b) in zip(d.lm.model.layers[j].state_dict().items(), src.layers[i].state_dict().items(),
                                   strict=True):
            assert k == k2 and torch.equal(a, b), k
    assert torch.equal(d.lm.model.embed_tokens.weight, src.embed_tokens.weight)
    assert torch.equal(d.lm.model.norm.weight, src.norm.weight)
    theirs = {t.untyped_storage().data_ptr() for t in target4.model.state_dict().values()}
    assert not any(t.untyped_storage().data_ptr() in theirs for t in d.lm.state_dict().values())
    # the same function: a 2-layer model of layers (0, 2) computed by hand from the target's modules
    ids = torch.randint(8, 128, (1, 9))
    with torch.no_grad():
        ref = target4.model.model.embed_tokens(ids)
        pos = torch.arange(9)[None]
        rot = src.rotary_emb(ref, pos)
        from transformers.masking_utils import create_causal_mask

        cm = create_causal_mask(config=target4.config, inputs_embeds=ref, attention_mask=None, cache=None,
                                position_ids=pos)
        h = ref
        for i in (0, 2):
            h = src.layers[i](h, attention_mask=cm, position_embeddings=rot, position_ids=pos)
            h = h[0] if isinstance(h, tuple) else h
        want = target4.model.lm_head(src.norm(h))
        got = d.lm(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    with pytest.raises(ConfigError, match="keep_layers"):
        drafters.build(SmallLMConfig(keep_layers=[0, 4]), target4)


def test_vocabulary_mismatch_is_refused_naming_both_tokenizers_and_the_id(target4, tmp_path):
    d = tmp_path / "other"
    make_llama(layers=1).save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    # rewrite two ids in the saved tokenizer: 'a' <-> 'b'
    import json

    tj = json.loads((d / "tokenizer.json").read_text())
    v = tj["model"]["vocab"]
    v["a"], v["b"] = v["b"], v["a"]
    (d / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ConfigError) as e:
        drafters.build(SmallLMConfig(init=str(d)), target4)
    msg = str(e.value)
    first = min(v["a"], v["b"])
    assert f"token id {first}" in msg and str(d) in msg and "target" in msg
    big = tmp_path / "big"
    make_llama(vocab_size=130, layers=1).save_pretrained(big)
    with pytest.raises(ConfigError, match="vocabulary size 130.*128"):
        drafters.build(SmallLMConfig(init=str(big)), target4)


def test_model_dir_and_fresh_config_init(target4, tmp_path):
    d = tmp_path / "draft"
    make_llama(layers=1, hidden=32, seed=5).save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    m = drafters.build(SmallLMConfig(init=str(d)), target4)
    assert m.lm.config.hidden_size == 32
    f = drafters.build(SmallLMConfig(init="config", num_layers=1, hidden_size=32, num_attention_heads=2), target4)
    assert f.lm.config.hidden_size == 32 and f.lm.get_output_embeddings().weight.shape[0] == 128


def _steps(d, target, cfg_loss, n=12):
    opt = torch.optim.Adam(d.trainable_parameters(), lr=3e-3)
    b = _batch()
    tout = target(b["input_ids"], b["attention_mask"], return_logits=False) if cfg_loss != "ce" else None
    out = []
    for _ in range(n):
        lo = d.loss(b, tout)
        assert int(lo.num_tokens) == int(d.num_loss_tokens(b))
        opt.zero_grad()
        (lo.loss / lo.num_tokens).backward()
        opt.step()
        out.append(float(lo.loss.detach()) / int(lo.num_tokens))
    return out


@pytest.mark.parametrize("loss", ["ce", "forward_kl", "reverse_kl", "jsd", "tvd"])
def test_seqkd_and_distillspec_losses_decrease(target4, loss):
    d = drafters.build(SmallLMConfig(keep_layers=[0], loss=loss, loss_chunk=16), target4)
    spec = drafters.get("small_lm")
    assert spec.needs(d.cfg, target4.config).output == ("none" if loss == "ce" else "hidden")
    hist = _steps(d, target4, loss)
    assert hist[-1] < 0.7 * hist[0], hist


def test_divergence_loss_matches_full_logits_and_chunking(target4):
    """Gathering positions before the heads (chunked, checkpointed) = the loss on full (B, T, V) logits."""
    from specdistill import losses

    b = _batch()
    tout = target4(b["input_ids"], b["attention_mask"], return_logits=True)
    grads = []
    for chunk in (4, 1000):
        d = drafters.build(SmallLMConfig(keep_layers=[1], loss="jsd", beta=0.3, loss_chunk=chunk), target4)
        lo = d.loss(b, tout)
        lo.loss.backward()
        grads.append(d.lm.model.layers[0].mlp.up_proj.weight.grad.clone())
        m = b["loss_mask"][:, 1:].bool()
        z = d.lm(input_ids=b["input_ids"]).logits[:, :-1][m]
        ref = losses.jsd(z, torch.log_softmax(tout.logits[:, :-1][m], -1), 0.3)
        assert torch.allclose(lo.loss, ref, rtol=1e-5), (lo.loss, ref)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_rollout_fraction_is_honoured_seeded_and_split_invariant(target4):
    seeds = torch.arange(400, dtype=torch.int64) * 1_000_000_007 % (2 ** 62)
    rows = SmallLMDrafter.rollout_rows(seeds, 0.5)
    assert 0.4 < sum(rows) / len(rows) < 0.6
    assert sum(SmallLMDrafter.rollout_rows(seeds, 0.0)) == 0 and all(SmallLMDrafter.rollout_rows(seeds, 1.0))
    d = drafters.build(SmallLMConfig(keep_layers=[0], loss="forward_kl", lmbda=0.5, rollout_tokens=5), target4)
    assert drafters.get("small_lm").needs(d.cfg, target4.config).rollout
    b = _batch(n=4)
    s = torch.tensor([11, 12, 13, 14])
    chosen = SmallLMDrafter.rollout_rows(s, 0.5)
    assert 0 < sum(chosen) < 4  # these seeds pick a mix (else the test would not test anything)
    full = d.rollout(b, target4, s)
    again = d.rollout(b, target4, s)
    assert torch.equal(full["input_ids"], again["input_ids"])
    halves = [d.rollout({k: v[i:i + 2] for k, v in b.items()}, target4, s[i:i + 2]) for i in (0, 2)]
    for r in range(4):
        h = halves[r // 2]
        n = int(full["attention_mask"][r].sum())
        assert torch.equal(full["input_ids"][r, :n], h["input_ids"][r % 2, :n])
        assert torch.equal(full["loss_mask"][r, :n], h["loss_mask"][r % 2, :n])
        if chosen[r]:
            assert int(full["loss_mask"][r].sum()) <= 5 and n <= 10 + 5
        else:
            assert torch.equal(full["input_ids"][r, :n], b["input_ids"][r])
    other = d.rollout(b, target4, s + 1000)
    assert not torch.equal(other["input_ids"], full["input_ids"]) or other["input_ids"].shape != full["input_ids"].shape


def test_greedy_verification_with_the_small_draft_is_token_identical(target4):
    from specdistill.verify.proposer import ProposerOptions
    from specdistill.verify.verifier import Verifier

    d = drafters.build(SmallLMConfig(keep_layers=[0, 1, 2]), target4).eval()
    ver = Verifier(target4)
    prompt = torch.randint(8, 128, (10,), generator=torch.Generator().manual_seed(2)).tolist()
    plain = ver.generate(prompt, None, max_new_tokens=24, eos_token_ids=[])
    spec = ver.generate(prompt, d.proposer(target4, ProposerOptions(num_draft_tokens=3)), max_new_tokens=24,
                        eos_token_ids=[])
    assert spec.tokens == plain.tokens and spec.steps < 24


def test_native_export_reloads_bit_identical(target4, tmp_path):
    from specdistill import loading
    from specdistill.config import ExportConfig
    from specdistill.export import write

    d = drafters.build(SmallLMConfig(keep_layers=[0, 3], loss="tvd"), target4)
    with torch.no_grad():
        for p in d.lm.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # trained weights differ from the target's layers
    out = write(d, ExportConfig(formats=["native"], dtype="float32"), tmp_path, target4)
    back = loading.load_drafter(out["native"], target4)
    assert type(back) is SmallLMDrafter and back.cfg.loss == "tvd"
    for (k, a), (_, b) in zip(d.lm.state_dict().items(), back.lm.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("recipe,extra", [("seqkd", []), ("distillspec", ["drafter.loss=jsd", "drafter.rollout_tokens=4"])])
def test_recipes_train_export_and_score_on_a_tiny_target(tmp_path, recipe, extra):
    """The shipped recipes through the Trainer (rollout step included), both exports and the eval."""
    import json
    import runpy

    from conftest import write_tiny_run_inputs

    from specdistill import config

    t, convs, q = write_tiny_run_inputs(tmp_path)
    main = runpy.run_path(str(config.REPO_ROOT / "recipes" / f"{recipe}.py"), run_name="recipe")["main"]
    out = tmp_path / "run"
    main([f"target.name={t}", f"data.source={convs}", f"data.prepared_dir={tmp_path / 'prep'}", "data.max_length=64",
          "data.val_fraction=0.1", "data.min_loss_tokens=2", "drafter.keep_layers=[0,1]", f"train.output_dir={out}",
          "train.max_steps=3", "train.micro_batch_size=2", "train.save_every=3", "train.eval_every=0",
          "train.trackers=[none]", "train.progress=false", "train.mixed_precision=no", "train.max_minutes=0",
          "train.log_every=1", f"eval.questions={q}", "eval.limit_per_category=0", "eval.max_new_tokens=8",
          "eval.num_draft_tokens=2", "export.dtype=float32", *extra], recipe=recipe)
    hf = out / "export" / "hf_draft"
    assert (hf / "eval.json").is_file() and (out / "export" / "native" / "eval.json").is_file()
    gc = json.loads((hf / "generation_config.json").read_text())
    assert gc["num_assistant_tokens"] == 2
    ev = json.loads((hf / "eval.json").read_text())
    assert ev["overall"]["identical_to_greedy"] is True


# -- reduced draft vocabulary (drafter.draft_vocab_size) ---------------------------------------


def _reduced(target, vd=40, seed=3, **kw):
    """A pruned draft over the target ids of a random subset of size vd (installed like fit() does)."""
    from specdistill.data.vocab import vocab_map_from_counts

    d = drafters.build(SmallLMConfig(keep_layers=[0, 1], draft_vocab_size=vd, **kw), target)
    counts = torch.rand(target.vocab_size, generator=torch.Generator().manual_seed(seed))
    d2t, t2d = vocab_map_from_counts(counts, vd)
    d.set_vocab_map(d2t, t2d)
    return d


def test_reduced_vocab_head_is_the_target_rows_and_needs_a_map(target4):
    d = drafters.build(SmallLMConfig(keep_layers=[0, 1], draft_vocab_size=40), target4)
    with pytest.raises(RuntimeError, match="no vocab map"):
        d.proposer(target4)
    d = _reduced(target4)
    assert d.lm.lm_head.weight.shape == (40, 64) and not d.tied
    assert torch.equal(d.lm.lm_head.weight, target4.lm_head.weight[d.draft_ids])
    assert d.lm.lm_head.weight.untyped_storage().data_ptr() != d.lm.model.embed_tokens.weight.untyped_storage().data_ptr()
    with pytest.raises(ConfigError, match="exceeds"):
        drafters.build(SmallLMConfig(draft_vocab_size=500), target4)
    full = drafters.build(SmallLMConfig(keep_layers=[0, 1]), target4)
    assert not any(k in full.state_dict() for k in ("d2t", "t2d", "vocab_map_ready"))  # unchanged full-vocab weights


def test_reduced_vocab_losses_are_over_the_subset(target4):
    b = _batch(vocab=128)
    ce = _reduced(target4)
    inside = ce.to_draft_ids(b["input_ids"][:, 1:]) >= 0
    n = int((b["loss_mask"][:, 1:].bool() & inside).sum())
    assert 0 < n < int(b["loss_mask"][:, 1:].sum())  # some labels fall outside the subset
    o = ce.loss(b, None)
    assert int(o.num_tokens) == n == int(ce.num_loss_tokens(b))
    # by hand: CE of the draft's Vd logits at the in-subset label positions, labels as draft ids
    m = b["loss_mask"][:, 1:].bool() & inside
    z = ce.lm(b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1][m]
    want = torch.nn.functional.cross_entropy(z, ce.to_draft_ids(b["input_ids"][:, 1:][m]), reduction="sum")
    torch.testing.assert_close(o.loss, want, rtol=1e-5, atol=1e-4)
    # divergence: the target renormalised over the subset; every loss position counts
    fkl = _reduced(target4, loss="forward_kl")
    tout = target4(b["input_ids"], b["attention_mask"], return_logits=False)
    o = fkl.loss(b, tout)
    mm = b["loss_mask"][:, 1:].bool()
    assert int(o.num_tokens) == int(mm.sum()) == int(fkl.num_loss_tokens(b))
    with torch.no_grad():
        zt = target4.model(b["input_ids"]).logits[:, :-1][mm][:, fkl.draft_ids]
    z = fkl.lm(b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1][mm]
    lp, lq = torch.log_softmax(zt, -1), torch.log_softmax(z, -1)
    torch.testing.assert_close(o.loss, (lp.exp() * (lp - lq)).sum(), rtol=1e-4, atol=1e-4)


def test_reduced_vocab_rollout_samples_target_ids_in_the_subset(target4):
    d = _reduced(target4, loss="tvd", lmbda=1.0, rollout_tokens=6)
    b = _batch(n=2)
    out = d.rollout(b, target4, torch.tensor([5, 6]))
    toks = out["input_ids"][out["loss_mask"].bool()]
    assert toks.numel() > 0 and bool(d.t2d[toks].all())


def test_reduced_vocab_greedy_is_token_identical(target4):
    from specdistill.verify.proposer import ProposerOptions
    from specdistill.verify.verifier import Verifier

    d = _reduced(target4, vd=60).eval()
    ver = Verifier(target4)
    prompt = torch.randint(8, 128, (10,), generator=torch.Generator().manual_seed(2)).tolist()
    plain = ver.generate(prompt, None, max_new_tokens=24, eos_token_ids=[])
    for tree in (None, (2, 2)):
        prop = d.proposer(target4, ProposerOptions(num_draft_tokens=3, tree=tree))
        spec = ver.generate(prompt, prop, max_new_tokens=24, eos_token_ids=[])
        assert spec.tokens == plain.tokens
    from specdistill.verify.proposer import ProposerState

    for tree in (None, (3, 2)):
        drafted = d.proposer(target4, ProposerOptions(num_draft_tokens=4, tree=tree)).propose(
            ProposerState(tokens=torch.tensor(prompt)))
        assert bool(d.t2d[drafted.tokens].all())  # draft ids came back as target ids of the subset


def test_reduced_vocab_proposer_is_zero_outside_the_subset_and_sampling_is_lossless():
    """Chi-square: P(first two tokens) with the reduced draft == the target's joint, tokens outside the
    draft vocabulary included (they can only come from the residual)."""
    from test_verify import assert_matches

    from specdistill.verify import sampling
    from specdistill.verify.proposer import ProposerOptions, ProposerState
    from specdistill.verify.verifier import Verifier

    V = 16
    target = TargetModel(make_llama(vocab_size=V, hidden=32, layers=2, seed=11), make_tokenizer(), name="v16")
    with torch.no_grad():
        target.model.model.norm.weight.mul_(3.0)
    d = _reduced(target, vd=6, seed=1).eval()
    prompt = [1, 4, 2, 5]
    prop = d.proposer(target, ProposerOptions(num_draft_tokens=2, temperature=0.9, seed=0))
    tree = prop.propose(ProposerState(tokens=torch.tensor(prompt)))
    assert tree.probs.shape[-1] == V and float(tree.probs[:, ~d.t2d].abs().sum()) == 0.0
    assert bool(d.t2d[tree.tokens].all())
    with torch.no_grad():
        p1 = sampling.warp(target.model(torch.tensor([prompt])).logits[0, -1], 0.9)
        p2 = torch.stack([sampling.warp(target.model(torch.tensor([prompt + [a]])).logits[0, -1], 0.9)
                          for a in range(V)])
    assert float(p1[~d.t2d].sum()) > 0.05  # the target does put mass outside the draft vocabulary
    ver = Verifier(target)
    counts = torch.zeros(V * V)
    for s in range(500):
        prop = d.proposer(target, ProposerOptions(num_draft_tokens=2, temperature=0.9, seed=s))
        res = ver.generate(prompt, prop, max_new_tokens=2, temperature=0.9, seed=s, eos_token_ids=[])
        counts[res.tokens[0] * V + res.tokens[1]] += 1
    assert_matches(counts, (p1[:, None] * p2).flatten())


def test_reduced_vocab_native_round_trip_and_hf_draft_refusal(target4, tmp_path):
    from specdistill import loading
    from specdistill.config import ExportConfig
    from specdistill.export import ContractError, resolve_formats, write
    from specdistill.verify.proposer import ProposerOptions
    from specdistill.verify.verifier import Verifier

    d = _reduced(target4, vd=50)
    with torch.no_grad():
        for p in d.lm.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    with pytest.raises(ContractError, match="draft_vocab_size=50"):
        write(d, ExportConfig(formats=["hf_draft"], dtype="float32"), tmp_path / "hf", target4)
    assert resolve_formats(d, []) == ["native"]  # the default export skips what cannot express it
    out = write(d, ExportConfig(formats=["native"], dtype="float32"), tmp_path, target4)
    back = loading.load_drafter(out["native"], target4)
    assert back.cfg.draft_vocab_size == 50 and torch.equal(back.d2t, d.d2t) and torch.equal(back.t2d, d.t2d)
    assert torch.equal(back.draft_ids, d.draft_ids)
    a, b = d.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ver = Verifier(target4)
    prompt = [9, 20, 31, 42, 53]
    o = ProposerOptions(num_draft_tokens=3, temperature=1.0, seed=4)
    r1 = ver.generate(prompt, d.eval().proposer(target4, o), max_new_tokens=16, temperature=1.0, seed=4,
                      eos_token_ids=[])
    r2 = ver.generate(prompt, back.proposer(target4, o), max_new_tokens=16, temperature=1.0, seed=4, eos_token_ids=[])
    assert r1.tokens == r2.tokens


def test_reduced_vocab_recipe_fits_the_map_exports_native_only_and_scores(tmp_path, monkeypatch):
    """distillspec.py with drafter.draft_vocab_size: fit() builds the map from the labels, the default
    export skips hf_draft, the native export scores identical to greedy."""
    import json
    import runpy

    from conftest import write_tiny_run_inputs

    from specdistill import config

    monkeypatch.chdir(tmp_path)  # the vocabulary cache (data/vocab) lands here
    t, convs, q = write_tiny_run_inputs(tmp_path)
    main = runpy.run_path(str(config.REPO_ROOT / "recipes" / "distillspec.py"), run_name="recipe")["main"]
    out = tmp_path / "run"
    main([f"target.name={t}", f"data.source={convs}", f"data.prepared_dir={tmp_path / 'prep'}", "data.max_length=64",
          "data.val_fraction=0.1", "data.min_loss_tokens=2", "drafter.keep_layers=[0,1]", "drafter.draft_vocab_size=30",
          "drafter.loss=forward_kl", "drafter.lmbda=0", f"train.output_dir={out}", "train.max_steps=2",
          "train.micro_batch_size=2", "train.save_every=2", "train.eval_every=0", "train.trackers=[none]",
          "train.progress=false", "train.mixed_precision=no", "train.max_minutes=0", f"eval.questions={q}",
          "eval.limit_per_category=0", "eval.max_new_tokens=8", "eval.num_draft_tokens=2", "export.dtype=float32"],
         recipe="distillspec")
    assert not (out / "export" / "hf_draft").exists()
    nat = out / "export" / "native"
    assert json.loads((nat / "config.json").read_text())["drafter_config"]["draft_vocab_size"] == 30
    assert json.loads((nat / "eval.json").read_text())["overall"]["identical_to_greedy"] is True
    assert any((tmp_path / "data" / "vocab").iterdir())  # the map was fitted from the training labels
