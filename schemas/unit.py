"""Schemas of what the store writes next to each unit: the per-key index (parquet) and the stats file.

A unit ``NNNNN`` of an expert directory is three things:

- the data, ``NNNNN.zarr`` (Zarr v3 group) or ``NNNNN.tar`` (WebDataset tar), holding only the keys that
  succeeded, in source order;
- the index, ``NNNNN.parquet``: one row per source key *in source order*, failed ones included;
- the stats, ``NNNNN_stats.json``: counts, failures by reason, bytes; written last, its presence is the
  commit marker.

The row checksum is format-independent so every reader can recompute it from whatever the container
gives back: ``xxh3_128(tokens_bytes + pooled_bytes + outputs_json_bytes)``, stored as
``"xxh3_128:<32 hex>"``, where the array bytes are the C-order little-endian bytes *in the storage
representation* (float16, float32, or uint16 bit patterns for bfloat16) and the outputs bytes are the
exact UTF-8 JSON text stored for that key. Stores written before the prefix existed hold a bare
64-hex ``sha256`` of the same bytes; both are read (``check_row`` picks the algorithm from the text).
xxh3 because every read is verified: sha256 costs ~0.75 ms per 576x1152 float16 row, about as much as
reading the row from a tar, xxh3 ~0.02 ms (docs/store.md has the measurement).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from typing import Any

import numpy as np
import pyarrow as pa

UNIT_SCHEMA_VERSION = 1

STATUS_OK = "ok"
STATUS_FAILED = "failed"

# Parquet columns, in order. `index` is the row in the unit's arrays; null for failed keys, which are
# not in the arrays at all (a reader can never mistake a hole for zeros).
INDEX_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("labels", pa.string()),  # JSON object as text
        pa.field("index", pa.int64()),
        pa.field("tokens_shape", pa.list_(pa.int32())),
        pa.field("pooled_shape", pa.list_(pa.int32())),
        pa.field("checksum", pa.string()),  # "xxh3_128:<hex>" (or legacy bare sha256 hex), see module docstring
    ],
    metadata={"astrea.unit_schema_version": str(UNIT_SCHEMA_VERSION)},
)

# Keys every stats file carries (``extra`` holds whatever the writer's caller added, e.g. timings).
STATS_KEYS = (
    "schema_version", "unit", "expert", "fingerprint", "format", "dtype", "images", "ok", "failed",
    "failures_by_reason", "nonfinite_rows", "data_bytes", "index_bytes", "bytes", "bytes_per_image",
    "index_sha256", "created_by", "extra",
)


CHECKSUM_ALGO = "xxh3_128"  # what new units are written with (xxhash is a dependency, see pyproject)
_LEGACY = "sha256"  # bare hex, no prefix: units written before CHECKSUM_ALGO existed


def _write_algo() -> str:
    # An environment built before xxhash joined the dependencies still writes valid, verifiable units
    # (the older sha256 form, slower to verify) instead of failing every commit.
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return _LEGACY
    return CHECKSUM_ALGO


def _hasher(algo: str) -> Any:
    if algo == "xxh3_128":
        try:
            import xxhash
        except ImportError:
            raise ValueError("this unit's rows carry xxh3_128 checksums: install xxhash (pip install xxhash, "
                             "a dependency of astrea) to read it") from None
        return xxhash.xxh3_128()
    if algo == _LEGACY:
        return hashlib.sha256()
    raise ValueError(f"unknown row checksum algorithm {algo!r} (this astrea reads xxh3_128 and sha256)")


def row_checksum(tokens_stored: np.ndarray, pooled_stored: np.ndarray, outputs_json: str, algo: str | None = None) -> str:
    algo = algo or _write_algo()
    h = _hasher(algo)
    for a in (tokens_stored, pooled_stored):
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))  # no copy when already so
        h.update(memoryview(a).cast("B"))
    h.update(outputs_json.encode("utf-8"))
    return h.hexdigest() if algo == _LEGACY else f"{algo}:{h.hexdigest()}"


def checksum_algo(checksum: str) -> str:
    """The algorithm a stored checksum was made with: its ``algo:`` prefix, else legacy sha256."""
    algo, sep, _ = checksum.partition(":")
    return algo if sep else _LEGACY


def check_row(checksum: str | None, tokens_stored: np.ndarray, pooled_stored: np.ndarray, outputs_json: str) -> bool:
    """True when the row's bytes hash to the checksum its index recorded."""
    if not checksum:
        return False
    if checksum.startswith(_XXH3_PREFIX) and _LITTLE:
        # Every row of every read comes here: the hash itself (~23 us per 1.3 MB row, hot in cache) is the
        # cost, so no per-call import, dtype juggling or string building around it.
        h = _hasher(CHECKSUM_ALGO)  # raises the 'install xxhash' error where it is missing
        h.update(_le_bytes(tokens_stored))
        h.update(_le_bytes(pooled_stored))
        h.update(outputs_json.encode("utf-8"))
        return h.hexdigest() == checksum[len(_XXH3_PREFIX):]
    return row_checksum(tokens_stored, pooled_stored, outputs_json, checksum_algo(checksum)) == checksum


_XXH3_PREFIX = CHECKSUM_ALGO + ":"
_LITTLE = sys.byteorder == "little"


def _le_bytes(a: np.ndarray) -> Any:
    # Native (little-endian) C-contiguous arrays are hashed in place; anything else as its LE bytes.
    if a.flags.c_contiguous and a.dtype.byteorder in "=<|":
        return a
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))




_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+|0x[0-9a-fA-F]{8,}")


def stable_reason(reason: str) -> str:
    """A failure reason without what changes from run to run: object addresses (PIL names the
    ``<_io.BytesIO object at 0x7f...>`` it could not identify), so identical runs write identical indexes."""
    return _ADDRESS.sub(lambda m: "" if m.group(0).startswith(" at ") else "0x...", reason)


def failure_kind(reason: str) -> str:
    """'undecodable: UnidentifiedImageError: ...' -> 'undecodable' (stats group failures by kind)."""
    return reason.split(":", 1)[0].strip() or "unknown"


class OutputsJSON(str):
    """A key's outputs as ``outputs_to_json`` encoded them. Encoding it again returns it as is: the
    extraction actor validates every key's outputs by encoding them, and the writer stores that text
    instead of encoding a third time (0.5 ms of held GIL per 100-box detection, measured)."""


def outputs_to_json(outputs: Any) -> OutputsJSON:
    """The exact text stored for a key's outputs (compact, key-sorted, strict: no NaN/inf)."""
    if isinstance(outputs, OutputsJSON):
        return outputs
    try:
        text = json.dumps(outputs if outputs is not None else {}, sort_keys=True, separators=(",", ":"),
                          allow_nan=False, ensure_ascii=False)
        text.encode("utf-8")  # a lone surrogate would pass dumps and break the checksum and every reader
        return OutputsJSON(text)
    except (TypeError, ValueError) as e:
        raise ValueError(f"outputs are not strict JSON ({e}); convert arrays to lists and drop NaN/inf") from None
