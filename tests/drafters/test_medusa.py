"""Medusa family: head offsets, losses decrease, Medusa-1 leaves the target alone, Medusa-2 changes only
adapters + heads and resumes exactly, the sparse tree, proposers (greedy identical, sampling lossless),
exports (vLLM MedusaModel, FasterDecoding) with their contract checks, and the recipe end to end."""

import json
import runpy
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import make_llama, make_tokenizer, write_tiny_run_inputs
from safetensors.torch import load_file

from specdistill import config
from specdistill.data.vocab import count_tokens, vocab_map_from_counts
from specdistill.drafters import REGISTRY, build
from specdistill.drafters.medusa import MedusaConfig, build_sparse_tree, target_drift
from specdistill.errors import ConfigError
from specdistill.export import ContractError
from specdistill.export import medusa as em
from specdistill.loading import load_drafter
from specdistill.targets import TargetModel
from specdistill.verify.verifier import Verifier

NO_EOS = [10**9]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sharp_target(seed=1, layers=2):
    model = make_llama(layers=layers, seed=seed)
    with torch.no_grad():
        model.model.norm.weight.mul_(6.0)  # a peaked next-token distribution, like a trained model's
    return TargetModel(model, make_tokenizer(), name="tiny-llama")


@pytest.fixture(scope="module")
def target():
    return sharp_target()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 128, (3, 20), generator=g)
    lm = torch.zeros_like(ids)
    lm[:, 6:] = 1
    lm[2, 15:] = 0
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": lm}


def _medusa(target, batch=None, **kw):
    torch.manual_seed(0)
    d = build(MedusaConfig(**kw), target)
    if d.draft_vocab_size < target.vocab_size:
        samples = [{"input_ids": i.tolist(), "loss_mask": [1] * i.numel()} for i in batch["input_ids"]]
        d.set_vocab_map(*vocab_map_from_counts(count_tokens(samples, target.vocab_size), d.draft_vocab_size))
    return d


def _train(d, target, batch, steps=25, lr=1e-2):
    opt = torch.optim.Adam([p for p in d.parameters() if p.requires_grad], lr)
    tout = target(batch["input_ids"], batch["attention_mask"], return_logits=False)
    out = []
    for _ in range(steps):
        o = d.loss(batch, tout)
        opt.zero_grad()
        (o.loss / o.num_tokens).backward()
        opt.step()
        out.append(float(o.loss.detach() / o.num_tokens))
    return out


def test_fresh_block_is_x_plus_silu_bias_and_heads_are_independent(target):
    d = _medusa(target, num_layers=2)
    lin = d.blocks[0].layers[0]
    assert torch.count_nonzero(lin.weight) == 0 and torch.count_nonzero(lin.bias) > 0
    x = torch.randn(3, target.hidden_size)
    assert torch.allclose(x + F.silu(lin.bias), x + F.silu(lin(x)))
    assert d.blocks[0].layers[0].weight.data_ptr() != d.blocks[0].layers[1].weight.data_ptr()
    with pytest.raises(ConfigError, match="drafter.variant"):
        MedusaConfig(variant="hydra2")


def test_head_k_at_t_is_trained_on_token_t_plus_k_plus_1(target, batch):
    """Hard labels: with a one-hot-at-p loss mask, head k's CE is taken at position p - k, against x_{p+1}."""
    d = _medusa(target, num_heads=3, draft_vocab_size=0, labels="hard")
    ids = batch["input_ids"][:1]
    p = 10
    lm = torch.zeros_like(ids)
    lm[0, p + 1] = 1  # only the token x_{p+1} is a label
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": lm}
    tout = target(ids, b["attention_mask"], return_logits=False)
    out = d.loss(b, tout)
    h = tout.last_hidden[0]
    for k in (1, 2, 3):
        want = F.cross_entropy(d.head_logits(k - 1, h[p - k])[None], ids[0, p + 1][None], reduction="sum")
        assert torch.allclose(out.metrics[f"loss_head{k}"], want, atol=1e-5), k
        wrong = F.cross_entropy(d.head_logits(k - 1, h[p - k + 1])[None], ids[0, p + 1][None], reduction="sum")
        assert not torch.allclose(out.metrics[f"loss_head{k}"], wrong, atol=1e-5)
    assert out.num_tokens == 1 == int(d.num_loss_tokens(b))


