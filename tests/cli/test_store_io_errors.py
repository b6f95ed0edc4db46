"""Store and file I/O errors end in one `error:` line and exit 2, checked before Ray starts where they
can be (issue 14, item 7): an empty source folder, --store naming a file, a read-only store, an
--out on a read-only filesystem, an --llm directory holding a damaged file."""

from __future__ import annotations

import subprocess
import uuid

import pytest
from typer.testing import CliRunner

from astrea.cli import app


def _one_error_line(res) -> str:
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error") or "Traceback" in ln]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.output, res.output
    return lines[0]


def _extract(data, store):
    return CliRunner().invoke(app, ["extract", "--expert", "siglip", "--data", str(data), "--store", str(store),
                                    "--small", "--weights", "random", "--no-progress"])


@pytest.fixture
def images(tmp_path):
    import numpy as np
    from PIL import Image

    d = tmp_path / "imgs"
    d.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(d / "a.png")
    return d


@pytest.fixture
def readonly_dir(tmp_path):
    """A directory on a read-only bind mount (root ignores permission bits, so chmod proves nothing)."""
    src, mnt = tmp_path / "ro_src", tmp_path / f"ro_{uuid.uuid4().hex[:6]}"
    src.mkdir()
    mnt.mkdir()
    (src / "store").mkdir()
    ok = subprocess.run(["mount", "--bind", str(src), str(mnt)], capture_output=True).returncode == 0
    if ok and subprocess.run(["mount", "-o", "remount,bind,ro", str(mnt)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        ok = False
    if not ok:
        pytest.skip("cannot make a read-only bind mount here (needs root with mount rights)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_empty_source_folder_is_one_line_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    line = _one_error_line(_extract(tmp_path / "empty", tmp_path / "store"))
    assert "no image files found" in line


def test_store_that_is_a_file_is_one_line_exit_2(tmp_path, images):
    (tmp_path / "afile").write_text("x")
    line = _one_error_line(_extract(images, tmp_path / "afile"))
    assert "is a file, not a directory" in line and "--store" in line


@pytest.mark.parametrize("sub", ["store", "new/store"])  # an existing store, one it would have to create
def test_read_only_store_is_one_line_exit_2_before_any_work(readonly_dir, images, sub):
    line = _one_error_line(_extract(images, readonly_dir / sub))
    assert "cannot write there" in line and "Read-only file system" in line


def test_the_store_check_creates_nothing(tmp_path):
    # a job refused after the check (a missing prerequisite, say) leaves no empty store behind
    from astrea.shards import Store

    Store(tmp_path / "a" / "store").check_writable()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "s").mkdir()
    Store(tmp_path / "s").check_writable()  # an existing store is probed with a temp file, removed
    assert list((tmp_path / "s").iterdir()) == []


def test_train_out_on_a_read_only_filesystem_is_one_line_exit_2(readonly_dir, tmp_path):
    from tests.train.fixtures import make_store

    store = make_store(tmp_path / "store", experts=("siglip",), units=1, per_unit=6)
    res = CliRunner().invoke(app, ["train", "--from-shards", str(store), "--data", "toy", "--out",
                                   str(readonly_dir / "run"), "--stages", "caption", "--steps", "1", "--no-progress",
                                   "--set", "llm.text_warmup_steps=0"])
    line = _one_error_line(res)
    assert "Read-only file system" in line and str(readonly_dir / "run") in line


def test_llm_directory_with_a_damaged_file_is_one_line_exit_2(tmp_path):
    from astrea.train.config import LLMConfig
    from astrea.train.llm import build_llm, save_llm
    from tests.train.fixtures import make_store

    d = tmp_path / "llm"
    save_llm(build_llm(LLMConfig()), d)
    (d / "tokenizer.json").write_text("garbage, not JSON")
    store = make_store(tmp_path / "store", experts=("siglip",), units=1, per_unit=6)
    res = CliRunner().invoke(app, ["train", "--from-shards", str(store), "--data", "toy", "--out", str(tmp_path / "run"),
                                   "--stages", "caption", "--steps", "1", "--llm", str(d), "--no-progress",
                                   "--set", "llm.text_warmup_steps=0"])
    line = _one_error_line(res)
    assert "could not be loaded" in line and str(d) in line
