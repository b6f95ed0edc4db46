"""TrainConfig: file (YAML / TOML) < overrides, typed coercion, errors that name the field."""

from __future__ import annotations

import pytest

from astrea.train.config import TrainConfig
from astrea.train.errors import TrainError


def test_yaml_file_then_overrides(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("data: toy\nsteps: 7\noptim:\n  lr: 0.002\n  betas: [0.8, 0.9]\nresidual: {reading: attn}\n")
    cfg = TrainConfig.load(f, {"steps": "9", "optim.grad_accum": 2, "stages": "caption,all", "store": "s", "out": "o"})
    assert cfg.steps == 9 and cfg.optim.lr == 0.002 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.optim.grad_accum == 2 and cfg.residual.reading == "attn"
    assert cfg.stages == ["caption", "all"] and cfg.optim.weight_decay == 0.05  # default kept
    cfg.validate()


def test_toml_and_dict_overrides(tmp_path):
    f = tmp_path / "t.toml"
    f.write_text('data = "toy"\n[stage_experts]\ncaption = "clip"\n[llm]\nlora = true\n')
    cfg = TrainConfig.load(f, {"stage_experts.detection": "gdino", "llm.lora": "false"})
    assert cfg.stage_experts["caption"] == "clip" and cfg.stage_experts["detection"] == "gdino"
    assert cfg.stage_experts["classification"] == "ram_plus" and cfg.llm.lora is False


def test_saved_config_round_trips(tmp_path):
    cfg = TrainConfig.load(None, {"store": "s", "data": "d", "out": "o", "optim.lr": 3e-4})
    cfg.save(tmp_path / "c.yaml")
    assert TrainConfig.load(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"optim.learning_rate": 1}, r"optim\.learning_rate"),
        ({"steps": "many"}, "steps='many'"),
        ({"residual.reading": "both"}, "residual.reading"),
        ({"residual.at_eval": "mean"}, "residual.at_eval"),
        ({"steps": 0}, "steps=0"),
        ({"optim.warmup": 1.5}, "optim.warmup"),
        ({"stages": "caption,caption"}, "listed twice"),
    ],
)
def test_bad_fields_are_named(overrides, match):
    with pytest.raises(TrainError, match=match):
        TrainConfig.load(None, {"store": "s", "data": "d", "out": "o", **overrides}).validate()


def test_missing_file_and_bad_extension(tmp_path):
    with pytest.raises(TrainError, match="does not exist"):
        TrainConfig.load(tmp_path / "nope.yaml")
    (tmp_path / "c.ini").write_text("x")
    with pytest.raises(TrainError, match="unknown extension"):
        TrainConfig.load(tmp_path / "c.ini")
