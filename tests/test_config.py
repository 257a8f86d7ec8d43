"""Config: typed overrides, unknown keys listed, docstrings, every shipped YAML parses."""

from __future__ import annotations

from pathlib import Path

import pytest
import toy_drafter  # noqa: F401

from specdistill import config


def test_overrides_are_typed():
    cfg = config.load(None, ["train.lr=3e-4", "train.max_steps=7", "train.resume=false", "train.mixed_precision=no",
                             "train.betas=[0.8, 0.9]", "export.formats=native,vllm", "drafter.name=toy",
                             "drafter.nan_after=3", "data.val_fraction=0.5"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.resume is False
    assert cfg.train.mixed_precision == "no"
    assert cfg.train.betas == [0.8, 0.9]
    assert cfg.export.formats == ["native", "vllm"]
    assert cfg.drafter.nan_after == 3 and type(cfg.drafter).__name__ == "ToyConfig"
    assert cfg.train.output_dir == str(Path("checkpoints") / "run")


def test_unknown_key_lists_valid_keys():
    with pytest.raises(config.ConfigError) as e:
        config.load(None, ["train.learning_rate=1"])
    msg = str(e.value)
    assert "train.learning_rate" in msg and "lr" in msg and "grad_accum" in msg
    with pytest.raises(config.ConfigError, match="valid keys at this level: target, data, drafter"):
        config.load(None, ["trian.lr=1"])


def test_bad_values_name_the_key():
    with pytest.raises(config.ConfigError, match="train.max_steps"):
        config.load(None, ["train.max_steps=lots"])
    with pytest.raises(config.ConfigError, match="train.mixed_precision"):
        config.load(None, ["train.mixed_precision=fp8"])
    with pytest.raises(config.ConfigError, match="drafter.name"):
        config.load(None, ["drafter.name=nonexistent"])
    with pytest.raises(config.ConfigError, match="key=value"):
        config.load(None, ["train.lr"])


def test_user_yaml_then_overrides(tmp_path):
    y = tmp_path / "u.yaml"
    y.write_text("train:\n  lr: 0.1\n  max_steps: 5\n")
    cfg = config.load(None, [f"config={y}", "train.max_steps=9"])
    assert cfg.train.lr == 0.1 and cfg.train.max_steps == 9


def test_every_field_documented():
    import dataclasses

    for cls in (config.RunConfig, config.TargetConfig, config.DataConfig, config.TrainConfig,
                config.ExportConfig, config.EvalConfig):
        docs = config.field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__}: undocumented fields {missing}"
    lines = config.describe(config.RunConfig())
    assert any(line.startswith("train.lr = ") and "AdamW" in line for line in lines)


def test_roundtrip_dict():
    cfg = config.load(None, ["drafter.name=toy", "train.lr=0.5"])
    again = config.from_dict(config.to_dict(cfg))
    assert again == cfg


@pytest.mark.parametrize("yml", sorted(config.RECIPE_CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_yaml_parses(yml):
    cfg = config.load(yml.stem, [])
    assert cfg.drafter is not None, f"{yml}: no drafter section"
    first = yml.read_text().splitlines()[0]
    assert first.startswith("#") and ("launch" in first or "specdistill" in first), f"{yml}: header must give the launch command"
