"""Stage targets as text, built from what the store holds for each image.

- caption: the dataset's caption (unit parquet ``caption``);
- tags: ram_plus ``outputs["tags"]`` (already sorted by score);
- boxes: grounding_dino ``outputs["boxes"]`` (normalised x1,y1,x2,y2) + ``labels``;
- masks: sam2 ``outputs["masks"]`` (COCO RLE), each decoded and reduced to a short code;
- or, for tags / boxes / masks with ``target_sources.<task>: dataset``, the dataset's own annotations
  (:func:`dataset_outputs`: COCO's boxes and masks, the sample's drawn objects), same text.

Two text formats (``dataset.target_format``):

- ``compact`` (default): every coordinate is quantised to an integer bin ``round(v * 99)`` in 0..99
  (decoded as ``q / 99``, error <= 0.5/99 of the side). A box is ``label [x1,y1,x2,y2]``; a mask is
  ``label [x1,y1,x2,y2] CODE``: the mask's own tight box, then a ``g x g`` occupancy grid over that box
  (``dataset.mask_grid``, default 4), one hex word of ``ceil(g/4)`` digits per row, top row first, the
  leftmost cell in the highest bit; a cell is on when at least half of it is mask. ``red circle
  [13,13,37,37] 6ff6`` is a 4x4 disc. 4x4 codes cost 19 bytes + label per mask against ~60 for the
  decimal polygon, and decode (:func:`parse_masks`) closer to the true mask than that polygon: IoU
  >= 0.74 on the sample dataset's circles, squares and triangles (numbers in docs/train.md).
- ``decimal`` (before issue 13): boxes with ``decimals`` decimals, masks as the convex hull of the mask
  on a <= 32-cell grid, <= ``polygon_points`` vertices, ``label (x,y x,y ...)``.

:func:`parse_boxes` and :func:`parse_masks` read both formats back (eval's decoding). Each task's
content is a list of items (tags, objects), so a target too long for ``dataset.max_text_tokens`` can
drop whole items instead of being cut mid-line (``templates.Rendered.fit``).

Malformed expert outputs never crash a run: the offending object is dropped and counted in
``TargetStats`` (reported in the run's metrics).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# The stored masks' codec (one, shared with the sam2 expert that writes them), under the names the
# targets' callers use (encode_rle is re-exported for them: train/worlds.py, tests, benchmarks).
from astrea.schemas.mask_rle import decode as decode_rle
from astrea.schemas.mask_rle import encode as encode_rle  # noqa: F401

NONE = "none"
TARGET_FORMATS = ("compact", "decimal")
QUANT = 99  # compact coordinates: integer bins 0..QUANT


@dataclass
class TargetOptions:
    max_objects: int = 8
    max_tags: int = 12
    decimals: int = 2
    polygon_points: int = 8
    format: str = "compact"  # compact | decimal (see the module docstring)
    mask_grid: int = 4  # compact masks: g x g occupancy cells inside the mask's box


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
    return ", ".join(tags_items(outputs, opts, stats)) or NONE


def boxes_text(outputs: dict[str, Any], opts: TargetOptions, stats: TargetStats) -> str:
    return "; ".join(boxes_items(outputs, opts, stats)) or NONE


def masks_text(outputs: dict[str, Any], opts: TargetOptions, stats: TargetStats) -> str:
    return "; ".join(masks_items(outputs, opts, stats)) or NONE


def tags_items(outputs: dict[str, Any], opts: TargetOptions, stats: TargetStats) -> list[str]:
    """Tags as they appear in the text, highest score first (empty: ``none``)."""
    tags = outputs.get("tags")
    if not isinstance(tags, list):
        stats.drop("tags: missing 'tags' list")
        return []
    clean = [" ".join(t.replace(",", " ").split()) for t in tags if isinstance(t, str) and t.strip()]
    return [t for t in clean if t][: opts.max_tags]


def boxes_items(outputs: dict[str, Any], opts: TargetOptions, stats: TargetStats) -> list[str]:
    """One ``label [x1,y1,x2,y2]`` per detection, in the detector's order (highest score first)."""
    boxes, labels = outputs.get("boxes"), outputs.get("labels")
    if not isinstance(boxes, list) or not isinstance(labels, list) or len(boxes) != len(labels):
        stats.drop("boxes: 'boxes' and 'labels' missing or of different lengths")
        return []
    parts = []
    for box, label in zip(boxes, labels, strict=True):
        b = _box(box)
        if b is None:
            stats.drop("boxes: box not 4 finite numbers")
            continue
        parts.append(f"{_label(label)} {_fmt_box(b, opts)}")
        if len(parts) == opts.max_objects:
            break
    return parts


