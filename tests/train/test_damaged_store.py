"""`astrea train` on a damaged store: exit 2 with one line naming unit, key and repair command, or,
opted in (dataset.skip_damaged), the damaged rows skipped and counted in the summary; units the store
lists but cannot read are shown; a non-finite loss stops the run naming step and batch keys."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from astrea.cli import app
from astrea.schemas import ExpertSpec
from astrea.shards import Store
from tests.train.fixtures import key, make_store, spec

UNITS, PER_UNIT = 3, 8


def _train(store, out, *extra: str):
    args = ["train", "--from-shards", str(store), "--data", "toy", "--out", str(out), "--stages", "caption",
            "--steps", "2", "--batch-size", "4", "--no-progress", "--save-every", "0",
            "--set", "dataset.heldout_fraction=0.2", "--set", "dataset.heldout_max=4",
            "--set", "llm.text_warmup_steps=0", *extra]
    return CliRunner().invoke(app, args)


def _error_lines(res) -> list[str]:
    # progress and notices share the output (transformers' "Writing model shards" bar): errors are ours
    return [ln for ln in res.output.splitlines() if ln.startswith("error") or "Traceback" in ln]


def _edir(root, fmt="zarr"):
    s = spec("siglip")
    if fmt != "zarr":
        s = ExpertSpec(**{**s.__dict__, "format": fmt})
    return Store(root).expert_dir("toy", s)


def _flip(path, pos: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def zarr_store(tmp_path):
    return make_store(tmp_path / "store", experts=("siglip",), units=UNITS, per_unit=PER_UNIT)


def _tokens_file(root, unit="00001"):
    d = _edir(root).data_path(unit) / "tokens"
    return next(p for p in sorted(d.rglob("*")) if p.is_file() and p.name != "zarr.json")


def _assert_one_line_exit_2(res, unit: str, what: str) -> str:
    assert res.exit_code == 2, res.output
    lines = _error_lines(res)
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    line = lines[0]
    assert line.startswith("error: ") and f"unit {unit}" in line and "key '" in line and what in line, line
    assert "astrea shards verify" in line and "--repair" in line and "dataset.skip_damaged" in line, line
    return line


def test_flipped_byte_in_a_zarr_tokens_chunk_stops_training(zarr_store, tmp_path):
    tok = _tokens_file(zarr_store)
    _flip(tok, len(tok.read_bytes()) // 2)
    _assert_one_line_exit_2(_train(zarr_store, tmp_path / "run"), "00001", "damaged row")


def test_deleted_zarr_shard_file_stops_training(zarr_store, tmp_path):
    # zarr would read the missing shard as fill_value zeros; the default (raw) codec's reader names the file
    _tokens_file(zarr_store).unlink()
    _assert_one_line_exit_2(_train(zarr_store, tmp_path / "run"), "00001", "is missing")


def test_flipped_data_byte_in_a_wds_unit_stops_training(tmp_path):
    root = make_store(tmp_path / "store", experts=("siglip",), units=UNITS, per_unit=PER_UNIT, fmt="wds")
    tar = _edir(root, "wds").data_path("00002")
    data = bytearray(tar.read_bytes())
    k = key(2 * PER_UNIT + 5)
    data[data.find(b"\x93NUMPY", data.find(f"{k}.tokens.npy".encode())) + 128 + 3] ^= 0x01
    tar.write_bytes(bytes(data))
    line = _assert_one_line_exit_2(_train(root, tmp_path / "run"), "00002", "checksum mismatch")
    assert repr(k) in line


def test_skip_damaged_counts_them_in_the_summary(zarr_store, tmp_path):
    _tokens_file(zarr_store).unlink()
    shutil.rmtree(_edir(zarr_store).data_path("00002"))  # stats left, data gone: MISSING
    out = tmp_path / "run"
    res = _train(zarr_store, out, "--set", "dataset.skip_damaged=true")
    assert res.exit_code == 0, res.output
    store = json.loads((out / "summary.json").read_text())["store"]
    assert store["skip_damaged"] and store["damaged_rows_skipped"] >= 1
    assert all(d.startswith("siglip/00001/") for d in store["damaged"])
    assert list(store["units_not_joined"]) == ["00002"]
    assert store["units_not_joined"]["00002"]["siglip"].startswith("MISSING data")
    assert "damaged row(s) skipped" in res.output and "1 unit(s) not read" in res.output and "00002" in res.output


def test_nonfinite_features_stop_training_unless_skipped(tmp_path):
    root = make_store(tmp_path / "store", experts=("siglip",), units=UNITS, per_unit=PER_UNIT)
    e = _edir(root)
    # a unit holding a float16 overflow as extracted (inf): counted by the writer, refused by the reader
    with e.open_unit("00003") as w:
        for j in range(PER_UNIT):
            t = np.ones((e.spec.num_tokens, e.spec.token_dim), np.float32)
            if j == 2:
                t[0, 0] = 1e6
            w.add(f"big{j}", t, t.mean(0), {}, caption="a photo of a dog")
        w.commit()
    res = _train(root, tmp_path / "run")
    assert res.exit_code == 2 and len(_error_lines(res)) == 1, res.output
    assert "'big2'" in res.output and "non-finite" in res.output and "--dtype bfloat16" in res.output
    res = _train(root, tmp_path / "run2", "--set", "dataset.skip_damaged=true")
    assert res.exit_code == 0, res.output
    store = json.loads((tmp_path / "run2" / "summary.json").read_text())["store"]
    assert store["damaged_rows_skipped"] == 1 and store["damaged"][0].startswith("siglip/00003/big2: non-finite")


def test_nonfinite_loss_stops_the_run_naming_step_and_keys(zarr_store, tmp_path):
    out = tmp_path / "run"
    res = _train(zarr_store, out, "--steps", "6", "--lr", "1e30", "--set", "optim.clip_grad=0")
    assert res.exit_code == 2, res.output
    lines = _error_lines(res)
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    assert "stage caption, step " in lines[0] and "keys 'img" in lines[0] and "loss is" in lines[0]
    assert not (out / "summary.json").exists()
    for ln in (out / "metrics.jsonl").read_text().splitlines():  # strict JSON: no bare NaN
        json.loads(ln, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))


def test_summary_json_never_holds_bare_nan():
    from astrea.train.metrics import dumps_strict

    text = dumps_strict({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}})
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": {"d": None}}
