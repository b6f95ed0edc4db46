"""Every row a reader hands out is checked against its index checksum (and for inf/NaN): a damaged
zarr chunk, a deleted zarr shard file, a flipped tar byte or a unit without its data never reach a
trainer unnoticed. Stores written with the older sha256 row checksum still read and verify."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from astrea.schemas.unit import CHECKSUM_ALGO, check_row, checksum_algo, row_checksum
from astrea.shards import DamagedRowError, JoinedDataset, Store, StoreError
from astrea.shards.audit import verify
from tests.shards.helpers import keys_of, make_spec, write_unit

N = 6


def _flip(path, pos: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x01
    path.write_bytes(bytes(data))


def _token_files(edir, unit):
    return sorted(p for p in (edir.data_path(unit) / "tokens").rglob("*") if p.is_file() and p.name != "zarr.json")


@pytest.fixture(params=["raw", "zstd"])
def zarr_dir(store, monkeypatch, request):
    from astrea.shards import zarr_unit

    # one row per chunk and per shard file (the real sizes are ~1 MiB / ~32 MiB, too big for a test)
    monkeypatch.setattr(zarr_unit, "CHUNK_BYTES", 1)
    monkeypatch.setattr(zarr_unit, "SHARD_BYTES", 1)
    e = store.expert_dir("ds", make_spec("siglip", codec=request.param), create=True)
    write_unit(e, "00000", N)
    write_unit(e, "00001", N, failed={keys_of("00001", N)[2]})
    return e


def test_new_units_are_written_with_xxh3(zarr_dir):
    idx = pq.read_table(zarr_dir.index_path("00000")).column("checksum").to_pylist()
    assert all(checksum_algo(c) == CHECKSUM_ALGO and c.startswith("xxh3_128:") for c in idx)


def test_clean_units_read_verified(zarr_dir):
    recs = list(zarr_dir.iter_unit("00001"))
    assert [r.status for r in recs].count("ok") == N - 1


def test_flipped_byte_in_a_zarr_tokens_chunk_names_unit_and_key(zarr_dir):
    files = _token_files(zarr_dir, "00001")
    _flip(files[0], len(files[0].read_bytes()) // 3)
    with pytest.raises(DamagedRowError) as ei:
        list(zarr_dir.iter_unit("00001"))
    e = ei.value
    assert e.unit == "00001" and e.key in keys_of("00001", N)
    msg = e.args[0]
    assert "00001" in msg and repr(e.key) in msg and "--repair" in msg and "\n" not in msg
    # skipping: the damaged rows are marked, the other rows still come back verified
    recs = list(zarr_dir.iter_unit("00001", on_damaged="skip"))
    assert len(recs) == N and any(r.status == "damaged" for r in recs)
    assert all(r.tokens is not None for r in recs if r.status == "ok")
    assert not verify(Store(zarr_dir.path.parent.parent)).ok


def test_deleted_zarr_shard_file_is_not_read_as_zeros(zarr_dir):
    files = _token_files(zarr_dir, "00000")
    assert len(files) > 1
    files[-1].unlink()  # zarr would hand back fill_value=0 for every row it held
    # zstd (through zarr-python): zeros that fail their checksum; raw (read directly): the file is missing
    with pytest.raises(DamagedRowError, match="checksum mismatch|shard file .* is missing"):
        list(zarr_dir.iter_unit("00000"))
    recs = list(zarr_dir.iter_unit("00000", on_damaged="skip"))
    assert [r.status for r in recs][0] == "ok" and recs[-1].status == "damaged"


def test_flipped_data_byte_in_a_tar_member(store):
    w = store.expert_dir("ds", make_spec("sam2", fmt="wds"), create=True)
    write_unit(w, "00000", N)
    tar = w.data_path("00000")
    data = bytearray(tar.read_bytes())
    key = keys_of("00000", N)[3]
    pos = data.find(b"\x93NUMPY", data.find(f"{key}.tokens.npy".encode())) + 128 + 4
    data[pos] ^= 0x01
    tar.write_bytes(bytes(data))
    with pytest.raises(DamagedRowError) as ei:
        list(w.iter_unit("00000"))
    assert ei.value.key == key and "checksum mismatch" in ei.value.reason
    statuses = [r.status for r in w.iter_unit("00000", on_damaged="skip")]
    assert statuses == ["ok"] * 3 + ["damaged"] + ["ok"] * 2


def test_joined_dataset_raises_or_skips_and_counts(zarr_dir, store):
    _flip(_token_files(zarr_dir, "00001")[0], 20)
    with pytest.raises(DamagedRowError):
        list(JoinedDataset(store, "ds", ["siglip"], shuffle=False))
    ds = JoinedDataset(store, "ds", ["siglip"], shuffle=False, on_damaged="skip")
    recs = list(ds)
    n_damaged = ds.counts["skipped_damaged"]
    assert n_damaged >= 1 and len(recs) == 2 * N - 1 - n_damaged
    assert {(e, u) for e, u, _ in ds.damaged} == {("siglip", "00001")}


def test_units_the_store_lists_but_cannot_read_are_named(zarr_dir, store):
    write_unit(zarr_dir, "00002", N)
    import shutil

    shutil.rmtree(zarr_dir.data_path("00002"))  # stats and index left: MISSING data
    zarr_dir.stats_path("00001").unlink()  # data and index left: not committed
    ds = JoinedDataset(store, "ds", ["siglip"], shuffle=False)
    assert ds.units == ["00000"]
    nj = ds.units_not_joined
    assert set(nj) == {"00001", "00002"}
    assert nj["00002"]["siglip"].startswith("MISSING data") and "--repair" in nj["00002"]["siglip"]
    assert nj["00001"]["siglip"].startswith("not committed")
    assert ds.summary()["units_not_joined"] == nj


def test_nonfinite_rows_stop_a_reader_but_not_verify(store):
    e = store.expert_dir("ds", make_spec("siglip"), create=True)
    with e.open_unit("00000") as w:
        for i, key in enumerate(keys_of("00000", 3)):
            t = np.ones((e.spec.num_tokens, e.spec.token_dim), np.float32)
            if i == 1:
                t[0, 0] = 1e6  # float16 overflow: stored as inf, counted by the writer
            w.add(key, t, np.ones(e.spec.pooled_dim, np.float32), {})
        assert w.commit()["nonfinite_rows"] == 1
    with pytest.raises(DamagedRowError, match="non-finite") as ei:
        list(e.iter_unit("00000"))
    assert ei.value.key == keys_of("00000", 3)[1]
    assert "--dtype bfloat16" in ei.value.args[0]
    assert [r.status for r in e.iter_unit("00000", on_damaged="skip")] == ["ok", "damaged", "ok"]
    assert verify(store).ok  # the bytes are what the writer stored


def test_legacy_sha256_units_still_read_and_verify(store):
    import hashlib

    import pyarrow as pa

    e = store.expert_dir("ds", make_spec("siglip"), create=True)
    write_unit(e, "00000", N, failed={keys_of("00000", N)[0]})
    # rewrite the index as astrea wrote it before xxh3: bare sha256 hex per ok row
    rows = {r.key: r for r in e.iter_unit("00000")}
    from astrea.shards.dtypes import to_storage
    from astrea.schemas.unit import outputs_to_json

    table = pq.read_table(e.index_path("00000"))
    legacy = []
    for key, status in zip(table.column("key").to_pylist(), table.column("status").to_pylist(), strict=True):
        if status != "ok":
            legacy.append(None)
            continue
        r = rows[key]
        legacy.append(row_checksum(to_storage(r.tokens, "float16"), to_storage(r.pooled, "float16"),
                                   outputs_to_json(r.outputs), "sha256"))
    assert all(len(c) == 64 for c in legacy if c)
    table = table.set_column(table.column_names.index("checksum"), "checksum", pa.array(legacy, pa.string()))
    e.index_path("00000").unlink()
    pq.write_table(table, e.index_path("00000"), compression="zstd")
    stats = json.loads(e.stats_path("00000").read_text())
    stats["index_sha256"] = hashlib.sha256(e.index_path("00000").read_bytes()).hexdigest()
    e.stats_path("00000").write_text(json.dumps(stats))
    assert len(list(e.iter_unit("00000"))) == N and verify(store).ok
    # other bytes do not match the old checksum either
    assert not check_row(legacy[1], np.zeros(3, np.float16), np.zeros(2, np.float16), "{}")


def test_uncommitted_unit_is_still_refused(zarr_dir):
    zarr_dir.stats_path("00000").unlink()
    with pytest.raises(StoreError, match="not committed"):
        list(zarr_dir.iter_unit("00000"))


def test_without_xxhash_units_are_written_with_sha256_and_still_verified(store, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "xxhash", None)  # an environment built before xxhash was a dependency
    e = store.expert_dir("ds", make_spec("siglip"), create=True)
    write_unit(e, "00000", N)
    idx = pq.read_table(e.index_path("00000")).column("checksum").to_pylist()
    assert all(checksum_algo(c) == "sha256" and len(c) == 64 for c in idx)
    assert len(list(e.iter_unit("00000"))) == N and verify(store).ok
    monkeypatch.delitem(sys.modules, "xxhash")
    write_unit(e, "00001", N)  # and such an environment names what it lacks when it meets xxh3 rows
    monkeypatch.setitem(sys.modules, "xxhash", None)
    with pytest.raises(StoreError, match="install xxhash"):
        list(e.iter_unit("00001"))
