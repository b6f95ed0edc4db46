"""The Zarr writer's block/background writing: same bytes as row-by-row writing, failures surface."""

from __future__ import annotations

import pytest

from astrea.shards import Store, zarr_unit
from astrea.shards.zarr_unit import UnitWriteFailed, ZarrUnitWriter
from tests.shards.helpers import make_spec, write_unit

# 64 tokens x 512 fp16 = 64 KiB rows -> 16-row chunks (CHUNK_BYTES 1 MiB); shards forced to 2 chunks below
SPEC = dict(grid=8, token_dim=512, pooled_dim=16)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0].startswith("00000")
            and not p.name.endswith("_stats.json")}
    # (expert.json and the stats file carry a creation time)


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(zarr_unit, "SHARD_BYTES", 2 * 16 * 64 * 512 * 2)  # 2 chunks of 16 rows per shard


@pytest.mark.parametrize("n", [0, 1, 31, 75])
def test_block_and_background_writes_are_byte_identical(tmp_path, monkeypatch, small_shards, n):
    out = {}
    for background, shards in [(False, 1), (True, 1), (True, 2), (True, 3)]:
        monkeypatch.setattr(ZarrUnitWriter, "background", background)
        monkeypatch.setattr(ZarrUnitWriter, "flush_shards", shards)
        edir = Store(tmp_path / f"s-{background}-{shards}").expert_dir("ds", make_spec(**SPEC), create=True)
        stats = write_unit(edir, "00000", n, failed={"000000003"} if n > 3 else ())
        assert stats["images"] == n
        out[(background, shards)] = _files(edir.path)
        assert sum(1 for _ in edir.iter_unit("00000")) == n
    ref = out[(False, 1)]
    # several shard files, the last one partial: the case where blocks and shards could disagree
    assert sum(k.startswith("00000.zarr/tokens/c/") for k in ref) == -(-(n - (n > 3)) // 32)
    for mode, files in out.items():
        assert files == ref, mode


def test_a_failed_background_write_fails_the_unit_and_leaves_nothing(store, monkeypatch, small_shards):
    calls = []
    real = ZarrUnitWriter._write_block

    def failing(self, start, block):
        calls.append(start)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(self, start, block)

    monkeypatch.setattr(ZarrUnitWriter, "_write_block", failing)
    monkeypatch.setattr(ZarrUnitWriter, "flush_shards", 1)
    edir = store.expert_dir("ds", make_spec(**SPEC), create=True)
    # Not a ValueError: the extraction job reads ValueError from add() as one bad key and would go on.
    with pytest.raises(UnitWriteFailed, match="No space left on device") as info:
        write_unit(edir, "00000", 200)
    assert not isinstance(info.value, ValueError)
    assert edir.committed_units() == []
    assert [p.name for p in edir.path.iterdir() if p.name.startswith((".00000", "00000"))] == []


def test_abort_with_a_block_in_flight_leaves_nothing(store, small_shards):
    from tests.shards.helpers import features, keys_of

    edir = store.expert_dir("ds", make_spec(**SPEC), create=True)
    w = edir.open_unit("00000")
    for key in keys_of("00000", 40):  # one 32-row shard handed to the thread, 8 rows buffered
        t, p, out = features(key, edir.spec)
        w.add(key, t, p, out)
    w.abort()
    assert not w.tmp.exists()
    assert edir.committed_units() == []


def test_unit_write_benchmark_runs(tmp_path, monkeypatch, capsys):
    """benchmarks/unit_write.py still runs (tiny sizes; the numbers are not asserted). It sets the
    writer's class settings per mode: monkeypatch puts them back for the other tests."""
    import runpy
    import sys
    from pathlib import Path

    monkeypatch.setattr(ZarrUnitWriter, "background", ZarrUnitWriter.background)
    monkeypatch.setattr(ZarrUnitWriter, "flush_shards", ZarrUnitWriter.flush_shards)
    monkeypatch.setattr(sys, "argv", ["unit_write.py", "--images", "3", "--grid", "2", "--dim", "8", "--repeat", "1",
                                      "--modes", "sync:1,bg:2", "--dir", str(tmp_path)])
    runpy.run_path(str(Path(__file__).resolve().parents[2] / "benchmarks" / "unit_write.py"), run_name="__main__")
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    assert len(lines) == 1 + 3  # header + 2 zarr modes + wds
    assert "sync:1 (before)" in lines[1] and "bg:2" in lines[2] and lines[3].startswith("| wds")
    assert list(tmp_path.iterdir()) == []
