"""`astrea shards ls|info|verify`: help texts and output on a store written here."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from astrea import config
from astrea.cli import app
from tests.shards.helpers import keys_of, make_spec, write_unit

runner = CliRunner()


@pytest.mark.parametrize("cmd", [[], ["ls"], ["info"], ["verify"]])
def test_help(cmd):
    res = runner.invoke(app, ["shards", *cmd, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage:" in res.output and "shards" in res.output
    if cmd:
        assert "STORE" in res.output and "Feature store root" in res.output
    else:
        for sub in ("ls", "info", "verify"):
            assert sub in res.output


@pytest.fixture
def written(store):
    e = store.expert_dir("sample", make_spec("siglip"), create=True)
    write_unit(e, "00000", 4, failed={keys_of("00000", 4)[2]})
    write_unit(e, "00001", 4)
    return store, e


def test_ls_and_info(written):
    store, e = written
    res = runner.invoke(app, ["shards", "ls", str(store.root)])
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if e.name in ln)
    assert line.split()[:5] == ["sample", e.name, "2", "7", "1"] and "float16" in line and "3x3" in line
    assert "RANDOM" in line
    res = runner.invoke(app, ["shards", "info", str(store.root), "--expert", "siglip"])
    assert res.exit_code == 0 and "RANDOM WEIGHTS" in res.output and "undecodable 1" in res.output, res.output
    rows = json.loads(runner.invoke(app, ["shards", "info", str(store.root), "--json"]).output)
    assert rows[0]["ok"] == 7 and rows[0]["failed"] == 1 and rows[0]["fingerprint"] == e.fingerprint


def test_default_store_from_config(written):
    store, e = written
    config.save({"store": str(store.root)})
    res = runner.invoke(app, ["shards", "ls"])
    assert res.exit_code == 0 and e.name in res.output, res.output


def test_unknown_names_and_missing_store(written, tmp_path):
    store, e = written
    res = runner.invoke(app, ["shards", "info", str(store.root), "--expert", "sam2"])
    assert res.exit_code == 2 and "Valid expert names" in res.output and e.name in res.output
    res = runner.invoke(app, ["shards", "ls", str(store.root), "--dataset", "coco"])
    assert res.exit_code == 2 and "Valid dataset names: sample" in res.output
    res = runner.invoke(app, ["shards", "ls", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "does not exist" in res.output
