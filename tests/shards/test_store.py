"""Layout, spec validation and look-ups: bad stores give clear errors naming the file; nothing is overwritten."""

from __future__ import annotations

import json

import pytest

from astrea.registry import UnknownNameError
from astrea.schemas import SCHEMA_VERSION, SpecError
from astrea.shards import Store, StoreError
from tests.shards.helpers import make_spec, write_unit


def test_layout_and_expert_json(store):
    spec = make_spec()
    edir = store.expert_dir("ds", spec, create=True)
    write_unit(edir, "00000")
    assert edir.path == store.root / "ds" / f"siglip@{spec.fingerprint()}"
    assert sorted(p.name for p in edir.path.iterdir()) == [
        "00000.parquet", "00000.zarr", "00000_stats.json", "expert.json"]
    doc = json.loads((edir.path / "expert.json").read_text())
    assert doc["fingerprint"] == spec.fingerprint() and doc["schema_version"] == SCHEMA_VERSION
    assert doc["created_by"]["astrea"] and doc["created_by"]["time"]
    assert doc["weights_sha256"] == spec.weights_sha256 and doc["preprocessing"] == spec.preprocessing
    # reopening with the same spec (even from a different weights path: same hash) reuses the directory
    again = store.expert_dir("ds", make_spec(), create=True)
    assert again.path == edir.path and again.committed_units() == ["00000"]


def test_different_spec_gets_its_own_directory(store):
    a = store.expert_dir("ds", make_spec(), create=True)
    b = store.expert_dir("ds", make_spec(grid=4), create=True)
    c = store.expert_dir("ds", make_spec(dtype="float32"), create=True)
    assert len({a.path, b.path, c.path}) == 3


def _edit(edir, **changes):
    p = edir.path / "expert.json"
    doc = json.loads(p.read_text())
    doc.update(changes)
    p.write_text(json.dumps(doc))
    return p


def test_other_schema_version_is_refused_naming_the_file(store):
    edir = store.expert_dir("ds", make_spec(), create=True)
    write_unit(edir, "00000")
    p = _edit(edir, schema_version=SCHEMA_VERSION + 1)
    before = p.read_bytes()
    with pytest.raises(SpecError, match=rf"{p}.*schema version {SCHEMA_VERSION + 1}"):
        store.expert_dir("ds", make_spec(), create=True)
    with pytest.raises(SpecError, match="schema version"):
        store.resolve("ds", "siglip")
    assert p.read_bytes() == before and edir.committed_units() == ["00000"]


def test_edited_spec_is_refused(store):
    edir = store.expert_dir("ds", make_spec(), create=True)
    p = _edit(edir, grid=7)  # content changed, stored fingerprint kept
    with pytest.raises(SpecError, match=rf"{p}.*does not match its content"):
        store.expert_dir("ds", make_spec(), create=True)


def test_edited_spec_and_fingerprint_is_refused(store):
    edir = store.expert_dir("ds", make_spec(), create=True)
    edited = make_spec(grid=7)
    _edit(edir, grid=7, fingerprint=edited.fingerprint())  # consistent file, wrong directory
    with pytest.raises(SpecError, match="directory is named"):
        store.expert_dir("ds", make_spec(), create=True)


def test_resolve(store):
    a = store.expert_dir("ds", make_spec("siglip"), create=True)
    store.expert_dir("ds", make_spec("sam2"), create=True)
    assert store.datasets() == ["ds"]
    assert sorted(e.expert for e in store.experts("ds")) == ["sam2", "siglip"]
    assert store.resolve("ds", "siglip").path == a.path
    assert store.resolve("ds", f"siglip@{a.fingerprint[:6]}").path == a.path
    with pytest.raises(UnknownNameError, match="Valid expert names: sam2, siglip"):
        store.resolve("ds", "ram_plus")
    with pytest.raises(UnknownNameError, match="Valid dataset names: ds"):
        store.resolve("laion", "siglip")
    with pytest.raises(UnknownNameError, match="fingerprint"):
        store.resolve("ds", "siglip@ffff")
    b = store.expert_dir("ds", make_spec("siglip", grid=5), create=True)
    with pytest.raises(StoreError, match=rf"ambiguous.*{b.name}"):
        store.resolve("ds", "siglip")


def test_missing_store_and_dirs(tmp_path):
    store = Store(tmp_path / "nope")
    assert store.datasets() == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        store.experts("ds")
    with pytest.raises(FileNotFoundError):
        store.expert_dir("ds", make_spec())
    with pytest.raises(StoreError, match="dataset name"):
        store.expert_dir("../x", make_spec(), create=True)


def test_uncommitted_leftovers_are_not_units(store):
    edir = store.expert_dir("ds", make_spec(), create=True)
    write_unit(edir, "00000")
    write_unit(edir, "00001")
    edir.stats_path("00001").unlink()  # as if the writer died before its stats file
    assert edir.committed_units() == ["00000"] and edir.units() == ["00000", "00001"]
    assert edir.cleanup_temp() == 2  # data + index of 00001
    assert edir.units() == ["00000"]
    write_unit(edir, "00001")  # redone from scratch
    assert edir.committed_units() == ["00000", "00001"]