@pytest.mark.parametrize("kw", [dict(labels="hard"), dict(labels="soft", draft_vocab_size=64)])
def test_medusa1_loss_decreases_and_target_is_untouched(target, batch, kw):
    before = {k: v.clone() for k, v in target.state_dict().items()}
    d = _medusa(target, batch, **kw)
    losses = _train(d, target, batch)
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())
    assert int(d.train_step) == 25


def test_sparse_tree_hand_worked_three_heads():
    acc = [[0.6, 0.2, 0.1], [0.4, 0.2, 0.1], [0.3, 0.1, 0.05]]
    # E: (0,)=.6 -> (0,0)=.24 -> (1,)=.2 -> (0,1)=.12 -> (2,)=.1 (beats (1,0)=.08 and (0,0,0)=.072)
    want = [(0,), (1,), (2,), (0, 0), (0, 1)]
    assert build_sparse_tree(acc, 5, 3, 3) == want
    assert build_sparse_tree(acc, 5, 3, 3) == want  # deterministic
    # then (1,0)=.08, then (0,0,0)=.072 (beats (0,2)=.06)
    assert build_sparse_tree(acc, 7, 3, 3) == [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]
    assert build_sparse_tree(acc, 4, 1, 3) == [(0,), (1,), (2,)]  # depth 1: only siblings, width cap


def test_validation_pass_counts_accuracy_by_true_counts(target, batch):
    d = _medusa(target, num_heads=2, draft_vocab_size=0)
    _train(d, target, batch, steps=30)
    batch = {**batch, "loss_mask": torch.ones_like(batch["loss_mask"])}  # labels from position 2 on
    d.eval()
    tout = target(batch["input_ids"], batch["attention_mask"], return_logits=False)
    d.loss(batch, tout)
    n1 = int(d.num_loss_tokens(batch))
    assert int(d.acc_totals[0]) == n1 and int(d.acc_totals[1]) < n1  # head 2 has fewer valid positions
    acc = d.head_accuracy()
    assert 0 <= acc[0][0] <= 1 and sum(acc[0]) <= 1 + 1e-9
    d.loss(batch, tout)  # the same pass continues counting; a training call then a new pass replaces them
    assert int(d.acc_totals[0]) == 2 * n1
    d.train()
    d.loss(batch, tout)
    d.eval()
    d.loss(batch, tout)
    assert int(d.acc_totals[0]) == n1
    assert d.measure_accuracy([batch], target) == acc


@pytest.mark.parametrize("mode,dtype", [("chain", "float32"), ("tree", "float32"), ("tree", "bfloat16")])
def test_greedy_is_identical_to_the_target(target, batch, mode, dtype):
    d = _medusa(target, batch, draft_vocab_size=64, labels="soft")
    _train(d, target, batch, steps=20)
    d.eval()
    prop = d.proposer(target, None, mode=mode, depth=3, budget=8, max_child=3, dtype=dtype)
    if dtype == "bfloat16":  # a frozen bf16 copy of the heads; the target is shared, not copied
        assert prop.drafter is not d and prop.drafter.lm_heads[0].weight.dtype == torch.bfloat16
        assert prop.drafter._target[0] is target and d.lm_heads[0].weight.dtype == torch.float32
    ver = Verifier(target)
    for prompt in ([1, 4, 5, 6], batch["input_ids"][0, :8].tolist()):
        ref = ver.generate(prompt, None, max_new_tokens=24, eos_token_ids=NO_EOS)
        res = ver.generate(prompt, prop, max_new_tokens=24, eos_token_ids=NO_EOS)
        assert res.tokens == ref.tokens
        assert max(res.draft_size_per_step) == (3 if mode == "chain" else 8)


@pytest.mark.parametrize("variant", ["medusa1", "hydra"])
def test_sampling_chain_is_lossless_chi_square(variant):
    from test_verify import assert_matches

    from specdistill.verify import sampling

    target = TargetModel(make_llama(vocab_size=16, hidden=32, seed=11), make_tokenizer(), name="v16")
    with torch.no_grad():
        target.model.model.norm.weight.mul_(4.0)
    d = _medusa(target, num_heads=2, draft_vocab_size=0, draft_mode="chain", variant=variant)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn_like(p))  # heads far from the target: many rejections
    prompt = [1, 4, 2, 5]
    with torch.no_grad():
        p1 = sampling.warp(target.model(torch.tensor([prompt])).logits[0, -1], 0.9)
        p2 = torch.stack([sampling.warp(target.model(torch.tensor([prompt + [a]])).logits[0, -1], 0.9)
                          for a in range(16)])
    ver = Verifier(target)
    counts = torch.zeros(16 * 16)
    for s in range(500):
        prop = d.proposer(target, None, temperature=0.9, seed=s)
        res = ver.generate(prompt, prop, max_new_tokens=3, temperature=0.9, seed=s, eos_token_ids=NO_EOS)
        counts[res.tokens[0] * 16 + res.tokens[1]] += 1
    assert_matches(counts, (p1[:, None] * p2).flatten())


