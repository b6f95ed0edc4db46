"""`astrea sweep`: variant resolution (each ablation is one field) and a real two-variant sweep."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from astrea.cli import app
from astrea.train.errors import TrainError
from astrea.train.sweep import load_sweep, stage_order, variant_config
from tests.train.test_eval import TINY_TRAIN, write_store


def sweep_file(tmp_path: Path, variants: list, **top) -> Path:
    doc = {"set": {"store": str(tmp_path / "store"), "data": "tiny"}, "out": "out", "variants": variants, **top}
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def test_each_ablation_is_one_field(tmp_path):
    p = sweep_file(tmp_path, [
        "paper",
        {"name": "top1", "top_k": 1},
        {"name": "nomoco", "no_moco": True},
        {"name": "nores", "no_residual": True},
        {"name": "clip", "stage_experts": {"caption": "clip"}},
        {"name": "rev", "stage_order": "reversed"},
        {"name": "capall", "stage_order": "all-at-once"},
        {"name": "lr", "set": {"optim.lr": 2e-4}},
    ])
    spec = load_sweep(p)
    cfgs = {v.name: variant_config(spec, v) for v in spec.variants}
    assert cfgs["paper"].moe.top_k == 3 and cfgs["paper"].moco.enabled and cfgs["paper"].residual.enabled
    assert cfgs["top1"].moe.top_k == 1 and cfgs["top1"].moco.enabled
    assert not cfgs["nomoco"].moco.enabled and cfgs["nomoco"].moe.top_k == 3
    assert not cfgs["nores"].residual.enabled
    assert cfgs["clip"].stage_experts == {"caption": "clip", "classification": "ram_plus",
                                          "detection": "grounding_dino", "segmentation": "sam2"}
    assert cfgs["rev"].stages == ["segmentation", "detection", "classification", "caption", "main"]
    assert cfgs["capall"].stages == ["caption", "all", "main"]
    assert cfgs["lr"].optim.lr == 2e-4
    assert all(c.store == str(tmp_path / "store") for c in cfgs.values())
    assert cfgs["top1"].out == str(tmp_path / "out" / "top1")


@pytest.mark.parametrize(
    "variants,match",
    [
        ([{"name": "a", "topk": 1}], "unknown field"),
        ([{"name": "a"}, {"name": "a"}], "repeated"),
        ([{"name": "a", "set": {"store": "/x"}}], "one store"),
        ([{"name": "a", "stage_order": "sideways"}], "stage_order"),
        ([], "non-empty"),
    ],
)
def test_bad_sweep_files_fail_before_training(tmp_path, variants, match):
    p = sweep_file(tmp_path, variants)
    with pytest.raises(TrainError, match=match):
        spec = load_sweep(p)
        for v in spec.variants:
            variant_config(spec, v)


def test_bad_option_in_any_variant_fails_before_the_first_trains(tmp_path):
    p = sweep_file(tmp_path, ["paper", {"name": "k9", "top_k": 9}])
    r = CliRunner().invoke(app, ["sweep", str(p)])
    assert r.exit_code == 2 and "k9" in r.output and "moe.top_k" in r.output, r.output
    assert not (tmp_path / "out" / "paper").exists()


def test_stage_order_named_orders():
    base = ["caption", "classification", "detection", "segmentation", "main"]
    assert stage_order(base, "default", "x") == base
    assert stage_order(base[:-1], "reversed", "x") == base[:-1][::-1]
    assert stage_order(base, ["caption", "main"], "x") == ["caption", "main"]


def test_sweep_runs_variants_and_writes_one_table(tmp_path):
    write_store(tmp_path / "store")
    common = {k: v for k, v in TINY_TRAIN.items() if k != "data"}
    common["steps"] = 1
    p = sweep_file(
        tmp_path,
        # "clip": an expert the store does not hold, found only when that variant starts
        [{"name": "top2", "top_k": 2}, {"name": "nomoco", "no_moco": True},
         {"name": "clip", "stage_experts": {"caption": "clip"}}],
        eval={"max_samples": 4, "batch_size": 4},
    )
    doc = yaml.safe_load(p.read_text())
    doc["set"].update(common)
    p.write_text(yaml.safe_dump(doc))
    r = CliRunner().invoke(app, ["sweep", str(p)])
    assert r.exit_code == 1, r.output  # one variant failed: reported, the others still ran
    assert "clip" in r.output
    out = tmp_path / "out"
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [x["variant"] for x in rows] == ["top2", "nomoco", "clip"]
    assert rows[0]["status"] == "ok" and float(rows[0]["L_reg main"]) > 0 and rows[0]["i2t R@1"] != ""
    assert rows[1]["status"] == "ok" and rows[1]["i2t R@1"] == ""  # no MoCo, no retrieval
    assert rows[2]["status"].startswith("failed") and "clip" in rows[2]["status"]
    assert json.loads((out / "top2" / "eval.json").read_text())["routing"]["top_k"] == 2
    md = (out / "sweep.md").read_text()
    assert md.count("\n| ") == 4 and "RANDOM WEIGHTS" in md
    # rerun: finished variants are reused, not retrained
    mtime = (out / "top2" / "eval.json").stat().st_mtime
    r = CliRunner().invoke(app, ["sweep", str(p)])
    assert (out / "top2" / "eval.json").stat().st_mtime == mtime
    assert list(csv.DictReader(open(out / "sweep.csv")))[0]["status"] == "reused"
