"""Zarr v3 units: one group per unit.

```
NNNNN.zarr/
  zarr.json        group attrs: {"astrea": {unit, expert, fingerprint, dtype, grid, count, schema_version}}
  tokens           [n, grid*grid, token_dim]  storage dtype, zstd; chunks of whole images (~1 MiB), stored
                   in shards of ~32 MiB (one file per shard: ~300 files per 10k-image unit, not 10k)
  pooled           [n, pooled_dim]
  keys             [n] string, the keys of the rows above (ok keys only, source order)
  outputs          [n] string, one JSON document per row
```
Failed keys are not in the arrays; the unit's parquet index lists them (status=failed).

Writing speed: token rows are buffered and handed to zarr a block of whole shards at a time
(``FLUSH_SHARDS``), so zarr compresses that many chunks concurrently on its thread pool (zstd releases
the GIL), and the block is written by one background thread per writer while the caller keeps adding
rows (checksums, finiteness checks, the next block). At most one block is in flight, so memory stays
bounded (two blocks). Block size and threading change neither the chunk/shard layout nor the codec: the
files are byte-identical to writing row by row. A failed background write is raised by the next
``add``/``commit``; nothing becomes visible before ``commit`` renames the finished container.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from astrea.schemas.unit import UNIT_SCHEMA_VERSION
from astrea.shards.dtypes import numpy_storage_dtype, stored_width
from astrea.shards.writer import UnitWriter

CHUNK_BYTES = 1 << 20  # ~1 MiB chunks: one 576x1152 fp16 image is 1.3 MiB, so one image per chunk
MAX_CHUNK_ROWS = 64
SHARD_BYTES = 32 << 20  # one file per ~32 MiB of tokens: fewer inodes and fsyncs; written whole
READ_BLOCK_BYTES = 256 << 20  # a reader holds at most this much of one unit's tokens at a time
ZSTD_LEVEL = 3
# Whole shards per zarr write call (~24 images of 576x1152 fp16 each). Measured on a 16-core host
# (benchmarks/unit_write.py): 1 shard per call with the background thread was fastest; bigger blocks
# only delay the first handover.
FLUSH_SHARDS = 1


class UnitWriteFailed(RuntimeError):
    """The background write of a block of rows failed (disk full, I/O error...): the unit cannot be
    committed. Not a ValueError on purpose: callers treat ValueError from ``add`` as a bad key."""


def _zarr():
    import zarr

    return zarr


def chunk_rows(row_bytes: int) -> int:
    return int(min(MAX_CHUNK_ROWS, max(1, CHUNK_BYTES // max(1, row_bytes))))


class ZarrUnitWriter(UnitWriter):
    suffix = ".zarr"
    flush_shards: int = FLUSH_SHARDS  # class attributes so a benchmark can compare settings
    background: bool = True

    @classmethod
    def warm(cls) -> None:
        _zarr()  # ~0.3 s of imports

    def _open(self, tmp: Path) -> None:
        zarr = _zarr()
        spec = self.spec
        dt = numpy_storage_dtype(spec.dtype)
        tdim = stored_width(spec.token_dim, spec.dtype)  # int8 rows carry their scale
        row_bytes = spec.num_tokens * tdim * dt.itemsize
        self._rows_per_chunk = chunk_rows(row_bytes)
        # Rows are buffered and written a whole shard at a time (no read-modify-write of a shard file).
        self._rows_per_shard = self._rows_per_chunk * max(1, SHARD_BYTES // (row_bytes * self._rows_per_chunk))
        self._group = zarr.open_group(str(tmp), mode="w-", zarr_format=3)
        self._tokens = self._group.create_array(
            "tokens", shape=(0, spec.num_tokens, tdim), dtype=dt,
            chunks=(self._rows_per_chunk, spec.num_tokens, tdim),
            shards=(self._rows_per_shard, spec.num_tokens, tdim),
            compressors=zarr.codecs.ZstdCodec(level=ZSTD_LEVEL), fill_value=0,
            dimension_names=("image", "token", "channel"))
        self._pending: list[np.ndarray] = []
        self._written = 0
        self._rows_per_flush = self._rows_per_shard * max(1, self.flush_shards)
        # One thread, so blocks land in order and resize/write never race; created on first flush.
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: Future | None = None
        self._failed: BaseException | None = None
        # Small per-row things stay in memory until close (a 10k-image unit: ~25 MB of pooled at fp16).
        self._pooled: list[np.ndarray] = []
        self._keys_out: list[str] = []
        self._outputs: list[str] = []

    def _write(self, index: int, key: str, tokens: np.ndarray, pooled: np.ndarray, outputs_json: str) -> None:
        self._pending.append(tokens)
        self._pooled.append(pooled)
        self._keys_out.append(key)
        self._outputs.append(outputs_json)
        if len(self._pending) == self._rows_per_flush:
            self._flush()

    def _flush(self) -> None:
        """Hand the buffered rows to the writer thread (or write them here when ``background`` is off)."""
        self._wait()
        if not self._pending:
            return
        block, start = np.stack(self._pending), self._written
        self._pending = []
        self._written += len(block)
        if not self.background:
            self._write_block(start, block)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"astrea-zarr-{self.unit}")
        self._inflight = self._pool.submit(self._write_block, start, block)

    def _write_block(self, start: int, block: np.ndarray) -> None:
        # Whole shards are written at once (no read-modify-write of partial shards); only the unit's
        # last block may end inside a shard, and nothing is written after it.
        n = len(block)
        self._tokens.resize((start + n, *self._tokens.shape[1:]))
        self._tokens[start:start + n] = block

    def _wait(self) -> None:
        """Wait for the block in flight; re-raise its failure (and keep raising it: the unit is lost)."""
        fut, self._inflight = self._inflight, None
        if fut is not None:
            try:
                fut.result()
            except Exception as e:  # a KeyboardInterrupt while waiting is the caller's, not the write's
                self._failed = e
        if self._failed is not None:
            raise UnitWriteFailed(f"{self._where()}: writing token rows to {self.tmp} failed "
                                  f"({type(self._failed).__name__}: {self._failed}); the unit was not "
                                  "committed, fix the cause and rerun") from self._failed

    def _stop_thread(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _discard(self) -> None:
        """Abort: let the block in flight finish (it writes inside tmp, which is removed next), write nothing more."""
        self._pending = []
        try:
            self._wait()
        except UnitWriteFailed:
            pass
        finally:
            self._stop_thread()

    def _close(self) -> None:
        zarr = _zarr()
        spec = self.spec
        try:
            self._flush()
            self._wait()
        finally:
            self._stop_thread()
        n = self._written
        dt = numpy_storage_dtype(spec.dtype)
        pdim = stored_width(spec.pooled_dim, spec.dtype)
        pooled = np.stack(self._pooled) if self._pooled else np.zeros((0, pdim), dt)
        prow = chunk_rows(pdim * dt.itemsize * 64) * 64
        arr = self._group.create_array("pooled", shape=pooled.shape, dtype=dt, chunks=(max(1, min(prow, n or 1)), pdim),
                                       compressors=zarr.codecs.ZstdCodec(level=ZSTD_LEVEL), fill_value=0,
                                       dimension_names=("image", "channel"))
        if n:
            arr[:] = pooled
        with warnings.catch_warnings():
            # zarr-python notes that its variable-length string dtype is not yet in the core v3 spec;
            # zarr-python >= 3.0 reads and writes it.
            warnings.simplefilter("ignore")
            for name, values in (("keys", self._keys_out), ("outputs", self._outputs)):
                a = self._group.create_array(name, shape=(n,), dtype=str, chunks=(max(1, n),),
                                             compressors=zarr.codecs.ZstdCodec(level=ZSTD_LEVEL),
                                             dimension_names=("image",))
                if n:
                    a[:] = np.array(values, dtype=object)
        self._group.attrs["astrea"] = {
            "unit": self.unit, "expert": spec.expert, "fingerprint": spec.fingerprint(), "dtype": spec.dtype,
            "storage_dtype": dt.name, "grid": spec.grid, "count": n, "schema_version": UNIT_SCHEMA_VERSION,
        }
        self._pooled, self._outputs = [], []


def iter_rows(path: Path, block_rows: int | None = None) -> Iterator[tuple[int, str, np.ndarray, np.ndarray, str]]:
    """(index, key, tokens, pooled, outputs_json) in storage dtype, reading chunk-aligned blocks at once.

    A block that cannot be decoded is read again row by row; a row whose chunk is undecodable comes back
    with the exception in place of its tokens, so the other rows of the unit stay readable."""
    zarr = _zarr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = zarr.open_group(str(path), mode="r", zarr_format=3)
        keys = g["keys"][:]
        outputs = g["outputs"][:]
        pooled = g["pooled"][:]
    tokens = g["tokens"]
    n = tokens.shape[0]
    if not (len(keys) == len(outputs) == pooled.shape[0] == n):
        raise ValueError(f"{path}: arrays disagree in length (tokens {n}, pooled {pooled.shape[0]}, "
                         f"keys {len(keys)}, outputs {len(outputs)})")
    if block_rows is None:
        c = (tokens.shards or tokens.chunks)[0]
        row = int(np.prod(tokens.shape[1:])) * tokens.dtype.itemsize
        block_rows = max(c, (READ_BLOCK_BYTES // max(1, row)) // c * c)
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        try:
            block = tokens[start:stop]
        except Exception:  # noqa: BLE001 - a damaged chunk: isolate it below, one row at a time
            block = None
        for i in range(start, stop):
            if block is not None:
                t = block[i - start]
            else:
                try:
                    t = tokens[i]
                except Exception as e:  # noqa: BLE001 - this row's chunk: handed to the caller, which names the key
                    t = e
            yield i, str(keys[i]), t, pooled[i], str(outputs[i])