def _lora_target():
    return sharp_target(seed=2)


def test_medusa2_trains_only_adapters_and_heads_and_drift_is_measured(batch):
    target = _lora_target()
    d = _medusa(target, variant="medusa2", draft_vocab_size=0, lora_rank=2, lora_alpha=4, lora_dropout=0.0,
                lora_modules=["q_proj", "v_proj"], ramp_steps=10, base_loss="self_distill")
    assert REGISTRY["medusa"].needs(d.cfg, target.config).trains_target
    groups = d.trainable_parameters()
    assert groups[0]["lr_scale"] == 4.0
    adapters = target.attach_lora(d.lora_config())
    base = {k: v.clone() for k, v in target.model.state_dict().items() if "lora_" not in k}
    assert target_drift(target, [batch]) == 1.0  # LoRA B starts at zero: the original target
    opt = torch.optim.Adam(groups[0]["params"] + adapters, 2e-2)
    first = None
    for _ in range(12):
        tout = target(batch["input_ids"], batch["attention_mask"], return_logits=False, grad=True)
        o = d.loss(batch, tout)
        opt.zero_grad()
        (o.loss / o.num_tokens).backward()
        opt.step()
        first = first if first is not None else float(o.metrics["loss_head1"])
    assert float(o.metrics["loss_head1"]) < first
    assert d.ramp() == 1.0 and int(d.train_step) == 12
    after = target.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base.items())
    assert any(torch.count_nonzero(v) for k, v in after.items() if "lora_B" in k)
    drift = target_drift(target, [batch])
    assert 0.0 <= drift <= 1.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("medusa_recipe")
    write_tiny_run_inputs(root)
    return root


def _overrides(tiny, out, steps, *extra):
    return [f"target.name={tiny / 'target'}", f"data.source={tiny / 'convs.jsonl'}",
            f"data.prepared_dir={tiny / 'prepared'}", "data.max_length=64", "data.val_fraction=0.1",
            "data.min_loss_tokens=2", "drafter.draft_vocab_size=48", "drafter.num_heads=3",
            f"train.output_dir={out}", f"train.max_steps={steps}", "train.micro_batch_size=2", "train.grad_accum=1",
            "train.save_every=2", "train.eval_every=0", "train.eval_batches=2", "train.trackers=[none]",
            "train.progress=false", "train.mixed_precision=no", "train.max_minutes=0", "train.log_every=1",
            f"eval.questions={tiny / 'q.jsonl'}", "eval.limit_per_category=-1", "eval.max_new_tokens=8", *extra]


