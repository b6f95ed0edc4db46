"""Unit formats by name (the spec's ``format``): each gives a writer class, a suffix and a row reader.

Adding a format = one module with a ``UnitWriter`` subclass and an ``iter_rows`` function, plus one
line here; nothing else in the store dispatches on the format name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from astrea.registry import Registry

RowIter = Iterator[tuple[int, str, np.ndarray, np.ndarray, str]]


@dataclass(frozen=True)
class UnitFormat:
    name: str
    suffix: str  # data container next to the parquet index: "00000.zarr", "00000.tar"
    writer: type  # UnitWriter subclass
    iter_rows: Callable[..., RowIter]  # (path, block_rows=None) -> (index, key, tokens, pooled, outputs_json)


def _zarr() -> UnitFormat:
    from astrea.shards import zarr_unit

    return UnitFormat("zarr", ".zarr", zarr_unit.ZarrUnitWriter, zarr_unit.iter_rows)


def _wds() -> UnitFormat:
    from astrea.shards import wds_unit

    return UnitFormat("wds", ".tar", wds_unit.WdsUnitWriter, wds_unit.iter_rows)


UNIT_FORMATS: Registry[Callable[[], UnitFormat]] = Registry("store format")
UNIT_FORMATS.register("zarr", _zarr, "Zarr v3 group: tokens [n,T,D], pooled [n,D], keys, outputs; zstd")
UNIT_FORMATS.register("wds", _wds, "WebDataset tar: KEY.tokens.npy, KEY.pooled.npy, KEY.outputs.json")

_cache: dict[str, UnitFormat] = {}


def get_format(name: str) -> UnitFormat:
    if name not in _cache:
        _cache[name] = UNIT_FORMATS.get(name)()
    return _cache[name]


def data_suffixes() -> tuple[str, ...]:
    return tuple(get_format(n).suffix for n in UNIT_FORMATS.names())


def data_path(root: Path, unit: str, fmt: str) -> Path:
    return root / f"{unit}{get_format(fmt).suffix}"
