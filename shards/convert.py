"""Re-encode an expert directory into another storage dtype and/or format, without running the expert.

```python
from astrea.shards.convert import ConvertConfig
report = ConvertConfig(store="store", dataset="sample", expert="siglip", dtype="int8").build().run()
```
- The new directory gets the source spec with the new dtype/format and ``converted_from`` (the source's
  fingerprint, dtype and format), so it has a fingerprint of its own and its expert.json says where its
  bytes came from. Each unit's stats carry the source unit's index hash (``extra.converted_from``).
- The source is only read, every row verified (checksum, finiteness) as any reader does; a damaged row
  stops that unit with the error naming it, nothing of it is written.
- Each unit is written through the store's own writer and commit protocol (lock, temp container,
  fsync, rename, index, stats last), so a killed conversion leaves no partial unit and a rerun skips
  the units already committed and redoes the rest (removing what the dead writer left).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from astrea.schemas import STORE_FORMATS, STORAGE_DTYPES
from astrea.schemas.expert_spec import ExpertSpec
from astrea.schemas.unit import OutputsJSON
from astrea.shards.dtypes import from_storage
from astrea.shards.errors import StoreError, UnitBusyError
from astrea.shards.store import ExpertDir, Store

CONVERTER = "astrea shards convert"


class ConvertError(StoreError):
    """A conversion that cannot be done as asked (bad field, nothing to convert)."""


def converted_spec(src: ExpertSpec, *, dtype: str | None = None, format: str | None = None) -> ExpertSpec:
    """The spec of ``src`` re-encoded as ``dtype``/``format``, carrying where it came from."""
    dtype, format = dtype or src.dtype, format or src.format
    prov: dict[str, Any] = {"fingerprint": src.fingerprint(), "dtype": src.dtype, "format": src.format,
                            "by": CONVERTER}
    if src.converted_from:  # a conversion of a conversion keeps the whole chain
        prov["converted_from"] = src.converted_from
    return dataclasses.replace(src, dtype=dtype, format=format, converted_from=prov)


@dataclass
class ConvertReport:
    source: str  # EXPERT@FP of the source
    target: str  # path of the new expert directory
    dtype: str
    format: str
    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already committed in the target (a rerun)
    busy: list[str] = field(default_factory=list)  # another live writer holds the unit
    rows: int = 0
    source_bytes: int = 0  # data + index of the units converted by this run
    target_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ConvertConfig:
    """``store``/``dataset``/``expert`` name the source (``expert``: NAME or NAME@FINGERPRINT prefix);
    ``dtype``/``format``: what to re-encode into (None: keep the source's); ``out``: the target store
    (default: the same store, a new directory beside the source); ``units``: a subset (default: every
    unit committed in the source)."""

    store: str | Path
    dataset: str
    expert: str
    dtype: str | None = None
    format: str | None = None
    out: str | Path | None = None
    units: list[str] | None = None

    def build(self) -> Converter:
        if self.dtype is not None and self.dtype not in STORAGE_DTYPES:
            raise ConvertError(f"dtype={self.dtype!r} is not valid; choose one of {list(STORAGE_DTYPES)}")
        if self.format is not None and self.format not in STORE_FORMATS:
            raise ConvertError(f"format={self.format!r} is not valid; choose one of {list(STORE_FORMATS)}")
        src = _resolve_source(Store(self.store), self.dataset, self.expert)
        if (self.dtype in (None, src.spec.dtype) and self.format in (None, src.spec.format)
                and (self.out is None or Path(self.out).resolve() == Path(self.store).resolve())):
            raise ConvertError(f"{src.path}: already {src.spec.dtype} / {src.spec.format}; give --dtype or "
                               "--format (or --out for a copy into another store)")
        units = src.committed_units()
        if self.units is not None:
            missing = [u for u in self.units if u not in units]
            if missing:
                raise ConvertError(f"units={missing}: not committed in {src.path}; committed: {units or 'none'}")
            units = list(self.units)
        dst = Store(self.out if self.out is not None else self.store)
        return Converter(src, dst, converted_spec(src.spec, dtype=self.dtype, format=self.format), units)


def _resolve_source(store: Store, dataset: str, ref: str) -> ExpertDir:
    """``ref`` as ``Store.resolve`` reads it, except that the conversions of a candidate do not make it
    ambiguous: rerunning ``convert -e siglip`` after an in-place conversion resumes from the same source."""
    try:
        return store.resolve(dataset, ref)
    except StoreError as e:
        if "ambiguous" not in str(e):
            raise
        name, _, fp = ref.partition("@")
        cands = [d for d in store.experts(dataset) if d.expert == name and d.fingerprint.startswith(fp)]
        fps = {d.fingerprint for d in cands}
        originals = [d for d in cands if d.spec.converted_from.get("fingerprint") not in fps]
        if len(originals) != 1:
            raise
        return originals[0]


class Converter:
    def __init__(self, src: ExpertDir, dst_store: Store, spec: ExpertSpec, units: list[str]):
        self.src, self.dst_store, self.spec, self.units = src, dst_store, spec, units

    def run(self, on_row: Callable[[str, int], None] | None = None) -> ConvertReport:
        """Convert every unit not yet committed in the target. ``on_row(unit, i)`` is called after each
        row is handed to the writer (progress; the kill test pauses a real converter there)."""
        dst = self.dst_store.expert_dir(self.src.dataset, self.spec, create=True)
        dst.cleanup_temp()  # what a killed conversion left (its writer is dead: its lock is free)
        rep = ConvertReport(self.src.name, str(dst.path), self.spec.dtype, self.spec.format)
        for unit in self.units:
            if dst.is_committed(unit):
                rep.skipped.append(unit)
                continue
            try:
                stats = self._unit(dst, unit, on_row)
            except UnitBusyError:
                rep.busy.append(unit)
                continue
            src_stats = self.src.stats(unit)
            rep.converted.append(unit)
            rep.rows += stats["images"]
            rep.source_bytes += int(src_stats.get("bytes", 0))
            rep.target_bytes += int(stats["bytes"])
        return rep

    def _unit(self, dst: ExpertDir, unit: str, on_row: Callable[[str, int], None] | None) -> dict[str, Any]:
        src, src_dtype = self.src, self.src.spec.dtype
        src_stats = src.stats(unit)
        w = dst.open_unit(unit)
        with w:  # leaving without commit (a damaged source row, an error) aborts: nothing becomes visible
            for i, (row, stored) in enumerate(src.iter_stored(unit)):
                labels = json.loads(row["labels"]) if row["labels"] else None
                if stored is None:
                    w.add_failure(row["key"], row["error"] or "unknown", caption=row["caption"], labels=labels)
                else:
                    t, p, out = stored
                    # the exact stored outputs text (OutputsJSON is not encoded again): same checksum input
                    w.add(row["key"], from_storage(t, src_dtype), from_storage(p, src_dtype), OutputsJSON(out),
                          caption=row["caption"], labels=labels)
                if on_row is not None:
                    on_row(unit, i)
            extra = {"converted_from": {"expert_dir": src.name, "unit": unit, "by": CONVERTER,
                                        "index_sha256": src_stats.get("index_sha256"),
                                        "dtype": src_dtype, "format": src.spec.format},
                     "source_extra": src_stats.get("extra", {})}
            return w.commit(extra=extra)