def masks_items(outputs: dict[str, Any], opts: TargetOptions, stats: TargetStats) -> list[str]:
    """One mask per object: ``label [box] CODE`` (compact) or ``label (x,y ...)`` (decimal)."""
    masks = outputs.get("masks")
    if not isinstance(masks, list):
        stats.drop("masks: missing 'masks' list")
        return []
    parts = []
    for m in masks:
        if isinstance(m, dict) and isinstance(m.get("mask"), np.ndarray):  # dataset polygons, rasterised
            mask = m["mask"]
        elif not isinstance(m, dict) or not isinstance(m.get("rle"), dict):
            stats.drop("masks: entry without 'rle'")
            continue
        else:
            try:
                mask = decode_rle(m["rle"])
            except ValueError:
                stats.drop("masks: undecodable RLE")
                continue
        if not mask.any():
            stats.drop("masks: empty mask")
            continue
        if opts.format == "compact":
            parts.append(f"{_label(m.get('label'))} {mask_code(mask, opts.mask_grid)}")
        else:
            poly = mask_polygon(mask, opts.polygon_points)
            pts = " ".join(f"{x:.{opts.decimals}f},{y:.{opts.decimals}f}" for x, y in poly)
            parts.append(f"{_label(m.get('label'))} ({pts})")
        if len(parts) == opts.max_objects:
            break
    return parts


def dataset_outputs(labels: Any, task: str, stats: TargetStats) -> dict[str, Any] | None:
    """The dataset's own annotations (a store row's ``labels``) as the ``outputs`` an expert would have
    stored for ``task`` (``target_sources.<task>: dataset``); None when the row has none for the task
    (its line is left out, as for a missing caption, and counted).

    Layouts read: astrea's sample and webdataset ``labels`` (``tags``, ``classes``, ``boxes``
    normalised x1,y1,x2,y2, ``masks`` as ``{"rle", "label"}``) and the COCO reader's (``classes``,
    ``boxes``, ``masks`` as each annotation's ``segmentation``: pixel polygons or RLE, with the image's
    ``width`` / ``height``). Objects keep the dataset's order.
    """
    lab = labels if isinstance(labels, dict) else {}
    classes = lab.get("classes") if isinstance(lab.get("classes"), list) else []
    if task == "tags":
        tags = lab.get("tags") or classes
        if not isinstance(tags, list) or not tags:
            return _no_labels(stats, task, "tags or classes")
        return {"tags": list(dict.fromkeys(t for t in tags if isinstance(t, str)))}
    if task == "boxes":
        boxes = lab.get("boxes")
        if not isinstance(boxes, list):
            return _no_labels(stats, task, "boxes")
        names = [classes[i] if i < len(classes) else None for i in range(len(boxes))]
        return {"boxes": [b if b is not None else [] for b in boxes], "labels": names}
    masks = lab.get("masks")
    if not isinstance(masks, list):
        return _no_labels(stats, task, "masks")
    out = []
    for i, m in enumerate(masks):
        label = m.get("label") if isinstance(m, dict) and "rle" in m else (classes[i] if i < len(classes) else None)
        entry = _dataset_mask(m, lab.get("height"), lab.get("width"))
        if entry is None:
            stats.drop("masks: dataset segmentation neither RLE nor polygons with the image size")
            continue
        out.append({**entry, "label": label})
    return {"masks": out}


