"""The writer protocol shared by every unit format, and the commit protocol.

A format only knows how to put rows into a temporary container (``_open``, ``_write``, ``_close``);
everything that makes a unit trustworthy lives here, once:

1. rows go to ``.NNNNN.<suffix>.tmp-HOST-PID-UUID`` inside the expert directory (same filesystem);
2. ``commit``: close, fsync every file and the directories, atomically rename to ``NNNNN.<suffix>``;
3. write the index ``NNNNN.parquet`` (temp + fsync + rename);
4. write ``NNNNN_stats.json`` last (temp + fsync + rename): its presence means committed.

A crash anywhere leaves no stats file, so readers ignore the unit and the next run's
``ExpertDir.cleanup_temp`` removes the leftovers. A committed unit is never overwritten.

The writer holds the unit's lock (``fsutil.UnitLock``, taken by ``ExpertDir.open_unit``) from its
opening to the end of ``commit`` or ``abort``: cleanup and repair of other processes leave a locked unit
alone, so the window between the data rename and the stats file is never mistaken for a crash.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from abc import ABC, abstractmethod
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from astrea.schemas.unit import (
    INDEX_SCHEMA,
    STATUS_FAILED,
    STATUS_OK,
    UNIT_SCHEMA_VERSION,
    failure_kind,
    outputs_to_json,
    row_checksum,
    stable_reason,
)
from astrea.shards import fsutil
from astrea.shards.dtypes import logical_shape, nonfinite_in_storage, stored_shape, to_storage
from astrea.shards.errors import StoreError, UnitCommittedError

if TYPE_CHECKING:
    from astrea.shards.store import ExpertDir

# Keys end up in file names (tar members) and in joins: printable, no path separators.
_KEY_OK = re.compile(r"^[^/\\\x00-\x1f]+$")


def created_by() -> dict[str, Any]:
    import astrea

    return {"astrea": astrea.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


class UnitWriter(ABC):
    """Writes one unit. Use ``add``/``add_failure`` per key in source order, then ``commit`` (or ``abort``).

    Also a context manager: leaving the block without ``commit`` aborts (nothing becomes visible).
    """

    suffix: str = ""  # data container suffix: ".zarr" | ".tar"
    key_rule: str = ""  # extra restriction on keys, for the error message

    def __init__(self, edir: ExpertDir, unit: str):
        self.edir, self.unit, self.spec = edir, unit, edir.spec
        self.final = edir.path / f"{unit}{self.suffix}"
        self.tmp = fsutil.temp_path(self.final)
        self._rows: list[dict[str, Any]] = []
        self._keys: set[str] = set()
        self._n_ok = 0
        self._nonfinite = 0
        self._closed = False
        self._lock: fsutil.UnitLock | None = None  # set by ExpertDir.open_unit; released when done
        self._open(self.tmp)

    @classmethod
    def warm(cls) -> None:
        """Import what the format needs, so a long-lived writer process pays it before its first unit."""

    # -- what a format implements -----------------------------------------------------------------
    @abstractmethod
    def _open(self, tmp: Path) -> None: ...

    @abstractmethod
    def _write(self, index: int, key: str, tokens: np.ndarray, pooled: np.ndarray, outputs_json: str) -> None: ...

    @abstractmethod
    def _close(self) -> None:
        """Flush everything into ``self.tmp``; after this the container is complete on disk."""

    def _discard(self) -> None:
        """Release what ``_open`` holds without finishing the container (abort). Formats with background
        work override this to stop it; the default closes the container, which ``abort`` then deletes."""
        self._close()

    def _check_key(self, key: str) -> None:
        pass

    # -- protocol ---------------------------------------------------------------------------------
    def add(self, key: str, tokens: Any, pooled: Any, outputs: dict[str, Any] | None = None, *,
            caption: str | None = None, labels: dict[str, Any] | None = None, known_finite: bool = False) -> None:
        """Add one successful key: ``tokens [grid*grid, token_dim]``, ``pooled [pooled_dim]``, JSON ``outputs``.

        ``known_finite``: the caller has checked that the row, in the storage dtype, holds no inf/NaN (the
        extraction actor tests a whole window at once), so the writer skips its own per-row scan."""
        self._new_key(key)
        spec = self.spec
        t = to_storage(tokens, spec.dtype)
        p = to_storage(pooled, spec.dtype)
        # int8 rows carry their scale (stored_shape); the index and the messages give the feature shape
        if t.shape != stored_shape((spec.num_tokens, spec.token_dim), spec.dtype):
            raise ValueError(f"{self._where()}: key {key!r}: tokens shape {logical_shape(t.shape, spec.dtype)}, "
                             f"the spec says ({spec.num_tokens}, {spec.token_dim}) (grid {spec.grid}x{spec.grid}, "
                             "token_dim)")
        if p.shape != stored_shape((spec.pooled_dim,), spec.dtype):
            raise ValueError(f"{self._where()}: key {key!r}: pooled shape {logical_shape(p.shape, spec.dtype)}, "
                             f"the spec says ({spec.pooled_dim},)")
        out = outputs_to_json(outputs)
        if not known_finite and (nonfinite_in_storage(t, spec.dtype) or nonfinite_in_storage(p, spec.dtype)):
            self._nonfinite += 1  # kept (the values are what the expert produced) but counted in stats
        index = self._n_ok
        self._write(index, key, t, p, out)
        self._keys.add(key)  # only now: a rejected row leaves no trace
        self._n_ok += 1
        self._rows.append({
            "key": key, "status": STATUS_OK, "error": None, "caption": caption, "labels": _labels(labels),
            "index": index, "tokens_shape": list(logical_shape(t.shape, spec.dtype)),
            "pooled_shape": list(logical_shape(p.shape, spec.dtype)),
            "checksum": row_checksum(t, p, out),
        })

    def add_failure(self, key: str, reason: str, *, caption: str | None = None,
                    labels: dict[str, Any] | None = None) -> None:
        """Record a key that produced no features. It gets an index row (status=failed) and no array row."""
        self._new_key(key)
        self._keys.add(key)
        self._rows.append({
            "key": key, "status": STATUS_FAILED, "error": stable_reason(str(reason)) or "unknown", "caption": caption,
            "labels": _labels(labels), "index": None, "tokens_shape": None, "pooled_shape": None, "checksum": None,
        })

    def commit(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Make the unit visible, durably and atomically. Returns the stats written."""
        try:
            return self._commit(extra)
        finally:  # the unit is committed or this writer's work is gone: either way no longer owned
            self._release()

    def _commit(self, extra: dict[str, Any] | None) -> dict[str, Any]:
        self._check_open()
        edir = self.edir
        if edir.is_committed(self.unit):
            self.abort()
            raise UnitCommittedError(f"{self._where()}: unit {self.unit} was committed by another writer meanwhile; "
                                     "committed units are immutable, this writer's data was discarded")
        try:
            self._close()
            self._closed = True
            fsutil.fsync_tree(self.tmp)
            # Leftovers of a writer that crashed between its rename and its stats file are uncommitted by
            # definition (no stats): replace them.
            for stale in (self.final, edir.index_path(self.unit)):
                fsutil.remove(stale)
            os.rename(self.tmp, self.final)
            fsutil.fsync_path(edir.path)
            index_bytes = self._index_bytes()
            fsutil.write_atomic(edir.index_path(self.unit), index_bytes)
        except BaseException:
            self.abort()
            raise
        import hashlib

        failed = [r for r in self._rows if r["status"] == STATUS_FAILED]
        data_bytes = fsutil.tree_bytes(self.final)
        stats = {
            "schema_version": UNIT_SCHEMA_VERSION,
            "unit": self.unit,
            "expert": self.spec.expert,
            "fingerprint": self.spec.fingerprint(),
            "format": self.spec.format,
            "dtype": self.spec.dtype,
            "grid": self.spec.grid,
            "images": len(self._rows),
            "ok": self._n_ok,
            "failed": len(failed),
            "failures_by_reason": dict(sorted(Counter(failure_kind(r["error"]) for r in failed).items())),
            "nonfinite_rows": self._nonfinite,
            "data_bytes": data_bytes,
            "index_bytes": len(index_bytes),
            "bytes": data_bytes + len(index_bytes),
            "bytes_per_image": round(data_bytes / self._n_ok, 1) if self._n_ok else 0.0,
            "index_sha256": hashlib.sha256(index_bytes).hexdigest(),
            "created_by": created_by(),
            "extra": extra or {},
        }
        text = json.dumps(stats, indent=2, sort_keys=True, default=str).encode()
        fsutil.write_atomic(edir.stats_path(self.unit), text)
        return stats

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def abort(self) -> None:
        """Drop everything written so far. Safe to call twice, and after a failed commit."""
        if not self._closed:
            try:
                self._discard()
            except Exception:
                pass
            self._closed = True
        fsutil.remove(self.tmp)
        self._rows = []
        self._release()

    def __enter__(self) -> UnitWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._closed:
            self.abort()

    # -- helpers ----------------------------------------------------------------------------------
    def _where(self) -> str:
        return f"{self.edir.path.name}/{self.unit}"

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"{self._where()}: this writer was already committed or aborted; open a new one")

    def _new_key(self, key: str) -> None:
        self._check_open()
        if not isinstance(key, str) or not _KEY_OK.match(key):
            raise ValueError(f"{self._where()}: key {key!r} is not valid: keys are non-empty strings without "
                             "'/', '\\' or control characters")
        self._check_key(key)
        if key in self._keys:
            raise ValueError(f"{self._where()}: key {key!r} was added twice; keys must be unique within a unit "
                             "(the store joins experts by key)")

    def _index_bytes(self) -> bytes:
        table = pa.Table.from_pylist(self._rows, schema=INDEX_SCHEMA) if self._rows else INDEX_SCHEMA.empty_table()
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return buf.getvalue()


def _labels(labels: dict[str, Any] | None) -> str | None:
    if labels is None:
        return None
    return json.dumps(labels, sort_keys=True, separators=(",", ":"), default=str)
