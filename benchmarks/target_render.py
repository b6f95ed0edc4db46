"""Cost of rendering one stage target with masks, per sample, for the mask layouts the trainer reads.

Every training step renders its batch's targets again (the collator; the prefetch thread hides it only
while it is cheaper than a step), so the per-mask work (RLE decode or polygon rasterising, then the
compact code) is on the data path. Prints ms per sample for 7 objects on a 640x480 image as:
  rle        COCO compressed RLE, as the sam2 expert stores and the sample's labels hold
  polygons   COCO pixel polygons (``target_sources.masks: dataset`` on a COCO store)
and, in the same run, the same masks' tight box found with ``np.nonzero`` (the code before) against
``any`` per row and column (``mask_code`` now), as a ratio.

    .venv/bin/python benchmarks/target_render.py
"""

from __future__ import annotations

import time

import numpy as np


def _polygon(rng: np.random.Generator) -> list[list[float]]:
    cx, cy, r = rng.uniform(100, 540), rng.uniform(100, 380), rng.uniform(20, 90)
    a = np.linspace(0, 2 * np.pi, 20, endpoint=False)
    return [[float(v) for xy in zip(cx + r * np.cos(a), cy + r * np.sin(a), strict=True) for v in xy]]


def _per_sample(fn, n: int = 200) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e3


def main() -> None:
    from astrea.train.targets import TargetOptions, TargetStats, dataset_outputs, encode_rle
    from astrea.train.templates import render

    rng = np.random.default_rng(0)
    polys = [_polygon(rng) for _ in range(7)]
    lab = {"width": 640, "height": 480, "classes": [f"object {i}" for i in range(7)], "masks": polys}
    masks = [m["mask"] for m in dataset_outputs(lab, "masks", TargetStats())["masks"]]
    rle = {"classes": lab["classes"], "masks": [{"rle": encode_rle(m), "label": c} for m, c in zip(masks, lab["classes"], strict=True)]}
    src = {"tags": "ram_plus", "boxes": "dataset", "masks": "dataset"}
    print("| masks (7 per 640x480 image) | ms per sample |")
    print("|---|---:|")
    for name, labels in (("rle", rle), ("polygons", lab)):
        ms = _per_sample(lambda labels=labels: render({"labels": labels}, ["masks"], src, TargetOptions(), TargetStats()))
        print(f"| {name} | {ms:.2f} |")

    def by_nonzero():
        for m in masks:
            ys, xs = np.nonzero(m)
            (ys.min(), ys.max(), xs.min(), xs.max())

    def by_any():
        for m in masks:
            ys, xs = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
            (ys[0], ys[-1], xs[0], xs[-1])

    old, new = _per_sample(by_nonzero), _per_sample(by_any)
    print(f"\ntight boxes of the 7 masks: np.nonzero {old:.3f} ms, any per row/column {new:.3f} ms "
          f"(nonzero / any = {old / new:.1f}x)")


if __name__ == "__main__":
    main()