def test_medusa2_recipe_resumes_exactly_and_ships_the_adapter(tiny, tmp_path):
    main = runpy.run_path(str(config.REPO_ROOT / "recipes" / "medusa.py"), run_name="recipe")["main"]
    extra = ["drafter.variant=medusa2", "drafter.lora_rank=2", "drafter.lora_alpha=4", "drafter.lora_dropout=0.0",
             "drafter.lora_modules=[q_proj,v_proj]", "train.lr=1e-2",
             "drafter.ramp_steps=4"]  # explicit: the derived T (max_steps) would differ between the cut runs
    full, cut = tmp_path / "full", tmp_path / "cut"
    main(_overrides(tiny, full, 4, *extra))
    # A crash after step 2: a run directory holding only the step-2 checkpoint, then the same command.
    cut.mkdir()
    shutil.copytree(full / "step_2", cut / "step_2")
    (cut / "latest").write_text("step_2")
    shutil.copy(full / "config.yaml", cut / "config.yaml")
    main(_overrides(tiny, cut, 4, *extra))
    a, b = load_file(str(full / "step_4" / "drafter.safetensors")), load_file(str(cut / "step_4" / "drafter.safetensors"))
    assert set(a) == set(b) and any("lora_" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert int(a["train_step"]) == 4  # the ramp step rides with the weights
    native_dir = full / "export" / "native"
    assert (native_dir / "target_adapter.safetensors").is_file()
    meta = json.loads((full / "export" / "vllm_medusa" / "specdistill_export.json").read_text())
    assert meta["target_changed"] is True


def test_medusa1_recipe_exports_and_reloads_bit_identical(tiny, tmp_path):
    main = runpy.run_path(str(config.REPO_ROOT / "recipes" / "medusa.py"), run_name="recipe")["main"]
    out = tmp_path / "m1"
    main(_overrides(tiny, out, 2, "export.dtype=float32"))
    root = out / "export"
    assert sorted(p.name for p in root.iterdir()) == ["native", "vllm_medusa"]  # medusa_fd: full vocab only
    from specdistill import targets

    target = targets.load(str(tiny / "target"))
    nat = load_drafter(root / "native", target)
    vll = load_drafter(root / "vllm_medusa", target)
    for k, v in nat.state_dict().items():
        if k.startswith(("blocks.", "lm_heads.", "d2t", "t2d")):
            assert torch.equal(v, vll.state_dict()[k]), k
    _engine_logits_match(root / "vllm_medusa", nat, target)
    assert torch.equal(vll.acc_counts, nat.acc_counts) and (root / "vllm_medusa" / "medusa_tree.json").is_file()
    from specdistill.export import card

    text = card.build_card(root / "vllm_medusa", "me/heads")
    assert '"method":"medusa"' in text and "num_speculative_tokens" in text and "own layout" not in text
    from specdistill import scoring

    q = str(tiny / "q.jsonl")
    std = scoring.score(target, str(root / "native"), tmp_path / "std", questions=q, max_new_tokens=8,
                        progress=False, quiet=True)
    assert std["overall"]["lossless"] is True and std["overall"]["identical_to_greedy"] is True
    typ = scoring.score(target, str(root / "native"), tmp_path / "typ", questions=q, max_new_tokens=8,
                        progress=False, quiet=True, acceptance="typical")
    assert typ["overall"]["lossless"] is False and typ["overall"]["identical_to_greedy"] is None
    assert typ["settings"]["acceptance"] == "typical"


def test_typical_acceptance_rule_by_hand():
    from specdistill.verify import sampling

    # Row 0 (root): p = .5/.3/.2, H ~ 1.03 nats, bar = min(.09, .3 * e^-H ~ .107) = .09: children 1 and 2 pass,
    # the more likely (token 1, p .3) is followed; row 2 (node 1) is flat over 3 tokens: bar = min(.09, .1) =
    # .09 and token 0 (p 1/3) passes; node 2 has no child, so the bonus is row 3's argmax (token 2).
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 1.0], [1 / 3, 1 / 3, 1 / 3, 0.0], [0, 0, 1.0, 0]])
    kids = {-1: [0, 1], 0: [], 1: [2], 2: []}
    path, bonus = sampling.accept_typical(probs, [2, 1, 0], kids)
    assert path == [1, 2] and bonus == 2
    # a token below the bar is rejected even when it is the only child: greedy bonus = argmax
    path, bonus = sampling.accept_typical(probs, [3], {-1: [0], 0: []})
    assert path == [] and bonus == 0


def _engine_logits_match(path, drafter, target):
    """Rebuild the heads from the vLLM files alone, as MedusaModel's loader reads them, and compare logits."""
    cfg = json.loads((path / "config.json").read_text())
    w = load_file(str(path / "model.safetensors"))
    x = drafter.final_norm(torch.randn(5, cfg["hidden_size"]))
    for k in range(cfg["num_heads"]):
        y = x
        for la in range(cfg["num_hidden_layers"]):
            bias = w[f"blocks.{k}.layers.{la}.bias"] if cfg["medusa_fc_bias"] else 0.0
            y = y + F.silu(y @ w[f"blocks.{k}.layers.{la}.weight"].T + bias)
        z = y @ w[f"lm_heads.{k}.weight"].T
        assert torch.allclose(z, drafter.head_logits(k, x), atol=1e-5)
        ids = w["token_map"][z.argmax(-1)] if cfg["truncated_vocab_size"] < cfg["vocab_size"] else z.argmax(-1)
        assert torch.equal(ids, drafter.to_target_ids(drafter.head_logits(k, x).argmax(-1)))


