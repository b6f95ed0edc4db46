"""End to end on a small real store: files, metrics, held-out L_reg falling, freezing, bad input."""

from __future__ import annotations

import json
import math

import pytest
from safetensors.torch import load_file

from astrea.train.config import TrainConfig
from astrea.train.errors import TrainError
from astrea.train.metrics import read_metrics
from astrea.train.runner import run_local
from tests.train.fixtures import make_store, spec


def _cfg(store, out, **over) -> TrainConfig:
    base = {
        "store": str(store), "data": "toy", "out": str(out), "stages": "caption,classification",
        "steps": 4, "batch_size": 6, "optim.lr": 3e-3, "dataset.heldout_fraction": 0.2,
        "save_every": 2, "progress": False,
        # trainer mechanics on a random LLM: loss falls from the untrained value within a few steps (the
        # warmed-up LLM and the image-use control are tested in test_control.py)
        "llm.text_warmup_steps": 0,
    }
    base.update(over)
    return TrainConfig.load(None, base)


@pytest.fixture(scope="module")
def trained(toy_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    summary = run_local(_cfg(toy_store, out))
    return out, summary


def test_run_writes_everything(trained):
    out, summary = trained
    for f in ("config.yaml", "run.json", "metrics.jsonl", "summary.json", "llm/config.json",
              "stages/caption/model.safetensors", "stages/classification/model.safetensors"):
        assert (out / f).exists(), f
    assert any((out / "tb").iterdir())
    run = json.loads((out / "run.json").read_text())
    assert run["llm"]["random_weights"] is True and run["experts"]["siglip"] == spec("siglip").fingerprint()
    assert summary["llm"]["random_weights"] is True
    assert [s["name"] for s in summary["stages"]] == ["caption", "classification"]
    assert TrainConfig.load(out / "config.yaml").stages == ["caption", "classification"]


def test_metrics_rows(trained):
    out, _ = trained
    rows = read_metrics(out / "metrics.jsonl")
    train = [r for r in rows if r["kind"] == "train"]
    assert [(r["stage"], r["step"]) for r in train] == [(s, i) for s in ("caption", "classification") for i in range(1, 5)]
    for r in train:
        assert r["loss"] > 0 and r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 and 0 <= r["data_wait"] <= 1
    # warm-up: ceil(15% of 4) = 1 step reaching the peak, then cosine from the peak towards 0
    lrs = [r["lr"] for r in train if r["stage"] == "caption"]
    cos = [0.5 * (1 + math.cos(math.pi * k / 3)) for k in range(3)]
    assert lrs == pytest.approx([3e-3] + [3e-3 * c for c in cos])


def test_heldout_loss_falls_from_untrained_value(trained):
    _, summary = trained
    for s in summary["stages"]:
        assert s["heldout_before"] is not None and s["heldout_after"] < s["heldout_before"], s


def test_later_stage_leaves_earlier_stage_weights_unchanged(trained):
    out, _ = trained
    cap = load_file(str(out / "stages/caption/model.safetensors"))
    cls = load_file(str(out / "stages/classification/model.safetensors"))
    frozen = [k for k in cap if k.startswith("projectors.siglip.")]
    trained_now = [k for k in cap if k.startswith(("projectors.ram_plus.", "residuals.ram_plus."))]
    assert frozen and trained_now
    assert all((cap[k] == cls[k]).all() for k in frozen)
    assert all((cap[k] == cls[k]).all() for k in cap if k.startswith(("projectors.sam2.", "residuals.siglip.")))
    assert any((cap[k] != cls[k]).any() for k in trained_now)
    assert (cap["residuals.ram_plus.gamma"] != cls["residuals.ram_plus.gamma"]).all()


def test_existing_run_needs_resume(trained, toy_store):
    out, _ = trained
    with pytest.raises(TrainError, match="--resume"):
        run_local(_cfg(toy_store, out))


def test_hidden_size_change_on_resume_is_refused(trained, toy_store):
    out, _ = trained
    with pytest.raises(TrainError, match="hidden size 64"):
        run_local(_cfg(toy_store, out, resume=True, **{"llm.hidden_size": 32}))


def test_missing_expert_is_one_clear_error_before_any_step(tmp_path):
    store = make_store(tmp_path / "s", experts=("siglip",), units=1, per_unit=4)
    with pytest.raises(TrainError, match=r"expert 'ram_plus' \(needed by stage classification\).*holds \['siglip'\]"):
        run_local(_cfg(store, tmp_path / "run"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_fingerprint_mismatch_is_refused(toy_store, tmp_path):
    with pytest.raises(TrainError, match="siglip"):
        run_local(_cfg(toy_store, tmp_path / "run", expected_fingerprints={"siglip": "0123456789ab"}))
    ok = _cfg(toy_store, tmp_path / "run", expected_fingerprints={"siglip": spec("siglip").fingerprint()},
              stages="caption", steps=1, save_every=0, **{"dataset.heldout_fraction": 0.0})
    assert run_local(ok)["stages"][0]["steps"] == 1


def test_unknown_dataset_lists_the_ones_there(toy_store, tmp_path):
    with pytest.raises(TrainError, match=r"dataset 'nope'.*\['toy'\]"):
        run_local(_cfg(toy_store, tmp_path / "run", data="nope"))
