"""verify recomputes checksums: flipped bytes, truncation, deleted files and leftovers are all reported."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from astrea.cli import app
from astrea.shards.audit import verify
from tests.shards.helpers import keys_of, make_spec, write_unit


def _flip(path, offset_from_end: int = 40) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def written(store):
    z = store.expert_dir("ds", make_spec("siglip"), create=True)
    w = store.expert_dir("ds", make_spec("sam2", fmt="wds"), create=True)
    for e in (z, w):
        write_unit(e, "00000", 5, failed={keys_of("00000", 5)[1]})
        write_unit(e, "00001", 5)
    return store, z, w


def _kinds(rep):
    return sorted((p.kind, p.path.rsplit("/", 1)[-1]) for p in rep.problems)


def test_clean_store_verifies(written):
    store, *_ = written
    rep = verify(store)
    assert rep.ok and rep.units_checked == 4 and rep.rows_checked == 20
    res = CliRunner().invoke(app, ["shards", "verify", str(store.root)])
    assert res.exit_code == 0 and res.output.startswith("OK:"), res.output


def test_flipped_byte_in_a_tar_member(written):
    store, z, w = written
    tar = w.data_path("00001")
    # flip one bit in the array payload of the last tokens member (npy header: 128 bytes)
    data = bytearray(tar.read_bytes())
    pos = data.find(b"\x93NUMPY", data.rfind(b".tokens.npy")) + 128 + 10
    data[pos] ^= 0x01
    tar.write_bytes(bytes(data))
    rep = verify(store)
    assert _kinds(rep) == [("corrupt", "00001.tar")]
    assert "checksum mismatch" in rep.problems[0].detail or "unreadable" in rep.problems[0].detail


def test_flipped_byte_in_a_zarr_chunk(written):
    store, z, w = written
    chunk = next(p for p in sorted((z.data_path("00000") / "tokens").rglob("*")) if p.is_file() and p.name != "zarr.json")
    _flip(chunk, 10)
    rep = verify(store)
    assert _kinds(rep) == [("corrupt", "00000.zarr")]


def test_flipped_byte_in_an_index(written):
    store, z, w = written
    _flip(z.index_path("00001"), 100)
    rep = verify(store, expert="siglip")
    assert _kinds(rep) == [("corrupt", "00001.parquet")]


def test_missing_truncated_and_uncommitted(written):
    store, z, w = written
    w.index_path("00000").unlink()  # committed, index gone
    tar = w.data_path("00001")
    tar.write_bytes(tar.read_bytes()[:3000])  # truncated
    z.stats_path("00001").unlink()  # crashed before stats
    rep = verify(store)
    assert _kinds(rep) == [("corrupt", "00001.tar"), ("missing", "00000.parquet"), ("uncommitted", "00001")]
    res = CliRunner().invoke(app, ["shards", "verify", str(store.root)])
    assert res.exit_code == 1
    assert "CORRUPT" in res.output and "MISSING" in res.output and "UNCOMMITTED" in res.output
    assert "3 problem(s)" in res.output


def test_invalid_expert_json_is_reported_not_raised(written):
    store, z, w = written
    (z.path / "expert.json").write_text("{")
    rep = verify(store)
    assert _kinds(rep) == [("invalid", "expert.json")] and "not valid JSON" in rep.problems[0].detail


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_reading_a_truncated_unit_names_the_file(store, fmt):
    from astrea.shards import StoreError

    e = store.expert_dir("ds", make_spec(fmt=fmt), create=True)
    write_unit(e, "00000", 5)
    data = e.data_path("00000")
    victim = data if data.is_file() else max((p for p in data.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(StoreError, match=rf"{data}.*(truncated|unreadable|damaged)"):
        list(e.iter_unit("00000"))
