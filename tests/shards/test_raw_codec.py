"""The default zarr codec ``raw``: uncompressed shards written and read by astrea per the zarr v3 spec.

What must hold: zarr-python alone reads the same arrays (the plain-reader promise), the shard files are
byte for byte what zarr-python writes for the same array, rows round-trip exactly, a damaged shard index
is a damaged row (not zeros), and a store written with the previous default (zstd) keeps its fingerprint
and stays readable.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from astrea.schemas import ExpertSpec, SpecError
from astrea.shards import DamagedRowError, Store, zarr_unit
from astrea.shards.dtypes import to_storage
from tests.shards.helpers import features, keys_of, make_spec, write_unit

N = 7  # three shards of 3 rows below, the last one partial
# make_spec("siglip", fmt) fingerprints computed by the code before the codec field existed (git show
# 3692fb7:schemas/expert_spec.py): a zstd zarr spec and a wds spec must keep them.
LEGACY_FP = {"zarr": "1318a6919bcd", "wds": "f9d2adf24751"}


@pytest.fixture
def small_shards(monkeypatch):
    spec = make_spec()
    monkeypatch.setattr(zarr_unit, "SHARD_BYTES", 3 * spec.num_tokens * spec.token_dim * 2)  # 3 rows per shard


def _shards(edir, unit="00000"):
    return sorted(p for p in (edir.data_path(unit) / "tokens" / "c").rglob("*") if p.is_file())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_round_trip_and_plain_zarr_reads_the_same(store, monkeypatch, dtype):
    import zarr

    spec = make_spec(dtype=dtype)
    monkeypatch.setattr(zarr_unit, "SHARD_BYTES", 3 * spec.num_tokens * spec.token_dim * (4 if dtype == "float32" else 2))
    assert spec.codec == "raw"
    edir = store.expert_dir("ds", spec, create=True)
    failed = {keys_of("00000", N + 1)[2]}
    write_unit(edir, "00000", N + 1, failed=failed)
    assert len(_shards(edir)) == 3
    ok = [k for k in keys_of("00000", N + 1) if k not in failed]
    recs = [r for r in edir.iter_unit("00000") if r.status == "ok"]
    assert [r.key for r in recs] == ok
    g = zarr.open_group(str(edir.data_path("00000")), mode="r")
    assert g.attrs["astrea"]["codec"] == "raw"
    plain = g["tokens"][:]
    assert plain.shape == (len(ok), spec.num_tokens, spec.token_dim)
    for i, (key, rec) in enumerate(zip(ok, recs)):
        t, p, out = features(key, spec)
        want = to_storage(t, dtype)
        assert np.array_equal(plain[i], want)  # zarr-python alone
        np.testing.assert_array_equal(to_storage(rec.tokens, dtype) if dtype == "bfloat16" else rec.tokens, want)
        assert rec.outputs == out
        assert rec.tokens.flags.owndata or rec.tokens.base is not None  # a real array, not a view of a block


def test_shard_files_are_what_zarr_python_writes(store, tmp_path, small_shards):
    import zarr

    edir = store.expert_dir("ds", make_spec(), create=True)
    write_unit(edir, "00000", N)
    ours = zarr.open_group(str(edir.data_path("00000")), mode="r")["tokens"]
    ref = zarr.open_group(str(tmp_path / "ref.zarr"), mode="w-", zarr_format=3).create_array(
        "tokens", shape=ours.shape, dtype=ours.dtype, chunks=ours.chunks, shards=ours.shards, compressors=None,
        fill_value=0, dimension_names=("image", "token", "channel"))
    ref[:] = ours[:]
    theirs = sorted(p for p in (tmp_path / "ref.zarr" / "tokens" / "c").rglob("*") if p.is_file())
    assert [p.read_bytes() for p in _shards(edir)] == [p.read_bytes() for p in theirs]
    meta = lambda p: {k: v for k, v in json.loads(p.read_text()).items() if k != "attributes"}  # noqa: E731
    assert meta(edir.data_path("00000") / "tokens" / "zarr.json") == meta(tmp_path / "ref.zarr" / "tokens" / "zarr.json")


def test_a_damaged_shard_index_is_a_damaged_row_not_zeros(store, small_shards):
    edir = store.expert_dir("ds", make_spec(), create=True)
    write_unit(edir, "00000", N)
    last = _shards(edir)[-1]
    data = bytearray(last.read_bytes())
    data[-10] ^= 0x01  # inside the index: its crc32c no longer matches
    last.write_bytes(bytes(data))
    with pytest.raises(DamagedRowError, match="crc32c"):
        list(edir.iter_unit("00000"))
    recs = list(edir.iter_unit("00000", on_damaged="skip"))
    assert [r.status for r in recs] == ["ok"] * 6 + ["damaged"]


def test_store_written_with_the_old_default_codec_is_still_readable(store, small_shards):
    """The previous default was zarr + zstd, with no codec field in expert.json: same fingerprint, same
    directory, readable, and a new default (raw) spec gets a directory of its own."""
    old = make_spec(codec="zstd")
    assert old.fingerprint() == LEGACY_FP["zarr"]
    assert make_spec(fmt="wds").fingerprint() == LEGACY_FP["wds"]
    edir = store.expert_dir("ds", old, create=True)
    write_unit(edir, "00000", N)
    # what the old code wrote: expert.json without the codec field, chunks compressed with zstd
    spec_file = edir.path / "expert.json"
    doc = json.loads(spec_file.read_text())
    del doc["codec"]
    spec_file.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    meta = json.loads((edir.data_path("00000") / "tokens" / "zarr.json").read_text())
    assert meta["codecs"][0]["configuration"]["codecs"][-1]["name"] == "zstd"
    reopened = Store(store.root).resolve("ds", "siglip")
    assert reopened.spec.codec == "zstd" and reopened.name == f"siglip@{LEGACY_FP['zarr']}"
    recs = list(reopened.iter_unit("00000"))
    for rec in recs:
        t, _, out = features(rec.key, old)
        np.testing.assert_array_equal(rec.tokens, to_storage(t, "float16"))
        assert rec.outputs == out
    new = store.expert_dir("ds", make_spec(), create=True)
    assert new.name != reopened.name


def test_codec_is_checked_against_the_format():
    with pytest.raises(SpecError, match="codec='zstd' is not valid for format 'wds'"):
        make_spec(fmt="wds", codec="zstd")
    with pytest.raises(SpecError, match="codec='lz4'"):
        make_spec(codec="lz4")
    d = make_spec(codec="zstd").to_dict()
    assert ExpertSpec.from_dict(d).codec == "zstd"
