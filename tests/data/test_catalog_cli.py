"""Catalog (add / ls / rm, unknown names) and the `astrea data` CLI."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from astrea.cli import app
from astrea.data import UnknownDatasetError, catalog, catalog_add, detect_format, open_source
from astrea.data.base import DataError
from astrea.registry import UnknownNameError
from tests.data.builders import jpeg, write_tar

runner = CliRunner()


def _wds(tmp_path):
    return write_tar(tmp_path / "wds" / "00000.tar", [("a.jpg", jpeg()), ("a.txt", b"x")]).parent


def test_add_open_and_unknown_names(tmp_path):
    d = _wds(tmp_path)
    catalog_add("mydata", d)
    assert catalog()["mydata"] == {"format": "webdataset", "path": str(d.resolve())}
    src = open_source("mydata")
    assert src.name == "mydata" and [s.key for s in src.shards()[0]] == ["a"]
    with pytest.raises(UnknownDatasetError) as e:
        open_source("laoin")
    assert isinstance(e.value, UnknownNameError) and isinstance(e.value, KeyError)
    msg = str(e.value)
    assert "mydata" in msg and "path" in msg and "astrea data add" in msg


def test_add_validates(tmp_path):
    with pytest.raises(FileNotFoundError):
        catalog_add("x", tmp_path / "nope")
    with pytest.raises(DataError, match="dataset name"):
        catalog_add("../evil", _wds(tmp_path))
    with pytest.raises(UnknownNameError, match="webdataset"):
        catalog_add("x", _wds(tmp_path), "parquet")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no .tar"):
        catalog_add("x", empty, "webdataset")
    assert "x" not in catalog()


def test_detect_format(tmp_path):
    assert detect_format(_wds(tmp_path)) == "webdataset"
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    (tmp_path / "coco" / "annotations" / "instances_val.json").write_text("{}")
    assert detect_format(tmp_path / "coco") == "coco"
    (tmp_path / "imgs").mkdir()
    assert detect_format(tmp_path / "imgs") == "folder"


def test_catalog_entry_with_missing_path(tmp_path):
    d = _wds(tmp_path)
    catalog_add("gone", d)
    (d / "00000.tar").unlink()
    d.rmdir()
    with pytest.raises(FileNotFoundError, match="astrea data add gone"):
        open_source("gone")


@pytest.mark.parametrize("args", [["data", "--help"], ["data", "sample", "--help"], ["data", "add", "--help"],
                                  ["data", "ls", "--help"], ["data", "rm", "--help"]])
def test_help(args):
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "Usage" in r.output and len(r.output) > 200


def test_cli_sample_add_ls_rm(tmp_path):
    r = runner.invoke(app, ["data", "sample", "--out", str(tmp_path / "s"), "--images", "4", "--shards", "2"])
    assert r.exit_code == 0, r.output
    assert "2 shards" in r.output and "registered as `sample`" in r.output
    r = runner.invoke(app, ["data", "add", "mine", str(_wds(tmp_path))])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["data", "ls"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split() == ["name", "format", "path", "shards"]
    assert lines[1].split()[:2] == ["mine", "webdataset"] and lines[1].split()[-1] == "1"
    assert lines[2].split()[:2] == ["sample", "webdataset"] and lines[2].split()[-1] == "2"
    r = runner.invoke(app, ["data", "rm", "mine"])
    assert r.exit_code == 0 and "mine" not in catalog()


def test_cli_errors_are_one_line(tmp_path):
    r = runner.invoke(app, ["data", "add", "x", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "error:" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["data", "sample", "--out", str(tmp_path / "s"), "--images", "1", "--shards", "3"])
    assert r.exit_code == 2 and "shards=3" in r.output
    r = runner.invoke(app, ["data", "rm", "nothing"])
    assert r.exit_code == 2 and "unknown dataset" in r.output


def test_import_is_cheap():
    import subprocess
    import sys

    code = ("import sys, astrea.data; heavy = [m for m in ('torch', 'pyarrow', 'PIL', 'ray') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
