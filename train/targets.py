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
    if not isinstance(counts, list):
        raise ValueError("RLE counts are neither a string nor a list of ints")
    try:
        counts = np.asarray(counts, dtype=np.int64)
    except (TypeError, ValueError):
        raise ValueError("RLE counts are not all integers") from None
    if counts.ndim != 1 or (counts < 0).any():
        raise ValueError("RLE counts must be a flat list of non-negative ints")
    if int(counts.sum()) != h * w:
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, size says {h}x{w}")
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


def mask_polygon(mask: np.ndarray, points: int, *, resolution: int = 32) -> list[tuple[float, float]]:
    """Coarse outline of a mask: its convex hull, at most ``points`` (x, y) vertices, normalised 0..1.

    The mask is first reduced to at most ``resolution`` cells a side (a cell is on when any of its
    pixels is): the text only carries a handful of two-decimal vertices, so finer detail would be
    thrown away anyway, and a random-weight SAM2 mask's ragged edge costs nothing this way.
    """
    if not mask.any():
        return []
    h, w = mask.shape
    f = max(1, -(-max(h, w) // resolution))  # ceil
    hp, wp = -(-h // f) * f, -(-w // f) * f
    padded = np.zeros((hp, wp), dtype=bool)
    padded[:h, :w] = mask
    cells = padded.reshape(hp // f, f, wp // f, f).any(axis=(1, 3))
    # Only each row's outermost cells can be on the hull; take their corners in pixel units (so a
    # one-cell mask still gets an outline with area).
    rows = np.nonzero(cells.any(axis=1))[0]
    left = cells[rows].argmax(axis=1)
    right = cells.shape[1] - 1 - cells[rows, ::-1].argmax(axis=1)
    corners = set()
    for y, x0, x1 in zip(rows.tolist(), left.tolist(), right.tolist(), strict=True):
        for yy in (y * f, (y + 1) * f):
            corners.add((float(x0 * f), float(yy)))
            corners.add((float((x1 + 1) * f), float(yy)))
    hull = _convex_hull(sorted(corners))
    if len(hull) > points:
        hull = [hull[i] for i in np.linspace(0, len(hull) - 1, points).round().astype(int)]
    return [(min(x / w, 1.0), min(y / h, 1.0)) for x, y in hull]


def _convex_hull(pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Andrew's monotone chain on sorted points; counter-clockwise, no repeated point."""
    if len(pts) <= 2:
        return pts

    def cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple[float, float]] = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list[tuple[float, float]] = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return lower[:-1] + upper[:-1]


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


def _label(label: Any, max_chars: int = 40) -> str:
    """A short, single-line label: detector phrases can be long (and random-weight ones are noise)."""
    if not isinstance(label, str) or not label.strip():
        return "object"
    text = " ".join(label.split())
    return text if len(text) <= max_chars else text[:max_chars].rsplit(" ", 1)[0] or text[:max_chars]
