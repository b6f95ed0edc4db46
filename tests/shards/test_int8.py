"""int8 and float8_e4m3 storage (per-row scale in the row): round trip in both formats, transparent
dequantised reads, verified reads (checksums of the stored bytes, non-finite rows), a fingerprint of its own."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from astrea.shards import DamagedRowError, JoinedDataset
from astrea.shards.audit import verify
from astrea.shards.dtypes import (
    FLOAT8_E4M3,
    dequantize_int8,
    from_storage,
    int8_error,
    nonfinite_in_storage,
    quantize_int8,
    to_storage,
)
from tests.shards.helpers import features, keys_of, make_spec, write_unit

N = 5


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_quantize_layout_and_edges():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 40)).astype(np.float32) * np.float32(3.0)
    x[2] = 0.0  # an all-zero row: scale 0, codes 0, decodes to zeros
    x[4, 5] = 1e6  # one outlier: its row's scale follows it, the other rows are unaffected
    q = quantize_int8(x)
    assert q.dtype == np.int8 and q.shape == (7, 44)
    codes = q[:, :40].astype(np.int32)
    assert codes.min() >= -127 and codes.max() <= 127 and np.abs(codes).max(axis=1)[[0, 1, 3]].tolist() == [127] * 3
    scale = q[:, 40:].copy().view("<f4")[:, 0]
    assert np.allclose(scale, np.abs(x).max(1) / 127) and scale[2] == 0
    y = dequantize_int8(q)
    assert np.array_equal(y[2], np.zeros(40, np.float32))
    live = [0, 1, 3, 5, 6]
    assert _cos(x[live], y[live]).min() > 0.9999
    # an int8 array given to an int8 store is taken as already stored, not quantised again
    assert to_storage(q, "int8") is not None and np.array_equal(to_storage(q, "int8"), q)
    assert np.array_equal(from_storage(q, "int8"), y)
    err = int8_error(x)
    assert err["rel_to_max"] <= 1 / 254 + 1e-6 and err["max_cos_dist"] < 1e-4


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3"])
def test_nonfinite_rows_get_a_nan_scale(dtype):
    x = np.ones((3, 8), np.float32)
    x[1, 2] = np.inf
    q = to_storage(x, dtype)
    assert nonfinite_in_storage(q, dtype) and not nonfinite_in_storage(q[[0, 2]], dtype)
    assert np.isnan(from_storage(q, dtype)[1]).all() and (q[1, :8] == 0).all()


def test_float8_table_is_torchs_and_outlier_rows_keep_their_small_channels():
    import torch

    assert np.array_equal(torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy(),
                          FLOAT8_E4M3, equal_nan=True)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 256)).astype(np.float32)
    x[:, [3, 100]] *= 50  # a few huge channels, as trained ViTs have: int8's step follows them
    c8 = _cos(x, from_storage(to_storage(x, "float8_e4m3"), "float8_e4m3")).min()
    ci = _cos(x, from_storage(to_storage(x, "int8"), "int8")).min()
    assert c8 >= 0.999 and c8 > ci


def test_fingerprint_differs_from_float16():
    assert make_spec(dtype="int8").fingerprint() != make_spec(dtype="float16").fingerprint()
    assert make_spec(dtype="int8").fingerprint() != make_spec(dtype="float8_e4m3").fingerprint()


@pytest.mark.parametrize("fmt,dtype", [("zarr", "int8"), ("wds", "int8"), ("zarr", "float8_e4m3"),
                                       ("wds", "float8_e4m3")])
def test_round_trip_transparent_and_verified(store, fmt, dtype):
    spec = make_spec(fmt=fmt, dtype=dtype, grid=4, token_dim=64, pooled_dim=32)
    edir = store.expert_dir("ds", spec, create=True)
    stats = write_unit(edir, "00000", N, failed={keys_of("00000", N)[1]})
    assert stats["dtype"] == dtype and stats["nonfinite_rows"] == 0
    idx = pq.read_table(edir.index_path("00000")).to_pylist()
    assert idx[0]["tokens_shape"] == [16, 64] and idx[0]["pooled_shape"] == [32]  # feature shapes, not stored
    recs = [r for r in edir.iter_unit("00000") if r.status == "ok"]
    assert len(recs) == N - 1
    for r in recs:
        t, p, _ = features(r.key, spec)
        assert r.tokens.dtype == np.float32 and r.tokens.shape == (16, 64) and r.pooled.shape == (32,)
        assert np.array_equal(r.tokens, from_storage(to_storage(t, dtype), dtype))
        assert _cos(t, r.tokens).min() >= 0.999 and _cos(p, r.pooled) >= 0.999
    # the trainer's reader: float32 tokens, no knowledge of the dtype needed
    rec = next(iter(JoinedDataset(store, "ds", ["siglip"], shuffle=False)))
    assert rec["experts"]["siglip"]["tokens"].dtype == np.float32
    assert verify(store).ok


def test_flipped_code_byte_is_caught(store):
    edir = store.expert_dir("ds", make_spec(fmt="wds", dtype="int8"), create=True)
    write_unit(edir, "00000", N)
    path = edir.data_path("00000")
    data = bytearray(path.read_bytes())
    pos = data.index(f"{keys_of('00000', N)[2]}.tokens.npy".encode()) + 512 + 128 + 3  # header block, .npy header, then codes
    data[pos] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedRowError, match="checksum mismatch") as ei:
        list(edir.iter_unit("00000"))
    assert ei.value.key == keys_of("00000", N)[2]
    assert not verify(store).ok


@pytest.mark.parametrize("fmt,dtype", [("zarr", "int8"), ("wds", "int8"), ("wds", "float8_e4m3")])
def test_nonfinite_row_is_counted_and_refused_on_read(store, fmt, dtype):
    spec = make_spec(fmt=fmt, dtype=dtype)
    edir = store.expert_dir("ds", spec, create=True)
    with edir.open_unit("00000") as w:
        for i, key in enumerate(keys_of("00000", 3)):
            t, p, out = features(key, spec)
            if i == 1:
                t[0, 0] = np.nan
            w.add(key, t, p, out)
        stats = w.commit()
    assert stats["nonfinite_rows"] == 1
    with pytest.raises(DamagedRowError, match="non-finite"):
        list(edir.iter_unit("00000"))
    statuses = [r.status for r in edir.iter_unit("00000", on_damaged="skip")]
    assert statuses == ["ok", "damaged", "ok"]


def test_plain_zarr_reader_decodes_int8(store):
    import zarr

    spec = make_spec(dtype="int8")
    edir = store.expert_dir("ds", spec, create=True)
    write_unit(edir, "00000", N)
    g = zarr.open_group(str(edir.data_path("00000")), mode="r")
    q = g["tokens"][:]
    assert q.dtype == np.int8 and q.shape == (N, spec.num_tokens, spec.token_dim + 4)
    plain = q[..., :-4].astype(np.float32) * q[..., -4:].copy().view("<f4")  # the docs' formula
    ours = np.stack([r.tokens for r in edir.iter_unit("00000")])
    assert np.array_equal(plain, ours)

