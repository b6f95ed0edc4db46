from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from astrea.schemas import ExpertSpec, SpecError
from astrea.schemas.unit import failure_kind, outputs_to_json, row_checksum
from tests.shards.helpers import make_spec


def test_fingerprint_is_stable_and_ignores_where_weights_came_from():
    a = make_spec()
    assert a.fingerprint() == make_spec().fingerprint() and len(a.fingerprint()) == 12
    assert dataclasses.replace(a, weights="/models/x.pt", seed=0).fingerprint() != a.fingerprint()  # random vs loaded
    real1 = dataclasses.replace(a, weights="google/siglip", seed=1)
    real2 = dataclasses.replace(a, weights="/local/siglip", seed=2)
    assert real1.fingerprint() == real2.fingerprint()  # same weights hash, any path, seed unused
    for change in ({"grid": 4}, {"dtype": "float32"}, {"format": "wds"}, {"weights_sha256": "cd" * 32},
                   {"preprocessing": {"resize": 64}}, {"prerequisites": {"ram_plus": "abc"}}):
        assert dataclasses.replace(a, **change).fingerprint() != a.fingerprint(), change


def test_conversion_provenance_is_hashed_only_when_set():
    # the values of every store written before `converted_from` existed (pinned: they must not move);
    # zarr units were zstd then (the codec's legacy value hashes without the field)
    a = dataclasses.replace(make_spec(), codec="zstd")
    assert a.fingerprint() == "1318a6919bcd"
    assert make_spec(fmt="wds", dtype="float32").fingerprint() == "618e1e7bb1a0"
    assert "converted_from" not in json.loads(a.to_json())
    c = dataclasses.replace(a, dtype="int8", converted_from={"fingerprint": a.fingerprint(), "dtype": "float16"})
    assert c.fingerprint() != dataclasses.replace(a, dtype="int8").fingerprint()
    assert ExpertSpec.from_json(c.to_json()) == c and json.loads(c.to_json())["converted_from"]["dtype"] == "float16"


def test_json_roundtrip_and_errors():
    a = make_spec()
    assert ExpertSpec.from_json(a.to_json()) == a
    d = json.loads(a.to_json())
    with pytest.raises(SpecError, match="f.json: unknown fields"):
        ExpertSpec.from_dict({**d, "colour": 1}, source="f.json")
    with pytest.raises(SpecError, match="schema version 0"):
        ExpertSpec.from_dict({**d, "schema_version": 0})
    with pytest.raises(SpecError, match="not valid JSON"):
        ExpertSpec.from_json("{", source="x")
    with pytest.raises(SpecError, match="dtype='int4'"):
        make_spec(dtype="int4")
    with pytest.raises(SpecError, match="format='hdf5'"):
        make_spec(fmt="hdf5")


def test_row_checksum_covers_every_part():
    t, p = np.ones((2, 3), np.float16), np.zeros(3, np.float16)
    base = row_checksum(t, p, "{}")
    t2 = t.copy()
    t2[1, 2] = 2
    assert row_checksum(t2, p, "{}") != base
    assert row_checksum(t, p + 1, "{}") != base
    assert row_checksum(t, p, '{"a":1}') != base
    assert row_checksum(t.astype(">f2"), p, "{}") == base  # byte order normalised


def test_outputs_json_and_failure_kind():
    assert outputs_to_json({"b": 1, "a": [1.5]}) == '{"a":[1.5],"b":1}'
    assert outputs_to_json(None) == "{}"
    once = outputs_to_json({"b": (1, 2), "a": "x"})
    assert outputs_to_json(once) is once  # encoded text is not encoded again (it would become a JSON string)
    assert outputs_to_json("plain text") == '"plain text"'  # a plain str is still an output value
    with pytest.raises(ValueError, match="strict JSON"):
        outputs_to_json({"label": "\ud800"})  # not encodable as UTF-8
    with pytest.raises(ValueError, match="strict JSON"):
        outputs_to_json({"a": float("inf")})
    assert failure_kind("undecodable: PIL said no") == "undecodable" and failure_kind("") == "unknown"
