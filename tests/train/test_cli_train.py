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



def test_every_flag_reaches_the_saved_config(toy_store, tmp_path):
    """A real `astrea train`: each flag's value is what RUN/config.yaml records (flag -> field once, on the option)."""
    import yaml

    out = tmp_path / "run"
    res = CliRunner().invoke(app, [
        "train", "--from-shards", str(toy_store), "--data", "toy", "--out", str(out), "--stages", "caption",
        "--steps", "2", "--batch-size", "3", "--grad-accum", "2", "--lr", "0.000123", "--seed", "7",
        "--save-every", "5", "--top-k", "2", "--no-residual", "--no-moco", "--device", "cpu", "--no-progress",
        "--set", "llm.text_warmup_steps=0"])
    assert res.exit_code == 0, res.output
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert (cfg["stages"], cfg["steps"], cfg["batch_size"], cfg["seed"], cfg["save_every"]) == (["caption"], 2, 3, 7, 5)
    assert cfg["optim"]["lr"] == 0.000123 and cfg["optim"]["grad_accum"] == 2 and cfg["device"] == "cpu"
    assert cfg["moe"]["top_k"] == 2 and cfg["residual"]["enabled"] is False and cfg["moco"]["enabled"] is False
    assert cfg["data"] == "toy" and cfg["out"] == str(out) and cfg["progress"] is False
