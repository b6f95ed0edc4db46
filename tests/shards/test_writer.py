"""Writing and reading back one unit in each format and storage dtype."""

from __future__ import annotations

import json

import numpy as np
import pytest

from astrea.schemas import STORE_FORMATS
from astrea.shards import UNIT_FORMATS, StoreError, UnitBusyError, UnitCommittedError
from astrea.shards.dtypes import from_storage, to_storage
from tests.shards.helpers import features, keys_of, make_spec, write_unit

DTYPES = ["float16", "bfloat16", "float32"]
TOL = {"float16": 2e-3, "bfloat16": 8e-3, "float32": 0.0}  # relative, per storage dtype


def test_every_store_format_has_one_implementation():
    assert tuple(UNIT_FORMATS.names()) == STORE_FORMATS


@pytest.mark.parametrize("fmt", STORE_FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip(store, fmt, dtype):
    spec = make_spec(fmt=fmt, dtype=dtype)
    edir = store.expert_dir("ds", spec, create=True)
    keys = keys_of("00000", 7)
    stats = write_unit(edir, "00000", n=7, failed={keys[2], keys[5]}, extra={"seconds": 1.5})
    assert edir.committed_units() == ["00000"]
    assert (stats["images"], stats["ok"], stats["failed"]) == (7, 5, 2)
    assert stats["failures_by_reason"] == {"undecodable": 2}
    assert stats["extra"] == {"seconds": 1.5}
    assert json.loads(edir.stats_path("00000").read_text())["index_sha256"] == stats["index_sha256"]

    recs = list(edir.iter_unit("00000"))
    assert [r.key for r in recs] == keys  # source order, failed keys included
    want_dtype = np.float32 if dtype == "bfloat16" else np.dtype(dtype)
    for r in recs:
        if r.key in (keys[2], keys[5]):
            assert r.status == "failed" and r.tokens is None and r.pooled is None and "undecodable" in r.error
            continue
        t, p, out = features(r.key, spec)
        assert r.status == "ok" and r.error is None
        assert r.tokens.dtype == want_dtype and r.tokens.shape == (9, 8) and r.pooled.shape == (6,)
        np.testing.assert_allclose(r.tokens, t, rtol=TOL[dtype], atol=1e-6)
        np.testing.assert_allclose(r.pooled, p, rtol=TOL[dtype], atol=1e-6)
        assert r.outputs == out and r.caption == f"cap {r.key}" and r.labels == {"k": r.key}
    # failed keys are not in the arrays: the ok rows are numbered densely
    assert [r.index for r in recs if r.status == "ok"] == list(range(5))
    assert [r.key for r in edir.iter_unit("00000", include_failed=False)] == [k for k in keys if k not in (keys[2], keys[5])]


def test_bfloat16_rounds_to_nearest_even():
    x = np.array([1.0, 1.00390625, 1.01171875, -2.5, 3.0e38, np.inf, np.nan], np.float32)
    back = from_storage(to_storage(x, "bfloat16"), "bfloat16")
    # 1 + 2^-8 is a tie between 1 and 1 + 2^-7: even mantissa (1.0) wins; 1 + 3*2^-8 ties up to 1 + 2^-6
    np.testing.assert_array_equal(back[:4], [1.0, 1.0, 1.015625, -2.5])
    assert np.isfinite(back[4]) and np.isinf(back[5]) and np.isnan(back[6])


def test_torch_bfloat16_input_is_accepted(store):
    torch = pytest.importorskip("torch")
    spec = make_spec(dtype="bfloat16")
    edir = store.expert_dir("ds", spec, create=True)
    t = torch.randn(9, 8, dtype=torch.bfloat16)
    with edir.open_unit("00000") as w:
        w.add("k", t, torch.zeros(6), {})
        w.commit()
    (rec,) = edir.iter_unit("00000")
    np.testing.assert_array_equal(rec.tokens, t.float().numpy())  # bf16 -> bf16 is exact


@pytest.mark.parametrize("fmt", STORE_FORMATS)
def test_committed_unit_is_never_overwritten(store, fmt):
    edir = store.expert_dir("ds", make_spec(fmt=fmt), create=True)
    write_unit(edir, "00000")
    before = {p.name: p.stat().st_mtime_ns for p in edir.path.iterdir()}
    with pytest.raises(UnitCommittedError, match="already committed"):
        edir.open_unit("00000")
    assert {p.name: p.stat().st_mtime_ns for p in edir.path.iterdir()} == before


def test_second_writer_of_a_unit_is_refused_until_the_first_ends(store):
    # one writer per unit, in this process too: the unit's lock is held from open_unit to the end of commit
    edir = store.expert_dir("ds", make_spec(), create=True)
    w = edir.open_unit("00000")
    t, p, out = features("a", edir.spec)
    w.add("a", t, p, out)
    with pytest.raises(UnitBusyError, match="being written by process"):
        edir.open_unit("00000")
    w.commit()
    with pytest.raises(UnitCommittedError):
        edir.open_unit("00000")
    w2 = edir.open_unit("00001")
    w2.abort()  # an abort lets go of the unit as well
    edir.open_unit("00001").abort()
    assert edir.temp_files() == [] and not [p for p in edir.path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("fmt", STORE_FORMATS)
def test_abort_and_context_manager_leave_nothing(store, fmt):
    edir = store.expert_dir("ds", make_spec(fmt=fmt), create=True)
    w = edir.open_unit("00000")
    t, p, out = features("a", edir.spec)
    w.add("a", t, p, out)
    assert len(edir.temp_files()) == 1
    w.abort()
    w.abort()  # idempotent
    with pytest.raises(RuntimeError), edir.open_unit("00001") as w2:
        w2.add("a", t, p, out)
        raise RuntimeError("job died")
    assert edir.temp_files() == [] and edir.units() == []
    with pytest.raises(StoreError, match="already committed or aborted"):
        w.add("b", t, p, out)


@pytest.mark.parametrize("fmt", STORE_FORMATS)
def test_empty_unit_commits(store, fmt):
    edir = store.expert_dir("ds", make_spec(fmt=fmt), create=True)
    with edir.open_unit("00000") as w:
        stats = w.commit()
    assert stats["images"] == 0 and edir.is_committed("00000") and list(edir.iter_unit("00000")) == []


def test_all_failed_unit(store):
    edir = store.expert_dir("ds", make_spec(), create=True)
    write_unit(edir, "00000", n=3, failed=set(keys_of("00000", 3)))
    assert [r.status for r in edir.iter_unit("00000")] == ["failed"] * 3


def test_bad_rows_are_rejected_with_the_reason(store):
    edir = store.expert_dir("ds", make_spec(), create=True)
    t, p, out = features("a", edir.spec)
    with edir.open_unit("00000") as w:
        with pytest.raises(ValueError, match=r"tokens shape \(9, 7\).*\(9, 8\)"):
            w.add("a", t[:, :7], p, out)
        with pytest.raises(ValueError, match="pooled shape"):
            w.add("b", t, p[:3], out)
        with pytest.raises(ValueError, match="strict JSON"):
            w.add("c", t, p, {"x": float("nan")})
        with pytest.raises(ValueError, match="not valid"):
            w.add("a/b", t, p, out)
        w.add("a", t, p, out)
        with pytest.raises(ValueError, match="added twice"):
            w.add_failure("a", "oops")
        stats = w.commit()
    assert stats["ok"] == 1


def test_nonfinite_rows_are_counted(store):
    edir = store.expert_dir("ds", make_spec(dtype="float16"), create=True)
    t, p, out = features("a", edir.spec)
    with edir.open_unit("00000") as w:
        w.add("a", t * 1e6, p, out)  # overflows float16
        w.add("b", t, p, out)
        assert w.commit()["nonfinite_rows"] == 1


def test_wds_rejects_dotted_keys(store):
    edir = store.expert_dir("ds", make_spec(fmt="wds"), create=True)
    t, p, out = features("a", edir.spec)
    with edir.open_unit("00000") as w, pytest.raises(ValueError, match="use format 'zarr'"):
        w.add("img.001", t, p, out)


def test_invalid_unit_name(store):
    edir = store.expert_dir("ds", make_spec(), create=True)
    with pytest.raises(StoreError, match="unit name"):
        edir.open_unit("../x")


def test_reading_an_uncommitted_unit_names_it(store):
    edir = store.expert_dir("ds", make_spec(), create=True)
    write_unit(edir, "00000")
    with pytest.raises(StoreError, match=r"'00001' is not committed.*00000"):
        list(edir.iter_unit("00001"))


def test_zarr_block_reads_match_whole_reads(store):
    edir = store.expert_dir("ds", make_spec(), create=True)
    write_unit(edir, "00000", n=9, failed={keys_of("00000", 9)[3]})
    whole = [r.tokens for r in edir.iter_unit("00000", include_failed=False)]
    blocks = [r.tokens for r in edir.iter_unit("00000", include_failed=False, block_rows=2)]
    assert len(whole) == len(blocks) and all(np.array_equal(a, b) for a, b in zip(whole, blocks))
