"""Small specs and deterministic units for the store tests (also run as a writer subprocess)."""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from astrea.schemas import ExpertSpec
from astrea.shards import ExpertDir


def make_spec(expert: str = "siglip", fmt: str = "zarr", dtype: str = "float16", *, grid: int = 3,
              token_dim: int = 8, pooled_dim: int = 6, **kw: Any) -> ExpertSpec:
    return ExpertSpec(expert=expert, arch=f"{expert}.tiny", weights="random", weights_sha256="ab" * 32,
                      preprocessing={"resize": 32, "mean": [0.5, 0.5, 0.5]}, grid=grid, token_dim=token_dim,
                      pooled_dim=pooled_dim, dtype=dtype, format=fmt, **kw)


def features(key: str, spec: ExpertSpec) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Deterministic per key: smooth-ish float32 values, JSON outputs."""
    rng = np.random.default_rng(zlib.crc32(f"{spec.expert}/{key}".encode()))
    tokens = rng.normal(0, 2, (spec.num_tokens, spec.token_dim)).astype(np.float32)
    pooled = rng.normal(0, 1, spec.pooled_dim).astype(np.float32)
    return tokens, pooled, {"tags": [f"t{key}"], "scores": [round(float(pooled[0]), 4)]}


def keys_of(unit: str, n: int) -> list[str]:
    return [f"{unit}{i:04d}" for i in range(n)]


def write_unit(edir: ExpertDir, unit: str, n: int = 6, failed: tuple[str, ...] | set[str] = (),
               extra: dict | None = None) -> dict:
    with edir.open_unit(unit) as w:
        for key in keys_of(unit, n):
            if key in failed:
                w.add_failure(key, "undecodable: UnidentifiedImageError: test", caption=f"cap {key}")
                continue
            t, p, out = features(key, edir.spec)
            w.add(key, t, p, out, caption=f"cap {key}", labels={"k": key})
        return w.commit(extra=extra or {"seconds": 0.1})
