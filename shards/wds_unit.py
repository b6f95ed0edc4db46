"""WebDataset units: one uncompressed tar per unit, three members per successful key, in source order.

```
KEY.tokens.npy    [grid*grid, token_dim] storage dtype (uint16 bit patterns for bfloat16)
KEY.pooled.npy    [pooled_dim]
KEY.outputs.json  the expert's JSON outputs
```
Readable by ``webdataset.WebDataset(path).decode()`` or ``tarfile`` + ``numpy.load``. WebDataset groups
members by the name up to the first '.', so keys in this format must not contain '.'.
Failed keys have no members; the unit's parquet index lists them (status=failed).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from astrea.shards.writer import UnitWriter

MEMBERS = ("tokens.npy", "pooled.npy", "outputs.json")


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


class WdsUnitWriter(UnitWriter):
    suffix = ".tar"

    def _open(self, tmp: Path) -> None:
        self._file = open(tmp, "xb")  # noqa: SIM115 - lives until _close
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)

    def _check_key(self, key: str) -> None:
        if "." in key:
            raise ValueError(f"{self._where()}: key {key!r} contains '.', which WebDataset readers take as the "
                             "start of the member extension; use format 'zarr' for such keys")

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o444
        info.mtime = 0  # byte-identical tars when the same unit is written twice
        self._tar.addfile(info, io.BytesIO(data))

    def _write(self, index: int, key: str, tokens: np.ndarray, pooled: np.ndarray, outputs_json: str) -> None:
        self._add(f"{key}.tokens.npy", _npy_bytes(tokens))
        self._add(f"{key}.pooled.npy", _npy_bytes(pooled))
        self._add(f"{key}.outputs.json", outputs_json.encode("utf-8"))

    def _close(self) -> None:
        self._tar.close()
        self._file.close()


def _npy(data: bytes) -> np.ndarray:
    """Parse .npy bytes without a copy of the payload (np.load on a BytesIO reads it in pieces)."""
    buf = io.BytesIO(data)
    version = np.lib.format.read_magic(buf)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed in a unit")
    a = np.frombuffer(data, dtype=dtype, offset=buf.tell(), count=int(np.prod(shape)))
    return a.reshape(shape, order="F" if fortran else "C")


def iter_rows(path: Path, block_rows: int | None = None) -> Iterator[tuple[int, str, np.ndarray, np.ndarray, str]]:
    """(index, key, tokens, pooled, outputs_json) in storage dtype, reading the tar once, in order."""
    index = 0
    cur: str | None = None
    parts: dict[str, bytes] = {}

    def emit() -> tuple[int, str, np.ndarray, np.ndarray, str]:
        missing = [m for m in MEMBERS if m not in parts]
        if missing:
            raise ValueError(f"{path}: key {cur!r} lacks member(s) {missing}")
        out = parts["outputs.json"].decode("utf-8")
        json.loads(out)  # a corrupt document fails here, naming the unit, not later in a trainer
        return index, cur, _npy(parts["tokens.npy"]), _npy(parts["pooled.npy"]), out  # type: ignore[return-value]

    # Random-access mode on a real file: member payloads are read with one read() each (the streaming
    # "r|" mode copies through a small buffer and is several times slower).
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, _, ext = m.name.partition(".")
            if ext not in MEMBERS:
                raise ValueError(f"{path}: unexpected member {m.name!r}")
            if key != cur:
                if cur is not None:
                    yield emit()
                    index += 1
                cur, parts = key, {}
            f.seek(m.offset_data)
            data = f.read(m.size)
            if len(data) != m.size:
                raise ValueError(f"{path}: member {m.name!r} is truncated")
            parts[ext] = data
        if cur is not None:
            yield emit()
