"""The actor's overlapped writer (writer thread + the raw zarr writer's background shard writes) keeps the
commit protocol: a real second process killed while a unit's rows are on disk in its temp directory leaves
no committed (or partial) unit; the next run cleans up and writes the unit whole, the same bytes as a run
that was never interrupted."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

from astrea.shards import Store
from astrea.shards.audit import verify
from tests.extract.actor_crash_child import spec

ROOT = Path(__file__).resolve().parents[2]
N = 10  # five windows of two


def _source(root: Path) -> Path:
    from PIL import Image

    src = root / "src"
    src.mkdir()
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, format="PNG")
    with tarfile.open(src / "00000.tar", "w") as tar:
        for i in range(N):
            for name, data in ((f"{i:06d}.png", buf.getvalue()), (f"{i:06d}.txt", f"image {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return src


def _child(src: Path, store: Path, ready: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.extract.actor_crash_child", str(src), str(store), "00000", ready],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _data_files(edir) -> dict[str, bytes]:
    d = edir.data_path("00000")
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_killed_mid_unit_leaves_nothing_committed_and_the_rerun_completes(tmp_path, monkeypatch):
    from astrea.shards import zarr_unit
    from tests.extract import actor_crash_child

    monkeypatch.setattr(zarr_unit, "SHARD_BYTES", zarr_unit.SHARD_BYTES)  # the in-process runs below change it
    src = _source(tmp_path)
    store = tmp_path / "store"
    ready = tmp_path / "ready"
    proc = _child(src, store, str(ready))
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():  # the event: rows on disk, the unit open
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the child never reached the middle of its unit"
            time.sleep(0.02)
        edir = Store(store).expert_dir("toy", spec())
        temps = list(edir.path.glob(".00000.zarr.tmp-*"))
        assert temps and list(temps[0].glob("tokens/c/*/0/0"))  # rows were written, in the temp directory
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not edir.is_committed("00000") and edir.committed_units() == []
    assert not edir.stats_path("00000").exists() and not edir.data_path("00000").exists()
    assert edir.unit_problem("00000") == "not extracted"  # readers see no unit, not half of one

    assert edir.cleanup_temp() >= 1  # what every job does first: the dead writer's temp goes
    result = actor_crash_child.main(str(src), str(store), "00000", "-")  # the rerun, as the next job's actor
    assert result["status"] == "committed" and result["ok"] == N
    assert verify(Store(store)).ok
    assert [r.key for r in edir.iter_unit("00000")] == [f"{i:06d}" for i in range(N)]
    assert not list(edir.path.glob(".00000.zarr.tmp-*"))
    # the same bytes as a run that was never interrupted
    clean = tmp_path / "clean"
    assert actor_crash_child.main(str(src), str(clean), "00000", "-")["status"] == "committed"
    assert _data_files(edir) == _data_files(Store(clean).expert_dir("toy", spec()))
