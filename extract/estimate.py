"""Plan a store before extracting: bytes and files for N images, from the experts' specs alone.

```python
from astrea.extract.estimate import EstimateConfig
est = EstimateConfig(experts=["siglip", "sam2=hiera_large"], images=558_000, dtype="int8").build().run()
```
Token and pooled widths come from the expert modules' ``VARIANTS`` tables (or an ``expert.json``); no
model is built or run. What is exact and what is assumed:

- arrays: ``images x (grid^2 x token_dim + pooled_dim)`` in the storage dtype (int8 rows carry a 4-byte
  scale): exact before compression. ``zarr`` compresses them (zstd); by how much depends on the features
  (float16 ~8%, int8 ~4% on the benchmarks' data), so the zarr figure is the uncompressed upper bound
  unless ``compression`` (stored/raw, e.g. 0.92) is given. ``wds`` (tar) is exact: 512-byte headers and
  padding per member, ``.npy`` headers.
- outputs JSON: per-expert bytes per image from ``OUTPUTS_BYTES`` (assumptions, override them with
  ``outputs_bytes``: measure a pilot extraction with ``astrea shards info``);
- the parquet index, the stats file and zarr's metadata: small constants measured on units written by
  this store (``INDEX_*``, ``STATS_BYTES``, ``ZARR_META_BYTES``).
- files: per unit the data (one tar, or zarr's metadata files plus one file per token shard and per pooled
  chunk, from the writer's chunk/shard sizes), the index and the stats; per expert its expert.json and
  the extraction job's extract_report.json.

tests/extract/test_store_plans.py checks it against real ``astrea extract`` runs: files exactly, tar bytes
within 3%, zarr bytes within 3% once given the arrays' measured zstd ratio (and above them without it).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from astrea.schemas import STORE_FORMATS, STORAGE_DTYPES
from astrea.schemas.expert_spec import CODECS, DEFAULT_CODEC
from astrea.schemas.expert_spec import ExpertSpec
from astrea.shards.dtypes import itemsize, stored_width
from astrea.shards.errors import StoreError

# Outputs JSON bytes per image: siglip stores none; the others are assumptions (no pretrained weights
# were run here) for ~10 tags, ~10 boxes, ~10 RLE masks at 1024 px. Override with measured values.
OUTPUTS_BYTES = {"siglip": 2, "ram_plus": 300, "grounding_dino": 900, "sam2": 6000, "sam": 6000}
OUTPUTS_BYTES_OTHER = 500
# Measured on units this store wrote (benchmarks/estimate.py prints the check): the parquet index is
# ~3 KB of schema/footer plus ~30 bytes per key (key, status, checksum, shapes; zstd) plus its caption
# (zstd roughly halves English text); a stats file ~0.5 KB, ~1.5 KB with an extraction job's timings.
INDEX_FIXED_BYTES = 3100
INDEX_ROW_BYTES = 30
CAPTION_COMPRESSION = 0.5
STATS_BYTES = 1500
SPEC_BYTES = 1500  # expert.json
REPORT_BYTES = 1100  # extract_report.json, the extraction job's summary in the expert directory
ZARR_META_BYTES = 3500  # zarr.json of the group and of its four arrays
ZARR_SHARD_INDEX_BYTES = 16  # per chunk inside a shard file (offset + length), + 4 (crc32c) per shard
TAR_BLOCK, TAR_RECORD, NPY_HEADER = 512, 10240, 128


class EstimateError(StoreError):
    """A bad estimate request (names the field)."""


@dataclass
class ExpertEstimate:
    expert: str
    arch: str
    token_dim: int
    pooled_dim: int
    grid: int
    dtype: str
    format: str
    images: int
    units: int
    files: int
    bytes: int
    bytes_per_image: float
    parts: dict[str, int] = field(default_factory=dict)  # tokens, pooled, outputs, index, container, meta

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Estimate:
    images: int
    images_per_unit: int
    experts: list[ExpertEstimate]
    compression: float | None
    assumptions: dict[str, Any]

    @property
    def bytes(self) -> int:
        return sum(e.bytes for e in self.experts)

    @property
    def files(self) -> int:
        return sum(e.files for e in self.experts)

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "images_per_unit": self.images_per_unit, "bytes": self.bytes,
                "files": self.files, "compression": self.compression, "assumptions": self.assumptions,
                "experts": [e.to_dict() for e in self.experts]}


@dataclass
class EstimateConfig:
    """``experts``: ``NAME`` (its default variant, or the small one with ``small``) or ``NAME=VARIANT``
    (``sam2=hiera_large`` or ``sam2=sam2.hiera_large``); ``specs``: expert.json files (their dims, grid,
    dtype and format, unless ``grid``/``dtype``/``format`` are given). ``images_per_unit``: images per
    source shard (img2dataset writes 10,000). ``outputs_bytes``: measured JSON bytes per image, by expert."""

    experts: list[str] = field(default_factory=list)
    images: int = 1
    grid: int | None = None
    dtype: str | None = None
    format: str | None = None
    specs: list[str | Path] = field(default_factory=list)
    small: bool = False
    images_per_unit: int = 10_000
    caption_bytes: int = 60
    key_bytes: int = 9
    outputs_bytes: dict[str, int] = field(default_factory=dict)
    compression: float | None = None  # zstd only: raw arrays are stored as they are
    codec: str | None = None  # zarr: raw (default) | zstd; default: the spec's

    def build(self) -> Estimator:
        if self.images < 1:
            raise EstimateError(f"images={self.images} must be >= 1")
        if self.images_per_unit < 1:
            raise EstimateError(f"images_per_unit={self.images_per_unit} must be >= 1")
        if self.grid is not None and self.grid < 1:
            raise EstimateError(f"grid={self.grid} must be >= 1")
        if self.dtype is not None and self.dtype not in STORAGE_DTYPES:
            raise EstimateError(f"dtype={self.dtype!r} is not valid; choose one of {list(STORAGE_DTYPES)}")
        if self.format is not None and self.format not in STORE_FORMATS:
            raise EstimateError(f"format={self.format!r} is not valid; choose one of {list(STORE_FORMATS)}")
        if self.compression is not None and not 0 < self.compression <= 1.5:
            raise EstimateError(f"compression={self.compression} must be a ratio stored/raw in (0, 1.5]")
        if not self.experts and not self.specs:
            raise EstimateError("experts: give at least one expert (NAME or NAME=VARIANT) or an expert.json")
        rows = [self._from_registry(e) for e in self.experts] + [self._from_spec(Path(p)) for p in self.specs]
        return Estimator(self, rows)

    def _pick(self, grid: int, dtype: str, fmt: str) -> tuple[int, str, str]:
        return self.grid or grid, self.dtype or dtype, self.format or fmt

    def _from_registry(self, ref: str) -> dict[str, Any]:
        from astrea.extract.experts.registry import ExpertConfig, default_variant, variants

        name, _, var = ref.partition("=")
        table = variants(name)  # UnknownNameError lists the experts
        var = var or default_variant(name, self.small)
        full = var if var in table else f"{name}.{var}"
        if full not in table:
            raise EstimateError(f"experts: {name} has no variant {var!r}; variants: {list(table)}")
        v = table[full]
        # no spec: what `astrea extract` writes by default (ExpertConfig's storage settings)
        grid, dtype, fmt = self._pick(ExpertConfig.grid, ExpertConfig.dtype, ExpertConfig.format)
        return {"expert": name, "arch": full, "token_dim": v.token_dim, "pooled_dim": v.pooled_dim,
                "grid": grid, "dtype": dtype, "format": fmt, "codec": self._codec(fmt, DEFAULT_CODEC)}

    def _codec(self, fmt: str, codec: str) -> str:
        codec = self.codec or codec
        if codec not in CODECS[fmt]:
            raise EstimateError(f"codec={codec!r} is not valid for format {fmt!r}; choose one of {list(CODECS[fmt])}")
        return codec

    def _from_spec(self, path: Path) -> dict[str, Any]:
        p = path / "expert.json" if path.is_dir() else path
        if not p.is_file():
            raise EstimateError(f"specs: {p} is not an expert.json (nor a directory holding one)")
        try:
            s = ExpertSpec.from_dict(json.loads(p.read_text()), source=str(p))
        except json.JSONDecodeError as e:
            raise EstimateError(f"specs: {p}: not valid JSON ({e})") from None
        grid, dtype, fmt = self._pick(s.grid, s.dtype, s.format)
        codec = s.codec if fmt == s.format else DEFAULT_CODEC
        return {"expert": s.expert, "arch": s.arch, "token_dim": s.token_dim, "pooled_dim": s.pooled_dim,
                "grid": grid, "dtype": dtype, "format": fmt, "codec": self._codec(fmt, codec)}


class Estimator:
    def __init__(self, cfg: EstimateConfig, rows: list[dict[str, Any]]):
        self.cfg, self.rows = cfg, rows

    def run(self) -> Estimate:
        c = self.cfg
        full, last = divmod(c.images, c.images_per_unit)
        sizes = [(c.images_per_unit, full)] + ([(last, 1)] if last else [])
        out = []
        for r in self.rows:
            obytes = int(c.outputs_bytes.get(r["expert"], OUTPUTS_BYTES.get(r["expert"], OUTPUTS_BYTES_OTHER)))
            parts: dict[str, int] = {}
            files = 2  # expert.json, extract_report.json
            for n, count in sizes:
                unit_parts, unit_files = unit_estimate(n, r["grid"] ** 2, r["token_dim"], r["pooled_dim"], r["dtype"],
                                                       r["format"], obytes, c, codec=r["codec"])
                for k, v in unit_parts.items():
                    parts[k] = parts.get(k, 0) + v * count
                files += unit_files * count
            parts["meta"] = parts.get("meta", 0) + SPEC_BYTES + REPORT_BYTES
            total = sum(parts.values())
            out.append(ExpertEstimate(r["expert"], r["arch"], r["token_dim"], r["pooled_dim"], r["grid"], r["dtype"],
                                      r["format"], c.images, full + (1 if last else 0), files, total,
                                      round(total / c.images, 1), parts))
        assumptions = {"outputs_bytes_per_image": {r["expert"]: int(c.outputs_bytes.get(
            r["expert"], OUTPUTS_BYTES.get(r["expert"], OUTPUTS_BYTES_OTHER))) for r in self.rows},
            "caption_bytes": c.caption_bytes, "key_bytes": c.key_bytes,
            "zarr_arrays": "uncompressed (upper bound)" if c.compression is None else f"x{c.compression} (given)"}
        return Estimate(c.images, c.images_per_unit, out, c.compression, assumptions)


def _pad(n: int, block: int) -> int:
    return -(-n // block) * block


def unit_estimate(n: int, tokens: int, token_dim: int, pooled_dim: int, dtype: str, fmt: str, outputs_bytes: int,
                  cfg: EstimateConfig, codec: str = DEFAULT_CODEC) -> tuple[dict[str, int], int]:
    """Bytes by part and files of one unit of ``n`` ok images."""
    isz = itemsize(dtype)
    trow = tokens * stored_width(token_dim, dtype) * isz
    prow = stored_width(pooled_dim, dtype) * isz
    index = INDEX_FIXED_BYTES + n * (INDEX_ROW_BYTES + cfg.key_bytes + int(cfg.caption_bytes * CAPTION_COMPRESSION))
    parts = {"index": index, "meta": STATS_BYTES}
    if fmt == "wds":
        parts["tokens"] = n * _pad(NPY_HEADER + trow, TAR_BLOCK)
        parts["pooled"] = n * _pad(NPY_HEADER + prow, TAR_BLOCK)
        parts["outputs"] = n * _pad(outputs_bytes, TAR_BLOCK)
        members = n * 3 * TAR_BLOCK + 2 * TAR_BLOCK  # a header per member, two zero blocks at the end
        body = parts["tokens"] + parts["pooled"] + parts["outputs"] + members
        parts["container"] = _pad(body, TAR_RECORD) - (parts["tokens"] + parts["pooled"] + parts["outputs"])
        return parts, 3
    from astrea.shards import zarr_unit

    raw = codec == "raw"
    # raw arrays are stored as they are: exact; zstd: the given ratio, else uncompressed (an upper bound)
    ratio = 1.0 if raw or cfg.compression is None else cfg.compression
    # the writer's own layout (ZarrUnitWriter._open / _close): raw writes one row per inner chunk
    rows_chunk = 1 if raw else zarr_unit.chunk_rows(trow)
    rows_shard = rows_chunk * max(1, zarr_unit.SHARD_BYTES // (trow * rows_chunk))
    if raw:
        rows_shard = min(rows_shard, zarr_unit.MAX_RAW_SHARD_ROWS)
    shards = math.ceil(n / rows_shard)
    pchunk = max(1, min(zarr_unit.chunk_rows(prow * 64) * 64, n))
    parts["tokens"] = int(n * trow * ratio)
    parts["pooled"] = int(n * prow * ratio)
    parts["outputs"] = n * outputs_bytes  # zstd shrinks repetitive JSON; counted as is (upper bound)
    parts["container"] = ZARR_META_BYTES + n * cfg.key_bytes
    # each token shard file ends with its index: 16 bytes per chunk it could hold, + a crc32c
    parts["shard_index"] = shards * (4 + ZARR_SHARD_INDEX_BYTES * math.ceil(rows_shard / rows_chunk))
    # zarr.json x5 (group, tokens, pooled, keys, outputs) + token shard files + pooled chunks + keys + outputs
    files = 5 + shards + math.ceil(n / pchunk) + 2
    return parts, files + 2  # + index + stats
