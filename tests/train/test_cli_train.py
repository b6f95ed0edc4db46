"""`astrea train` command line: help, flags reaching the config, user errors as one line."""

from __future__ import annotations

from typer.testing import CliRunner

from astrea.cli import app


def test_help_lists_the_flags():
    res = CliRunner().invoke(app, ["train", "--help"])
    assert res.exit_code == 0
    for flag in ("--from-shards", "--data", "--out", "--stages", "--config", "--steps", "--batch-size",
                 "--resume", "--llm", "--workers", "--address", "--set"):
        assert flag in res.output


def test_missing_store_is_one_line_error(tmp_path):
    res = CliRunner().invoke(app, ["train", "--from-shards", str(tmp_path / "none"), "--data", "toy",
                                   "--out", str(tmp_path / "run")])
    assert res.exit_code == 2
    assert "does not exist" in res.output and "Traceback" not in res.output


def test_bad_set_names_the_field(tmp_path):
    res = CliRunner().invoke(app, ["train", "--from-shards", str(tmp_path), "--data", "toy", "--out",
                                   str(tmp_path / "run"), "--set", "optim.lrr=1"])
    assert res.exit_code == 2 and "optim.lrr" in res.output