def _no_labels(stats: TargetStats, task: str, what: str) -> None:
    stats.drop(f"{task}: row without dataset {what} (line left out)")
    return None


def _dataset_mask(m: Any, height: Any, width: Any) -> dict[str, Any] | None:
    """One dataset mask as ``{"rle": ...}`` (astrea's layout, or a COCO RLE dict) or, for COCO pixel
    polygons, ``{"mask": bool array}``, rasterised once here rather than encoded and decoded again."""
    if isinstance(m, dict) and isinstance(m.get("rle"), dict):
        return {"rle": m["rle"]}
    if isinstance(m, dict) and "counts" in m and "size" in m:
        return {"rle": m}
    if not isinstance(m, list) or not all(isinstance(v, int | float) and v > 0 for v in (height, width)):
        return None
    h, w = int(height), int(width)
    mask = np.zeros((h, w), dtype=bool)
    for poly in m:
        if isinstance(poly, list) and len(poly) >= 6 and all(isinstance(v, int | float) for v in poly):
            mask |= _raster_polygon([(poly[j] / w, poly[j + 1] / h) for j in range(0, len(poly) - 1, 2)], (h, w))
    return {"mask": mask}


# -- compact codes and their decoding ---------------------------------------------------------------
def quantise(v: float) -> int:
    return int(round(min(max(float(v), 0.0), 1.0) * QUANT))


def mask_code(mask: np.ndarray, grid: int = 4) -> str:
    """``[x1,y1,x2,y2] CODE`` of a non-empty bool mask [h, w]: its tight box (0..99 bins), then the
    ``grid x grid`` occupancy of that box as hex words, one per row (see the module docstring)."""
    h, w = mask.shape
    # the tight box from the rows and columns that hold any pixel: ~10x cheaper than np.nonzero on a
    # full-resolution mask, and this runs for every mask of every target rendered
    ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    y1, y2, x1, x2 = int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1
    box = [quantise(x1 / w), quantise(y1 / h), quantise(x2 / w), quantise(y2 / h)]
    cells = _occupancy(mask[y1:y2, x1:x2], grid)
    return "[" + ",".join(str(q) for q in box) + "] " + _cells_hex(cells)


def _occupancy(crop: np.ndarray, grid: int, sub: int = 8) -> np.ndarray:
    """Fraction of each of ``grid x grid`` cells covered, sampled ``sub x sub`` points per cell (so
    boxes smaller than the grid, in pixels, still get every cell)."""
    h, w = crop.shape
    n = grid * sub
    yi = ((np.arange(n) + 0.5) * h / n).astype(int)
    xi = ((np.arange(n) + 0.5) * w / n).astype(int)
    frac = crop[yi][:, xi].reshape(grid, sub, grid, sub).mean(axis=(1, 3))
    return frac >= 0.5


