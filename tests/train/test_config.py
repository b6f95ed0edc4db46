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


# -- the main stage's typed sections and the legacy `extras` form ------------------------------------

def _legacy_run_config(tmp_path, extras):
    """A run's config.yaml as written before the typed sections: the whole config with `extras`."""
    import yaml

    d = TrainConfig(store="/s", data="d", out="/o").to_dict()
    for k in ("moe", "moco", "main"):
        d.pop(k)
    d["extras"] = extras
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


def test_legacy_extras_load_onto_the_typed_fields_with_one_warning(tmp_path):
    import warnings

    p = _legacy_run_config(tmp_path, {"top_k": 1, "no_moco": True, "mu": 0.5, "tasks": ["caption", "tags"],
                                      "train_projectors": True,
                                      "moe": {"router_context": "embedding", "balance_weight": 0.05},
                                      "moco": {"tau": 0.1, "text_encoder": "embeddings"}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = TrainConfig.load(p)
    deprecations = [w for w in caught if issubclass(w.category, FutureWarning)]
    assert len(deprecations) == 1 and "extras" in str(deprecations[0].message)
    assert cfg.moe.top_k == 1 and cfg.moe.router_context == "embedding" and cfg.moe.balance_weight == 0.05
    assert not cfg.moco.enabled and cfg.moco.mu == 0.5 and cfg.moco.tau == 0.1
    assert cfg.moco.text_encoder == "embeddings"
    assert cfg.main.tasks == ["caption", "tags"] and cfg.main.train_projectors
    cfg.validate()
    assert "extras" not in cfg.to_dict()  # saved again, it is written in the typed form


def test_empty_legacy_extras_loads_silently_and_runs_load(tmp_path):
    """Every run's config.yaml before the typed sections had `extras: {}`; `astrea eval`/--resume read it."""
    import warnings

    p = _legacy_run_config(tmp_path, {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = TrainConfig.load(p)
    assert cfg.to_dict() == TrainConfig(store="/s", data="d", out="/o").to_dict()


def test_typed_and_legacy_overrides():
    cfg = TrainConfig.load(None, {"moe.top_k": "2", "moco.enabled": "false", "main.tasks": "caption,boxes"})
    assert cfg.moe.top_k == 2 and not cfg.moco.enabled and cfg.main.tasks == ["caption", "boxes"]
    with pytest.warns(FutureWarning, match="extras"):
        legacy = TrainConfig.load(None, {"extras.top_k": 2, "extras.no_moco": "true"})
    assert legacy.moe.top_k == 2 and not legacy.moco.enabled


@pytest.mark.parametrize(
    "d,match",
    [
        ({"extras": {"top_k": 1}, "moe": {"top_k": 2}}, "both moe.top_k"),
        ({"extras": {"topk": 1}}, r"extras\.topk"),
        ({"extras": {"moe": 3}}, r"extras\.moe must be a mapping"),
        ({"extras": {"no_moco": "maybe"}}, "no_moco"),
        ({"moe": {"top_k": "x"}}, r"moe\.top_k"),
    ],
)
def test_bad_main_stage_fields_are_named(d, match):
    with pytest.raises(TrainError, match=match):
        TrainConfig.from_dict(d)


def test_one_shorthand_table_for_cli_and_sweep():
    from astrea.train import sweep
    from astrea.train.config import SHORTHANDS, shorthand_overrides

    assert set(SHORTHANDS) <= set(sweep.SHORTHANDS)
    assert shorthand_overrides({"top_k": 1, "no_moco": True, "no_residual": None}) == {
        "moe.top_k": 1, "moco.enabled": False}
    assert shorthand_overrides({"no_moco": False, "no_residual": True}) == {
        "moco.enabled": True, "residual.enabled": False}
    for key, _ in SHORTHANDS.values():  # every target is a real field
        TrainConfig.load(None, {key: 1 if key.endswith("top_k") else True})


# -- compute_dtype (the words of `astrea extract --compute-dtype`) and the legacy `precision` -----------

@pytest.mark.parametrize("old,new", [("auto", "auto"), ("bf16", "bfloat16"), ("fp32", "float32")])
def test_legacy_precision_loads_as_compute_dtype_with_one_warning(tmp_path, old, new):
    """A run's config.yaml written before the rename holds `precision`; eval / --resume still read it."""
    import warnings

    import yaml

    d = TrainConfig(store="/s", data="d", out="/o").to_dict()
    d.pop("compute_dtype")
    d["precision"] = old
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = TrainConfig.load(p)
    deprecations = [w for w in caught if issubclass(w.category, FutureWarning)]
    assert len(deprecations) == 1 and "precision" in str(deprecations[0].message)
    assert cfg.compute_dtype == new and "precision" not in cfg.to_dict()
    cfg.validate()


def test_compute_dtype_words_and_legacy_conflicts():
    assert TrainConfig.load(None, {"compute_dtype": "bfloat16"}).compute_dtype == "bfloat16"
    with pytest.warns(FutureWarning, match="precision"):
        assert TrainConfig.load(None, {"precision": "fp32"}).compute_dtype == "float32"
    with pytest.raises(TrainError, match="compute_dtype"):
        TrainConfig.load(None, {"compute_dtype": "bf16", "store": "s", "data": "d", "out": "o"}).validate()
    with pytest.raises(TrainError, match="both compute_dtype"):
        TrainConfig.load(None, {"compute_dtype": "float32", "precision": "bf16"})
    with pytest.raises(TrainError, match="precision='fp16'"):
        TrainConfig.load(None, {"precision": "fp16"})
