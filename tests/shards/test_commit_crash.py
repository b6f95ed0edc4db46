"""Commit protocol under a real crash: a writer process is SIGKILLed mid-unit (and mid-commit)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from astrea.shards import Store
from tests.shards.helpers import keys_of, make_spec, write_unit

ROOT = Path(__file__).resolve().parents[2]
N = 20


def _run_writer(store_root: Path, fmt: str, stop: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.shards.crash_writer", str(store_root), fmt, "00000", str(N), stop],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    line = proc.stdout.readline().strip()
    assert line == "stopped", proc.stderr.read()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def _digest(edir) -> dict[str, str]:
    """sha256 of every file of the expert dir (stats without its creation time)."""
    out = {}
    for p in sorted(edir.path.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name.endswith("_stats.json"):
                d = json.loads(data)
                d.pop("created_by")
                data = json.dumps(d, sort_keys=True).encode()
            if p.name == "expert.json":
                d = json.loads(data)
                d.pop("created_by")
                data = json.dumps(d, sort_keys=True).encode()
            out[str(p.relative_to(edir.path))] = hashlib.sha256(data).hexdigest()
    return out


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
@pytest.mark.parametrize("stop", ["adding", "before-stats"])
def test_killed_writer_then_rerun_gives_identical_unit(tmp_path, fmt, stop):
    spec = make_spec(fmt=fmt)
    # reference: the same unit written without interruption
    ref = Store(tmp_path / "ref").expert_dir("ds", spec, create=True)
    write_unit(ref, "00000", N)

    crashed_root = tmp_path / "crashed"
    _run_writer(crashed_root, fmt, stop)
    edir = Store(crashed_root).expert_dir("ds", spec)
    # the crash left something behind, but nothing a reader would take for a unit
    assert edir.temp_files() or edir.units()
    assert not edir.is_committed("00000") and edir.committed_units() == []

    # the next run: clean up, write again
    assert edir.cleanup_temp() >= 1
    assert edir.temp_files() == [] and edir.units() == []
    write_unit(edir, "00000", N)
    assert edir.committed_units() == ["00000"]
    assert [r.key for r in edir.iter_unit("00000")] == keys_of("00000", N)
    assert _digest(edir) == _digest(ref)
    assert not [p for p in edir.path.iterdir() if p.name.startswith(".")]


def test_cleanup_spares_a_live_writer(store):
    edir = store.expert_dir("ds", make_spec(), create=True)
    w = edir.open_unit("00000")
    assert edir.cleanup_temp() == 0 and len(edir.temp_files()) == 1
    w.abort()


def test_open_unit_refuses_a_unit_a_live_process_writes(tmp_path):
    root = tmp_path / "s"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.shards.crash_writer", str(root), "zarr", "00000", str(N), "adding"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "stopped"
        edir = Store(root).expert_dir("ds", make_spec())
        with pytest.raises(Exception, match=f"being written by process {proc.pid}"):
            edir.open_unit("00000")
        assert edir.cleanup_temp() == 0  # the writer is alive: its temp stays
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert edir.cleanup_temp() == 1
