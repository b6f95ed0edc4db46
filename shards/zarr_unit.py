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

Codecs (the spec's ``codec``, part of the fingerprint):

- ``raw`` (default): tokens stored as their storage-dtype bytes, in shards of ~32 MiB of one-row inner
  chunks with no compression (the plain zarr v3 ``sharding_indexed`` codec with a ``bytes`` inner codec and
  a crc32c-checked index). float16 mantissas barely compress (zstd saved 8% of bytes and cost ~30x on
  read), and zarr-python's own read of such shards runs at 0.05-0.6x of ``np.load`` (measured,
  benchmarks/store_io.py), so this module writes and reads the shard files itself, per the v3 spec: one
  ``writev`` per shard (the rows as they are, no copy into a block), one ``readinto`` per row into a
  fresh array. The files are what zarr-python writes
  for the same array (tests/shards/test_raw_codec.py reads them back with zarr alone and compares bytes).
  Anything else (another layout, a damaged shard index) goes through zarr-python.
- ``zstd``: the previous default (zstd level 3 on ~1 MiB chunks), kept for stores written with it and as
  an option: 8% fewer bytes at float16, ~20% at bfloat16, for ~30x the read CPU.

Writing speed: token rows are buffered and handed over a whole shard at a time (``FLUSH_SHARDS``) to one
background thread per writer while the caller keeps adding rows (checksums, the next block). At most one
block is in flight, so memory stays bounded (two blocks). Block size and threading change neither the
chunk/shard layout nor the codec: the files are byte-identical to writing row by row. A failed background
write is raised by the next ``add``/``commit``; nothing becomes visible before ``commit`` renames the
finished container.
"""

from __future__ import annotations

import json
import os
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
MAX_RAW_SHARD_ROWS = 1024  # raw shards index every row (16 bytes): cap it for small rows
_EMPTY = np.uint64(2**64 - 1)  # a shard index entry of an absent inner chunk (zarr v3 sharding spec)
_LE = {"name": "bytes", "configuration": {"endian": "little"}}


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
        self._raw = spec.codec == "raw"
        # raw: one row per inner chunk, so a shard holds exactly the rows written (no padding) and each
        # row is one contiguous byte range; zstd: ~1 MiB chunks, as written before the codec was a choice.
        self._rows_per_chunk = 1 if self._raw else chunk_rows(row_bytes)
        # Rows are buffered and written a whole shard at a time (no read-modify-write of a shard file).
        self._rows_per_shard = self._rows_per_chunk * max(1, SHARD_BYTES // (row_bytes * self._rows_per_chunk))
        if self._raw:
            self._rows_per_shard = min(self._rows_per_shard, MAX_RAW_SHARD_ROWS)
        self._group = zarr.open_group(str(tmp), mode="w-", zarr_format=3)
        self._tokens = self._group.create_array(
            "tokens", shape=(0, spec.num_tokens, tdim), dtype=dt,
            chunks=(self._rows_per_chunk, spec.num_tokens, tdim),
            shards=(self._rows_per_shard, spec.num_tokens, tdim),
            compressors=self._compressors(), fill_value=0,
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

    def _compressors(self):
        return None if self._raw else _zarr().codecs.ZstdCodec(level=ZSTD_LEVEL)

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
        # raw: the rows go to the file as they are (one writev per shard, no copy into a block first)
        block, start = (list(self._pending) if self._raw else np.stack(self._pending)), self._written
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
        if self._raw:  # blocks start on a shard boundary (see _flush) and hold whole shards but the last
            per = self._rows_per_shard
            for lo in range(0, n, per):
                key = self._tokens.metadata.encode_chunk_key(((start + lo) // per, 0, 0))
                _write_raw_shard(self.tmp / "tokens", key, block[lo:lo + per], per)
            return
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
        if self._raw:  # shards are on disk already; the array's shape is metadata only
            self._tokens.resize((n, *self._tokens.shape[1:]))
        dt = numpy_storage_dtype(spec.dtype)
        pdim = stored_width(spec.pooled_dim, spec.dtype)
        pooled = np.stack(self._pooled) if self._pooled else np.zeros((0, pdim), dt)
        prow = chunk_rows(pdim * dt.itemsize * 64) * 64
        arr = self._group.create_array("pooled", shape=pooled.shape, dtype=dt, chunks=(max(1, min(prow, n or 1)), pdim),
                                       compressors=self._compressors(), fill_value=0,
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
            **({"codec": spec.codec} if self._raw else {}),  # zstd units were written without the field
        }
        self._pooled, self._outputs = [], []


def _shard_index(n: int, rows_per_shard: int, row_bytes: int) -> bytes:
    """The end-of-shard index of ``n`` contiguous one-row chunks: (offset, nbytes) uint64 LE per inner
    chunk, absent chunks all ones, then crc32c of those bytes as uint32 LE (zarr's default index codecs)."""
    import google_crc32c  # zarr's own crc32c dependency

    index = np.full((rows_per_shard, 2), _EMPTY, dtype="<u8")
    index[:n, 0] = np.arange(n, dtype="<u8") * np.uint64(row_bytes)
    index[:n, 1] = row_bytes
    raw = index.tobytes()
    return raw + np.uint32(google_crc32c.value(raw)).tobytes()


def _write_raw_shard(array_dir: Path, key: str, rows: list[np.ndarray], rows_per_shard: int) -> None:
    bufs = [memoryview(np.ascontiguousarray(r, dtype=r.dtype.newbyteorder("<"))).cast("B") for r in rows]
    bufs.append(memoryview(_shard_index(len(rows), rows_per_shard, bufs[0].nbytes if rows else 0)))
    path = array_dir / key
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        while bufs:  # writev may write less than asked (signals, huge requests): go on from where it stopped
            done = os.writev(fd, bufs[:1024])
            while done and bufs:
                if done >= bufs[0].nbytes:
                    done -= bufs.pop(0).nbytes
                else:
                    bufs[0], done = bufs[0][done:], 0
        # fsync here, on the background thread: the commit's fsync_tree then finds nothing left to flush
        os.fsync(fd)
    finally:
        os.close(fd)


def _raw_layout(array_dir: Path) -> tuple[int, np.dtype, tuple[int, ...]] | None:
    """(rows per shard, dtype, shape) when ``array_dir`` is a raw sharded array this module can read
    directly (exactly what the raw writer declares), else None: zarr-python reads it."""
    try:
        meta = json.loads((array_dir / "zarr.json").read_text())
        shape = tuple(int(x) for x in meta["shape"])
        shard = [int(x) for x in meta["chunk_grid"]["configuration"]["chunk_shape"]]
        dtype = {"float16": "<f2", "float32": "<f4", "uint16": "<u2", "int8": "i1", "uint8": "u1"}[meta["data_type"]]
        ok = (meta["chunk_grid"]["name"] == "regular" and len(shape) == 3 and shard[1:] == list(shape[1:])
              and meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
              and meta.get("storage_transformers", []) == []
              and meta["codecs"] == [{"name": "sharding_indexed", "configuration": {
                  "chunk_shape": [1, *shape[1:]], "codecs": [_LE], "index_codecs": [_LE, {"name": "crc32c"}],
                  "index_location": "end"}}])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return (shard[0], np.dtype(dtype), shape) if ok else None


def _iter_raw_tokens(array_dir: Path, rows_per_shard: int, dtype: np.dtype, shape: tuple[int, ...]
                     ) -> Iterator[np.ndarray | BaseException]:
    """Each row of a raw sharded array in order, read straight into its own array (one ``readinto``);
    a row that cannot be read comes back as the exception (the caller names the key)."""
    import google_crc32c

    n, row_shape = shape[0], shape[1:]
    row_bytes = int(np.prod(row_shape)) * dtype.itemsize
    tail = rows_per_shard * 16 + 4
    for shard_i, start in enumerate(range(0, n, rows_per_shard)):
        rows = min(rows_per_shard, n - start)
        try:
            f = open(array_dir / "c" / str(shard_i) / "0" / "0", "rb")  # noqa: SIM115 - closed below
        except OSError as e:  # a deleted shard file: zarr would read zeros, here its rows are damaged
            err = ValueError(f"shard file {e.filename} is missing" if isinstance(e, FileNotFoundError) else
                             f"shard file {e.filename}: {e.strerror or e}")
            yield from (err for _ in range(rows))
            continue
        with f:
            try:
                size = os.fstat(f.fileno()).st_size
                if size < tail:
                    raise ValueError(f"shard file {f.name} is {size} bytes, shorter than its index")
                f.seek(size - tail)
                raw = f.read(tail)
                if np.uint32(google_crc32c.value(raw[:-4])).tobytes() != raw[-4:]:
                    raise ValueError(f"shard file {f.name}: its index fails its crc32c")
                index = np.frombuffer(raw[:-4], dtype="<u8").reshape(rows_per_shard, 2)
            except (OSError, ValueError) as e:
                yield from (e for _ in range(rows))
                continue
            for j in range(rows):
                off, nbytes = (int(x) for x in index[j])
                if nbytes != row_bytes or off + nbytes > size - tail:
                    yield ValueError(f"shard file {f.name}: inner chunk {j} has offset {off} and {nbytes} bytes, "
                                     f"expected {row_bytes} bytes before the index")
                    continue
                row = np.empty(row_shape, dtype)
                f.seek(off)
                got = f.readinto(memoryview(row).cast("B"))
                yield row if got == row_bytes else ValueError(f"shard file {f.name}: row {j} is truncated")


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
    raw = _raw_layout(Path(path) / "tokens")
    if raw is not None:
        for i, t in enumerate(_iter_raw_tokens(Path(path) / "tokens", *raw)):
            yield i, str(keys[i]), t, pooled[i], str(outputs[i])
        return
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
