"""The commit protocol has no holes: another process's cleanup never touches a unit a live writer owns
(even between its data rename and its stats file), a unit whose data went missing or was damaged is
quarantined and written again by a rerun, and `astrea shards verify --repair` marks damaged units so
the next extraction redoes them. The live writer is a real second process, sequenced by its stdout and
stdin (no sleeps)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from astrea.cli import app
from astrea.shards import Store
from astrea.shards.audit import verify
from tests.shards.helpers import features, keys_of, make_spec, write_unit

ROOT = Path(__file__).resolve().parents[2]
N = 8


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_cleanup_spares_a_unit_committing_in_another_process(tmp_path, fmt):
    root = tmp_path / "store"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.shards.crash_writer", str(root), fmt, "00000", str(N), "pause-before-stats"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "stopped", proc.stderr.read()
        edir = Store(root).expert_dir("ds", make_spec(fmt=fmt))
        # the writer renamed its data and wrote its index; no stats yet: it looks like a crash, but it is not
        assert edir.data_path("00000").exists() and not edir.stats_path("00000").exists()
        assert edir.cleanup_temp() == 0
        assert verify(Store(root), repair=True).problems[0].repaired == "left alone: a live writer holds the unit"
        assert edir.data_path("00000").exists() and edir.index_path("00000").exists()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "committed", proc.stderr.read()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert edir.committed_units() == ["00000"] and verify(Store(root)).ok
    assert [r.key for r in edir.iter_unit("00000")] == keys_of("00000", N)
    assert not [p for p in edir.path.iterdir() if p.name.startswith(".")]  # the lock went with the writer


def _rewrite_differently(edir, unit):
    """A rerun whose bytes differ from the first run (another batch size, another failure reason...)."""
    with edir.open_unit(unit) as w:
        for i, key in enumerate(keys_of(unit, N)):
            if i == 3:
                w.add_failure(key, "undecodable: rerun")
                continue
            t, p, out = features(key, edir.spec)
            w.add(key, t, p, out)
        return w.commit()


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
@pytest.mark.parametrize("cleanup_first", [True, False])
def test_unit_with_stats_but_no_data_is_quarantined_and_rewritten(store, fmt, cleanup_first):
    edir = store.expert_dir("ds", make_spec(fmt=fmt), create=True)
    write_unit(edir, "00000", N)
    write_unit(edir, "00001", N)
    p = edir.data_path("00000")
    shutil.rmtree(p) if p.is_dir() else p.unlink()
    assert [x.kind for x in verify(store).problems] == ["missing"]
    assert not edir.is_committed("00000")
    if cleanup_first:  # what `astrea extract` does first
        assert edir.cleanup_temp() == 2  # stats and index moved aside
    _rewrite_differently(edir, "00000")
    assert verify(store).ok and edir.committed_units() == ["00000", "00001"]
    assert [r.status for r in edir.iter_unit("00000")].count("failed") == 1
    q = list((edir.path / ".quarantine").iterdir())
    assert len(q) == 1 and {f.name for f in q[0].iterdir()} == {"00000_stats.json", "00000.parquet", "why.txt"}


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_verify_repair_marks_a_damaged_unit_for_the_next_extraction(store, fmt):
    edir = store.expert_dir("ds", make_spec(fmt=fmt), create=True)
    write_unit(edir, "00000", N)
    write_unit(edir, "00001", N)
    if fmt == "zarr":
        chunk = next(p for p in sorted((edir.data_path("00001") / "tokens").rglob("*")) if p.is_file() and p.name != "zarr.json")
    else:
        chunk = edir.data_path("00001")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x04
    chunk.write_bytes(bytes(data))
    res = CliRunner().invoke(app, ["shards", "verify", str(store.root), "--repair"])
    assert res.exit_code == 1 and "CORRUPT" in res.output and "repaired: 1 unit(s) moved aside" in res.output, res.output
    assert edir.committed_units() == ["00000"]  # so the next extraction redoes 00001 (it skips committed ones)
    _rewrite_differently(edir, "00001")
    res = CliRunner().invoke(app, ["shards", "verify", str(store.root)])
    assert res.exit_code == 0 and res.output.startswith("OK:"), res.output
