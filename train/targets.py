"""Stage targets as text, built from what the store holds for each image.

- caption: the dataset's caption (unit parquet ``caption``);
- tags: ram_plus ``outputs["tags"]`` (already sorted by score);
- boxes: grounding_dino ``outputs["boxes"]`` (normalised x1,y1,x2,y2) + ``labels``, as
  ``label [x1,y1,x2,y2]`` with fixed decimals;
- masks: sam2 ``outputs["masks"]`` (COCO RLE), each decoded and reduced to a coarse polygon
  ``label (x,y x,y ...)`` in normalised coordinates.

Malformed expert outputs never crash a run: the offending object is dropped and counted in
``TargetStats`` (reported in the run's metrics).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

NONE = "none"


@dataclass
class TargetOptions:
    max_objects: int = 8
    max_tags: int = 12
    decimals: int = 2
    polygon_points: int = 8


@dataclass
class TargetStats:
    """Counts of expert outputs that could not be rendered, by reason."""

    dropped: Counter = field(default_factory=Counter)

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1


def caption_text(caption: Any) -> str | None:
    if not isinstance(caption, str) or not caption.strip():
        return None
    return " ".join(caption.split())


def tags_text(outputs: dict[str, Any], opts: TargetOptions, stats: TargetStats) -> str:
    tags = outputs.get("tags")
    if not isinstance(tags, list):
        stats.drop("tags: missing 'tags' list")
        return NONE
    clean = [str(t).strip() for t in tags if isinstance(t, str) and t.strip()]
    return ", ".join(clean[: opts.max_tags]) or NONE


def boxes_text(outputs: dict[str, Any], opts: TargetOptions, stats: TargetStats) -> str:
    boxes, labels = outputs.get("boxes"), outputs.get("labels")
    if not isinstance(boxes, list) or not isinstance(labels, list) or len(boxes) != len(labels):
        stats.drop("boxes: 'boxes' and 'labels' missing or of different lengths")
        return NONE
    parts = []
    for box, label in zip(boxes, labels, strict=True):
        b = _box(box)
        if b is None:
            stats.drop("boxes: box not 4 finite numbers")
            continue
        parts.append(f"{_label(label)} {_fmt_box(b, opts.decimals)}")
        if len(parts) == opts.max_objects:
            break
    return "; ".join(parts) or NONE


def masks_text(outputs: dict[str, Any], opts: TargetOptions, stats: TargetStats) -> str:
    masks = outputs.get("masks")
    if not isinstance(masks, list):
        stats.drop("masks: missing 'masks' list")
        return NONE
    parts = []
    for m in masks:
        if not isinstance(m, dict) or not isinstance(m.get("rle"), dict):
            stats.drop("masks: entry without 'rle'")
            continue
        try:
            mask = decode_rle(m["rle"])
        except ValueError:
            stats.drop("masks: undecodable RLE")
            continue
        poly = mask_polygon(mask, opts.polygon_points)
        if not poly:
            stats.drop("masks: empty mask")
            continue
        pts = " ".join(f"{x:.{opts.decimals}f},{y:.{opts.decimals}f}" for x, y in poly)
        parts.append(f"{_label(m.get('label'))} ({pts})")
        if len(parts) == opts.max_objects:
            break
    return "; ".join(parts) or NONE


# -- COCO RLE ---------------------------------------------------------------------------------------
def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """COCO RLE (``{"size": [h, w], "counts": str | list[int]}``) -> bool mask [h, w].

    Counts alternate background/foreground runs starting with background, over the mask in column-major
    order; the string form is pycocotools' compressed encoding (5 bits per char, offset 48, with
    counts after the second stored as a delta to the count two before).
    """
    try:
        h, w = (int(v) for v in rle["size"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("RLE without a valid 'size' [h, w]") from None
    counts = rle.get("counts")
    if isinstance(counts, str | bytes):
        counts = _counts_from_string(counts.decode() if isinstance(counts, bytes) else counts)
    if not isinstance(counts, list) or any(not isinstance(c, int | np.integer) or c < 0 for c in counts):
        raise ValueError("RLE counts are neither a string nor a list of non-negative ints")
    if sum(counts) != h * w:
        raise ValueError(f"RLE counts sum to {sum(counts)}, size says {h}x{w}")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True  # runs alternate, background first
    return np.repeat(values, counts).reshape(w, h).T


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """bool mask [h, w] -> COCO compressed RLE (the inverse of :func:`decode_rle`)."""
    h, w = mask.shape
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)
    counts, val, run = [], False, 0
    for v in flat:
        if v == val:
            run += 1
        else:
            counts.append(run)
            val, run = v, 1
    counts.append(run)
    return {"size": [h, w], "counts": _counts_to_string(counts)}


def _counts_from_string(s: str) -> list[int]:
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s):
                raise ValueError("truncated RLE string")
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def _counts_to_string(counts: list[int]) -> str:
    out = []
    for i, c in enumerate(counts):
        x = c - counts[i - 2] if i > 2 else c
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5
            more = not ((x == 0 and not ch & 0x10) or (x == -1 and ch & 0x10))
            if more:
                ch |= 0x20
            out.append(chr(ch + 48))
    return "".join(out)


def mask_polygon(mask: np.ndarray, points: int) -> list[tuple[float, float]]:
    """Coarse outline of the largest region: at most ``points`` (x, y) vertices, normalised to 0..1."""
    from skimage.measure import approximate_polygon, find_contours

    if not mask.any():
        return []
    h, w = mask.shape
    padded = np.pad(mask.astype(np.float32), 1)  # closes contours that touch the border
    contours = find_contours(padded, 0.5)
    if not contours:
        return []
    c = max(contours, key=len) - 1.0
    c = approximate_polygon(c, tolerance=max(h, w) / 50.0)
    if len(c) > 1 and np.allclose(c[0], c[-1]):
        c = c[:-1]  # closed ring: drop the repeated first point
    if len(c) > points:
        c = c[np.linspace(0, len(c) - 1, points).round().astype(int)]
    return [(float(np.clip(x / max(w - 1, 1), 0, 1)), float(np.clip(y / max(h - 1, 1), 0, 1))) for y, x in c]


def _box(box: Any) -> list[float] | None:
    if not isinstance(box, list | tuple) or len(box) != 4:
        return None
    try:
        b = [float(v) for v in box]
    except (TypeError, ValueError):
        return None
    if not all(np.isfinite(b)):
        return None
    return [min(max(v, 0.0), 1.0) for v in b]


def _fmt_box(b: list[float], decimals: int) -> str:
    return "[" + ",".join(f"{v:.{decimals}f}" for v in b) + "]"


def _label(label: Any) -> str:
    if not isinstance(label, str) or not label.strip():
        return "object"
    return " ".join(label.split())