def _cells_hex(cells: np.ndarray) -> str:
    g = cells.shape[1]
    digits = -(-g // 4)
    words = []
    for row in cells:
        v = 0
        for bit in row:
            v = (v << 1) | int(bit)
        words.append(format(v << (digits * 4 - g), f"0{digits}x"))
    return "".join(words)


def decode_mask_code(box: list[float], code: str, size: tuple[int, int]) -> np.ndarray:
    """bool mask [h, w] of a compact mask: ``box`` normalised x1,y1,x2,y2, ``code`` its hex grid."""
    h, w = size
    n = len(code)
    g = next((g for g in range(1, 65) if g * -(-g // 4) == n), None)
    if g is None or not re.fullmatch(r"[0-9a-f]*", code):
        raise ValueError(f"mask code {code!r} is not a square grid of hex words")
    digits = -(-g // 4)
    cells = np.zeros((g, g), dtype=bool)
    for r in range(g):
        v = int(code[r * digits : (r + 1) * digits], 16) >> (digits * 4 - g)
        cells[r] = [(v >> (g - 1 - c)) & 1 for c in range(g)]
    x1, y1, x2, y2 = box[0] * w, box[1] * h, box[2] * w, box[3] * h
    out = np.zeros((h, w), dtype=bool)
    if x2 <= x1 or y2 <= y1:
        return out
    yy, xx = np.mgrid[0:h, 0:w] + 0.5  # pixel centres
    inside = (xx >= x1) & (xx < x2) & (yy >= y1) & (yy < y2)
    ci = np.clip(((yy - y1) / (y2 - y1) * g).astype(int), 0, g - 1)
    cj = np.clip(((xx - x1) / (x2 - x1) * g).astype(int), 0, g - 1)
    return inside & cells[ci, cj]


_NUM = r"-?\d+(?:\.\d+)?"
_BOX_RE = re.compile(rf"^(?P<label>.*?)\s*\[(?P<box>{_NUM}(?:,{_NUM}){{3}})\](?:\s+(?P<code>[0-9a-f]+))?$")
_POLY_RE = re.compile(r"^(?P<label>.*?)\s*\((?P<pts>[^()]*)\)$")


def _coord(v: str) -> float:
    """A number of either format: with a point it is a fraction (decimal), without one a 0..99 bin."""
    return float(v) if "." in v else int(v) / QUANT


def _items_of(line: str, task: str) -> list[str]:
    text = line.strip()
    if text.startswith(f"{task}:"):
        text = text[len(task) + 1 :]
    text = text.strip()
    return [] if text in ("", NONE) else [p.strip() for p in text.split(";") if p.strip()]


def parse_boxes(line: str) -> list[tuple[str, list[float]]]:
    """``boxes: ...`` (or just its content) -> [(label, [x1,y1,x2,y2] normalised)]; unreadable items
    are skipped (generated text may be malformed)."""
    out = []
    for item in _items_of(line, "boxes"):
        m = _BOX_RE.match(item)
        if m:
            out.append((m["label"] or "object", [_coord(v) for v in m["box"].split(",")]))
    return out


def parse_masks(line: str, size: tuple[int, int]) -> list[tuple[str, np.ndarray]]:
    """``masks: ...`` (or its content) -> [(label, bool mask [h, w])], compact codes or decimal
    polygons; unreadable items are skipped."""
    out = []
    for item in _items_of(line, "masks"):
        m = _BOX_RE.match(item)
        if m and m["code"]:
            try:
                out.append((m["label"] or "object", decode_mask_code([_coord(v) for v in m["box"].split(",")], m["code"], size)))
            except ValueError:
                continue
            continue
        m = _POLY_RE.match(item)
        if m:
            try:
                pts = [tuple(_coord(c) for c in p.split(",")) for p in m["pts"].split()]
            except ValueError:
                continue
            if all(len(p) == 2 for p in pts) and len(pts) >= 3:
                out.append((m["label"] or "object", _raster_polygon(pts, size)))
    return out


def _raster_polygon(pts: list[tuple[float, ...]], size: tuple[int, int]) -> np.ndarray:
    from PIL import Image, ImageDraw

    h, w = size
    img = Image.new("L", (w, h), 0)
    ImageDraw.Draw(img).polygon([(x * w, y * h) for x, y in pts], fill=1)
    return np.asarray(img) > 0


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


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


_DELIMS = str.maketrans({c: " " for c in ";[]()"})


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


def _fmt_box(b: list[float], opts: TargetOptions) -> str:
    if opts.format == "compact":
        return "[" + ",".join(str(quantise(v)) for v in b) + "]"
    return "[" + ",".join(f"{v:.{opts.decimals}f}" for v in b) + "]"


def _label(label: Any, max_chars: int = 40) -> str:
    """A short, single-line label: detector phrases can be long (and random-weight ones are noise).
    The characters that delimit items and coordinates (``; [ ] ( )``) become spaces."""
    if not isinstance(label, str) or not label.strip():
        return "object"
    text = " ".join(label.translate(_DELIMS).split())
    if not text:
        return "object"
    return text if len(text) <= max_chars else text[:max_chars].rsplit(" ", 1)[0] or text[:max_chars]
