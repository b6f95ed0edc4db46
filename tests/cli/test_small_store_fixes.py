"""Issue 14, item 8: verify stays inside STORE and does not call an empty directory OK; a stray or
broken EXPERT@FP directory only blocks runs that need that expert; the train error names the real
`--expert` flag; a run directory inside the store is refused."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from astrea.cli import app
from tests.train.fixtures import make_store


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path / "store", experts=("siglip",), units=1, per_unit=6)


def _lines(res):
    return [ln for ln in res.output.splitlines() if ln.startswith("error") or "Traceback" in ln]


def test_verify_dataset_outside_the_store_is_refused(store, tmp_path):
    make_store(tmp_path / "x", experts=("siglip",), units=1, per_unit=2)  # a sibling a "../x" would reach
    res = CliRunner().invoke(app, ["shards", "verify", str(store), "--dataset", "../x"])
    assert res.exit_code == 2 and _lines(res) == [_lines(res)[0]] and "not valid" in res.output, res.output


def test_verify_of_an_empty_directory_is_not_ok(tmp_path):
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(app, ["shards", "verify", str(tmp_path / "empty")])
    assert res.exit_code == 1 and "no expert directory" in res.output, res.output


def _train(store, out, *extra):
    return CliRunner().invoke(app, ["train", "--from-shards", str(store), "--data", "toy", "--out", str(out),
                                    "--stages", "caption", "--steps", "1", "--batch-size", "2", "--no-progress",
                                    "--set", "dataset.heldout_fraction=0.0", "--set", "llm.text_warmup_steps=0", *extra])


def test_stray_and_broken_expert_directories_block_only_runs_that_need_them(store, tmp_path):
    (store / "toy" / "notes@draft").mkdir()  # a stray folder
    broken = store / "toy" / "ram_plus@000000000000"
    broken.mkdir()
    (broken / "expert.json").write_text("{not json")
    res = _train(store, tmp_path / "run")  # caption reads siglip only
    assert res.exit_code == 0, res.output
    res = _train(store, tmp_path / "run2", "--stages", "classification")  # needs ram_plus: that one is named
    assert res.exit_code == 2 and "ram_plus" in res.output and "expert.json" in res.output, res.output


def test_missing_expert_error_names_the_real_flag(store, tmp_path):
    res = _train(store, tmp_path / "run", "--stages", "segmentation")
    assert res.exit_code == 2 and "astrea extract --expert sam2" in res.output and "--experts" not in res.output


def test_run_directory_inside_the_store_is_refused(store):
    res = _train(store, store / "runs" / "a")
    assert res.exit_code == 2 and "inside the feature store" in res.output, res.output
    assert not (store / "runs").exists()
