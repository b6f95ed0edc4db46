"""$ASTREA_HOME/config.yaml: the catalog survives concurrent writers and a broken file is a clear error."""

from __future__ import annotations

import multiprocessing as mp

import pytest
from typer.testing import CliRunner

from astrea import config
from astrea.cli import app


def _register(args: tuple[str, int]) -> None:
    home, i = args
    import os

    os.environ["ASTREA_HOME"] = home
    from astrea import config as c

    for j in range(5):  # several writes per process: without the lock most of them get lost
        c.set_dataset(f"d{i}_{j}", {"format": "folder", "path": f"/data/{i}/{j}"})


def test_concurrent_registrations_all_land(astrea_home):
    config.save({"store": "/data/store"})
    with mp.get_context("spawn").Pool(4) as pool:
        pool.map(_register, [(str(astrea_home), i) for i in range(12)])
    assert sorted(config.datasets()) == sorted(f"d{i}_{j}" for i in range(12) for j in range(5))
    assert config.load()["store"] == "/data/store"  # the rest of the file is kept
    assert not list(astrea_home.glob("*.tmp*"))  # no temporary files left behind


def test_remove_and_defaults():
    assert config.datasets() == {}
    config.set_dataset("a", {"format": "folder", "path": "/x"})
    config.set_dataset("a", None)
    assert config.datasets() == {}


@pytest.mark.parametrize("text, match", [
    ("datasets: [unclosed", "not valid YAML"),
    ("- just\n- a list\n", "mapping at the top level"),
    ("datasets: [a, b]\n", "'datasets' must be a mapping"),
])
def test_broken_config_is_one_clear_line(astrea_home, text, match):
    (astrea_home / "config.yaml").write_text(text)
    with pytest.raises(ValueError, match=match):
        config.datasets()
    r = CliRunner().invoke(app, ["data", "ls"])
    assert r.exit_code == 2, r.output
    assert "config.yaml" in r.output and "Traceback" not in r.output
