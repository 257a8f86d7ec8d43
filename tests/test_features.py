"""Offline feature cache (resume, keys, rebuilt TargetOutput == online) and draft-vocab maps."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from specdistill.data import features, vocab


def _samples(n, seed=0, vocab_size=128):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = int(torch.randint(6, 20, (1,), generator=g))
        ids = torch.randint(8, vocab_size, (t,), generator=g).tolist()
        p = int(torch.randint(2, t - 2, (1,), generator=g))
        mask = [0] * p + [1] * (t - p)
        out.append({"input_ids": ids, "loss_mask": mask})
    return out


@pytest.fixture
def splits():
    return {"train": _samples(10, 0), "val": _samples(3, 1)}


def test_rebuilt_target_output_matches_online(tmp_path, tiny_target, splits):
    m = features.build_cache(tiny_target, splits, [0, 1], tmp_path / "c", shard_samples=4, batch_size=3)
    assert m["complete"] and len(m["shards"]) == 3 + 1
    ds = features.open_cache(tmp_path / "c", "train")
    assert len(ds) == 10 and ds.layers == [0, 1]
    batch = features.make_collate(ds)([ds[i] for i in (3, 7, 0, 9)])
    got = features.target_output(batch, tiny_target, return_logits=True)
    ref = tiny_target(batch["input_ids"], batch["attention_mask"], layers=[0, 1, 2], return_logits=True)
    att = batch["attention_mask"].bool()
    for i in (0, 1):
        a, b = got.hidden_states[i][att], ref.hidden_states[i][att]
        assert torch.equal(a, b.bfloat16().float()) or torch.allclose(a, b, atol=2e-2, rtol=1e-2)
    has = batch["has_last"]
    lm = batch["loss_mask"].bool()
    assert torch.equal(has[:, :-1], lm[:, 1:] & att[:, :-1]) and not has[:, -1].any()
    assert torch.allclose(got.last_hidden[has], ref.last_hidden[has], atol=3e-2, rtol=1e-2)
    assert torch.equal(got.last_hidden[~has], torch.zeros_like(got.last_hidden[~has]))
    assert (got.logits[has].argmax(-1) == ref.logits[has].argmax(-1)).float().mean() > 0.95
    assert set(got.hidden_states) == {0, 1}


def test_samples_round_trip_and_stats(tmp_path, tiny_target, splits):
    m = features.build_cache(tiny_target, splits, [1], tmp_path / "c", shard_samples=4)
    for split, src in splits.items():
        ds = features.open_cache(tmp_path / "c", split)
        for i, s in enumerate(src):
            got = ds[i]
            assert got["input_ids"] == s["input_ids"] and got["loss_mask"] == s["loss_mask"]
            assert got["aux"].shape == (len(s["input_ids"]), 1, 64) and got["aux"].dtype == torch.bfloat16
            assert got["last"].shape[0] == sum(s["loss_mask"][1:])
    st = m["stats"]
    h = 64
    tokens = sum(len(s["input_ids"]) for v in splits.values() for s in v)
    sel = sum(sum(s["loss_mask"][1:]) for v in splits.values() for s in v)
    assert st["tokens"] == tokens
    assert st["bytes"] > tokens * h * 2 + sel * h * 2  # aux + last, plus small int arrays
    assert st["bytes_per_token"] < (h * 2 + h * 2 + 64)


def test_resume_after_interruption_equals_uninterrupted(tmp_path, tiny_target, splits):
    full = features.build_cache(tiny_target, splits, [0, 1], tmp_path / "full", shard_samples=4)
    part = features.build_cache(tiny_target, splits, [0, 1], tmp_path / "part", shard_samples=4, stop_after_shards=1)
    assert not part["complete"] and list(part["shards"]) == ["train-00000.safetensors"]
    with pytest.raises(ValueError, match="incomplete"):
        features.open_cache(tmp_path / "part")
    first = (tmp_path / "part" / "train-00000.safetensors").stat().st_mtime_ns
    resumed = features.build_cache(tiny_target, splits, [0, 1], tmp_path / "part", shard_samples=4)
    assert resumed["complete"]
    assert (tmp_path / "part" / "train-00000.safetensors").stat().st_mtime_ns == first, "finished shard redone"
    assert sorted(resumed["shards"]) == sorted(full["shards"])
    for name in full["shards"]:
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "part" / name))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name
    assert not list((tmp_path / "part").glob(".*tmp*"))


def test_changed_settings_refuse_to_mix(tmp_path, tiny_target, splits):
    features.build_cache(tiny_target, splits, [0, 1], tmp_path / "c", shard_samples=4, stop_after_shards=1)
    with pytest.raises(ValueError, match="layers"):
        features.build_cache(tiny_target, splits, [1], tmp_path / "c", shard_samples=4)


def test_keys_change_with_target_data_layers(tiny_target):
    from conftest import make_llama, make_tokenizer

    from specdistill.targets import TargetModel

    other = TargetModel(make_llama(seed=1), make_tokenizer(), name="tiny-llama")
    k = features.cache_key(tiny_target, "data-a", [0, 1])
    assert k == features.cache_key(tiny_target, "data-a", [1, 0])
    assert len({k, features.cache_key(tiny_target, "data-b", [0, 1]), features.cache_key(tiny_target, "data-a", [1]),
                features.cache_key(other, "data-a", [0, 1])}) == 4


def test_last_layer_cached_everywhere(tmp_path, tiny_target, splits):
    features.build_cache(tiny_target, splits, [1, 2], tmp_path / "c", shard_samples=8)
    ds = features.open_cache(tmp_path / "c")
    s = ds[0]
    assert s["last"].shape[0] == len(s["input_ids"]) and s["aux"].shape[1] == 1
    batch = features.make_collate(ds)([ds[0], ds[1]])
    got = features.target_output(batch, tiny_target)
    ref = tiny_target(batch["input_ids"], batch["attention_mask"], layers=[1, 2], return_logits=False)
    att = batch["attention_mask"].bool()
    assert set(got.hidden_states) == {1, 2}
    assert torch.allclose(got.hidden_states[2][att], ref.hidden_states[2][att], atol=3e-2, rtol=1e-2)
    assert torch.equal(batch["has_last"], att)


def test_manifest_is_json_with_settings(tmp_path, tiny_target, splits):
    features.build_cache(tiny_target, splits, [0], tmp_path / "c", shard_samples=16, data_key="k1")
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["settings"]["data_key"] == "k1" and m["settings"]["aux_layers"] == [0]
    assert m["settings"]["splits"] == {"train": 10, "val": 3}


# ----------------------------------------------------------------------------- draft vocabulary


def test_vocab_maps_round_trip():
    counts = torch.tensor([0, 5, 9, 1, 7, 7, 0, 3])
    d2t, t2d = vocab.vocab_map_from_counts(counts, 4)
    assert d2t.dtype == torch.int64 and t2d.dtype == torch.bool
    tid = torch.arange(4) + d2t
    assert tid.tolist() == [1, 2, 4, 5]  # top-4 by count, draft ids in target-id order
    assert all(bool(t2d[int(d2t[i]) + i]) for i in range(4)) and int(t2d.sum()) == 4
    vocab.check_maps(d2t, t2d)
    assert vocab.coverage(counts, t2d) == pytest.approx(28 / 32)


def test_vocab_ties_and_more_than_unique():
    counts = torch.tensor([0, 2, 0, 2, 0, 0])
    d2t, t2d = vocab.vocab_map_from_counts(counts, 5)  # only 2 distinct label tokens
    assert (torch.arange(5) + d2t).tolist() == [0, 1, 2, 3, 4]  # fill: remaining ids by id order
    vocab.check_maps(d2t, t2d)
    d2t, t2d = vocab.vocab_map_from_counts(counts, 6)
    assert d2t.tolist() == [0] * 6 and bool(t2d.all())
    with pytest.raises(ValueError, match="draft_vocab_size"):
        vocab.vocab_map_from_counts(counts, 7)


def test_vocab_counts_only_loss_tokens_and_cache(tmp_path, tiny_tokenizer):
    samples = [{"input_ids": [1, 2, 3, 3], "loss_mask": [0, 0, 1, 1]}, {"input_ids": [2, 5], "loss_mask": [1, 1]}]
    c = vocab.count_tokens(samples, 8)
    assert c.tolist() == [0, 0, 1, 2, 0, 1, 0, 0]
    vm = vocab.build(samples, 8, 2, data_key="d1", tokenizer=tiny_tokenizer, root=tmp_path)
    assert vm.draft_to_target().tolist() == [2, 3] and vm.coverage == pytest.approx(3 / 4)
    files = list(tmp_path.glob("vocab-2-*.safetensors"))
    assert len(files) == 1
    again = vocab.build([], 8, 2, data_key="d1", tokenizer=tiny_tokenizer, root=tmp_path)  # from cache
    assert torch.equal(again.d2t, vm.d2t) and again.coverage == vm.coverage
    other = vocab.build(samples[1:], 8, 2, data_key="d2", tokenizer=tiny_tokenizer, root=tmp_path)
    assert other.draft_to_target().tolist() == [2, 5]
    with pytest.raises(ValueError, match="differ in length"):
        vocab.count_tokens([{"input_ids": [1], "loss_mask": [1, 0]}], 8)


def test_check_maps_catches_inconsistency():
    d2t, t2d = vocab.vocab_map_from_counts(torch.tensor([3, 1, 2, 5]), 2)
    bad = t2d.clone()
    bad[1] = True
    with pytest.raises(ValueError, match="True entries"):
        vocab.check_maps(d2t, bad)
    with pytest.raises(ValueError, match="increasing"):
        vocab.check_maps(torch.tensor([3, -1]), t2d)


# ----------------------------------------------------------------------------- offline == online training loss


@pytest.mark.parametrize("kw", [
    {"variant": "eagle3", "layer_ids": [1, 2, 3]},
    {"variant": "eagle3", "layer_ids": [1, 2, 3], "hass_topk": 4, "hass_align_steps": 2},
    {"variant": "eagle1"},
])
def test_offline_loss_matches_online(tmp_path, kw):
    from conftest import make_llama, make_tokenizer

    from specdistill import drafters
    from specdistill.drafters.eagle import EagleConfig
    from specdistill.targets import TargetModel

    target = TargetModel(make_llama(layers=4), make_tokenizer(), name="tiny-llama-4")
    torch.manual_seed(0)
    d = drafters.build(EagleConfig(**kw), target)
    layers = d.spec.target_layers(d.cfg, target.config)
    samples = _samples(6, 3)
    features.build_cache(target, {"train": samples}, layers, tmp_path / "c", shard_samples=4)
    ds = features.open_cache(tmp_path / "c")
    batch = features.make_collate(ds)([ds[i] for i in range(4)])
    off = d.loss(batch, features.offline_target_fn(ds, target)(batch))
    on = d.loss(batch, target(batch["input_ids"], batch["attention_mask"], layers=layers, return_logits=False))
    assert int(off.num_tokens) == int(on.num_tokens)
    assert torch.allclose(off.loss, on.loss, rtol=5e-4, atol=0), (off.loss, on.loss)  # measured ~7e-5 (bf16)


def test_cli_features_then_open_for(tmp_path, sharegpt_file):
    from conftest import make_llama, make_tokenizer

    from specdistill import targets
    from specdistill.cli import main
    from specdistill.config import DataConfig

    tdir = tmp_path / "tiny4"
    make_llama(layers=4).save_pretrained(tdir)
    make_tokenizer().save_pretrained(tdir)
    root, prep = tmp_path / "feat", tmp_path / "prep"
    args = ["data", "features", str(sharegpt_file), "--target", str(tdir), "--layers", "1,2", "--out", str(root),
            "--max-length", "64", "--prepared-dir", str(prep), "--shard-samples", "8", "--check-argmax", "2"]
    main(args + ["--max-shards", "1"])
    target = targets.load(str(tdir))
    dcfg = DataConfig(source=str(sharegpt_file), max_length=64, prepared_dir=str(prep))
    with pytest.raises(FileNotFoundError, match="specdistill data features"):
        features.open_for(dcfg, target, [1, 2], root=root)  # interrupted: incomplete cache is refused
    main(args)  # resumes
    train = features.open_for(dcfg, target, [2, 1], root=root, split="train")
    val = features.open_for(dcfg, target, [1, 2], root=root, split="val")
    assert len(train) + len(val) == 24 and len(train) > 0 and train.aux_layers == [1, 2]


def test_trainer_runs_offline_and_matches_online_first_loss(tmp_path):
    """train.features=offline through the real Trainer: same first-step loss as online (bf16 cache)."""
    from conftest import make_llama, make_tokenizer

    import specdistill.drafters.eagle  # noqa: F401
    from specdistill import config, drafters
    from specdistill.targets import TargetModel
    from specdistill.train import Trainer

    torch.set_num_threads(1)
    target = TargetModel(make_llama(layers=4), make_tokenizer(), name="tiny-llama-4")
    samples = _samples(8, 5)
    losses = {}
    for mode in ("online", "offline"):
        cfg = config.load(None, ["drafter.name=eagle", "drafter.layer_ids=[1,2,3]", f"train.output_dir={tmp_path / mode}",
                                 "train.micro_batch_size=4", "train.max_steps=2", "train.warmup_steps=0",
                                 "train.eval_every=0", "train.progress=false", "train.trackers=[none]",
                                 f"train.features={mode}"])
        torch.manual_seed(0)
        d = drafters.build(cfg.drafter, target)
        if mode == "offline":
            features.build_cache(target, {"train": samples}, [1, 2, 3], tmp_path / "cache", shard_samples=4)
            ds = features.open_cache(tmp_path / "cache")
            tr = Trainer(cfg, target, d, ds, None, collate_fn=features.make_collate(ds),
                         target_fn=features.offline_target_fn(ds, target))
        else:
            tr = Trainer(cfg, target, d, samples, None)
        losses[mode] = tr.fit()["losses"]
    assert len(losses["offline"]) == 2
    assert losses["offline"][0] == pytest.approx(losses["online"][0], rel=1e-3)
