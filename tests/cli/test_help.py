"""Every command and sub-command explains itself: `--help` exits 0 and says more than its name."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from astrea.cli import app

runner = CliRunner()


def _command_paths() -> list[list[str]]:
    root = typer.main.get_command(app)
    paths: list[list[str]] = []

    def walk(cmd, path: list[str]) -> None:
        paths.append(path)
        # typer >= 0.16 vendors click: duck-type groups by their `commands` mapping
        if isinstance(getattr(cmd, "commands", None), dict):
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])

    walk(root, [])
    return paths


PATHS = _command_paths()


def test_every_documented_command_exists():
    names = {" ".join(p) for p in PATHS}
    for expected in ("extract", "train", "eval", "report", "sweep", "demo", "experts ls", "shards ls",
                     "shards info", "shards verify", "shards convert", "shards estimate", "data sample", "data add",
                     "data ls", "data instructions", "generate"):
        assert expected in names, f"`astrea {expected}` is missing; have {sorted(names)}"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "astrea")
def test_help(path):
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "Usage" in text
    # a real explanation, not just the usage line
    body = text.split("Usage", 1)[1]
    assert len(body.split()) > 12, text


def test_unknown_command_fails():
    result = runner.invoke(app, ["no-such-command"])
    assert result.exit_code != 0