def test_exports_contract_violations_are_caught(target, batch, tmp_path):
    d = _medusa(target, batch, draft_vocab_size=64)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg, t = em.build_vllm(d, target, "float32")
    em.check_vllm(cfg, t)
    assert cfg["medusa_fc_bias"] is True and cfg["hidden_size"] == 64 and cfg["truncated_vocab_size"] == 64

    def bad(mut_cfg=None, mut_t=None, match=""):
        c, tt = json.loads(json.dumps(cfg)), dict(t)
        (mut_cfg or (lambda c: None))(c)
        (mut_t or (lambda t: None))(tt)
        with pytest.raises(ContractError, match=match):
            em.check_vllm(c, tt)

    bad(lambda c: c.update(medusa_fc_bias=False), match="medusa_fc_bias")
    bad(lambda c: c.pop("hidden_size"), match="hidden_size")
    bad(lambda c: c.update(num_heads=5), match="num_heads")
    bad(mut_t=lambda t: t.pop("token_map"), match="token_map")
    bad(mut_t=lambda t: t.update(extra=torch.zeros(1)), match="drops them silently")
    bad(lambda c: c.update(truncated_vocab_size=128), match="lm_heads.0.weight")
    with pytest.raises(ContractError, match="num_speculative_tokens"):
        em.check_serving(cfg, 5)
    em.check_serving(cfg, 4)
    assert "full-vocabulary" in em.fd_gap(d)
    # FasterDecoding layout at full vocabulary: writes, checks, reloads bit-identical.
    full = _medusa(target, draft_vocab_size=0)
    out = em.write_fd(full, target, tmp_path / "fd", dtype="float32")
    fcfg = json.loads((out / "config.json").read_text())
    assert fcfg["medusa_num_heads"] == 4 and fcfg["medusa_num_layers"] == 1 and fcfg["base_model_name_or_path"]
    assert "0.1.weight" in load_file(str(out / "model.safetensors"))
    assert load_file(str(out / "medusa_lm_head.safetensors")).keys() == load_file(str(out / "model.safetensors")).keys()
    back = load_drafter(out, target)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in full.state_dict().items() if k.startswith(("blocks", "lm_")))
    with pytest.raises(ContractError, match="medusa_num_layers"):
        em.check_fd({"medusa_num_heads": 4, "base_model_name_or_path": "x"}, {})


def test_hydra_heads_read_earlier_tokens_train_and_draft_losslessly(target, batch):
    d = _medusa(target, batch, variant="hydra", num_heads=3, draft_vocab_size=64, labels="soft")
    assert d.blocks[2].layers[0].in_features == 4 * target.hidden_size  # h_t + 3 embeddings
    x = d.final_norm(torch.randn(target.hidden_size))
    a = d.head_logits(1, x, torch.tensor([5, 6]))
    assert torch.allclose(a, d.head_logits(1, x, torch.tensor([5, 7])))  # fresh: R = identity on h, W = 0
    losses = _train(d, target, batch, steps=25)
    assert losses[-1] < 0.5 * losses[0]
    a = d.head_logits(1, x, torch.tensor([5, 6]))
    assert not torch.allclose(a, d.head_logits(1, x, torch.tensor([5, 7])))  # trained: the drafted token matters
    assert d.export_formats() == ("native",) and "native export only" in em._gap(d)
    d.eval()
    ver = Verifier(target)
    for mode in ("chain", "tree"):
        prop = d.proposer(target, None, mode=mode, depth=3, budget=8, max_child=3)
        for prompt in ([1, 4, 5, 6], batch["input_ids"][1, :8].tolist()):
            ref = ver.generate(prompt, None, max_new_tokens=20, eos_token_ids=NO_EOS)
            assert ver.generate(prompt, prop, max_new_tokens=20, eos_token_ids=NO_EOS).tokens == ref.tokens


def test_hydra_recipe_exports_native_only(tiny, tmp_path):
    main = runpy.run_path(str(config.REPO_ROOT / "recipes" / "medusa.py"), run_name="recipe")["main"]
    out = tmp_path / "hydra"
    main(_overrides(tiny, out, 2, "drafter.variant=hydra"))
    assert sorted(p.name for p in (out / "export").iterdir()) == ["native"]
