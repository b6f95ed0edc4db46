"""A small real feature store for trainer tests, written with the store's own writer API.

Four experts on a 4x4 grid with the DEVELOPING.md output conventions. Each image has a class; every
expert's tokens carry it (a bump in one feature channel), and the caption, tags, boxes and mask name
it, so a few optimizer steps visibly lower the held-out loss.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from astrea.schemas import ExpertSpec
from astrea.train.targets import encode_rle

GRID = 4
DIMS = {"siglip": 24, "ram_plus": 16, "grounding_dino": 20, "sam2": 12}
WORDS = ["dog", "cat", "car", "tree", "house", "bird"]


def spec(name: str, *, seed: int = 0, grid: int = GRID, dim: int | None = None) -> ExpertSpec:
    d = dim or DIMS[name]
    return ExpertSpec(
        expert=name, arch=f"{name}.test", weights="random", weights_sha256="0" * 64, preprocessing={},
        grid=grid, token_dim=d, pooled_dim=d, seed=seed,
    )


def record(i: int, name: str, dim: int, grid: int = GRID) -> tuple[np.ndarray, np.ndarray, dict]:
    rng = np.random.default_rng([i, dim])
    cls = i % len(WORDS)
    t = rng.normal(size=(grid * grid, dim)).astype(np.float32)
    t[:, cls] += 3.0
    outputs: dict = {}
    box = [0.1 + 0.05 * cls, 0.2, 0.5 + 0.05 * cls, 0.6]
    if name == "ram_plus":
        outputs = {"tags": [WORDS[cls], "grass"], "scores": [0.9, 0.5]}
    elif name == "grounding_dino":
        outputs = {"boxes": [box], "labels": [WORDS[cls]], "scores": [0.8]}
    elif name == "sam2":
        m = np.zeros((16, 16), bool)
        m[3 : 9 + cls, 4:12] = True
        outputs = {"masks": [{"rle": encode_rle(m), "score": 0.9, "area": int(m.sum()), "box": box, "label": WORDS[cls]}]}
    return t, t.mean(0), outputs


def key(i: int) -> str:
    return f"img{i:05d}"


def caption(i: int) -> str:
    return f"a photo of a {WORDS[i % len(WORDS)]}"


def make_store(
    root: Path,
    *,
    dataset: str = "toy",
    experts: tuple[str, ...] = tuple(DIMS),
    units: int = 4,
    per_unit: int = 12,
    fmt: str = "zarr",
    seed: int = 0,
    fail_every: int = 0,
    labels: Callable[[int], dict | None] | None = None,
) -> Path:
    """Write ``units`` x ``per_unit`` images for each expert; ``fail_every`` > 0 records failures;
    ``labels(i)``: image i's dataset annotations (the rows' ``labels``)."""
    from astrea.shards import Store

    store = Store(root)
    for name in experts:
        s = spec(name, seed=seed)
        if fmt != "zarr":
            s = ExpertSpec(**{**s.__dict__, "format": fmt})
        edir = store.expert_dir(dataset, s, create=True)
        for u in range(units):
            w = edir.open_unit(f"{u:05d}")
            for j in range(per_unit):
                i = u * per_unit + j
                if fail_every and i % fail_every == 0 and name == "sam2":
                    w.add_failure(key(i), "undecodable: test", caption=caption(i))
                    continue
                t, p, out = record(i, name, DIMS[name])
                w.add(key(i), t, p, out, caption=caption(i), labels=labels(i) if labels else None)
            w.commit()
    return root
