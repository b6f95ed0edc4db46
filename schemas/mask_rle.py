"""COCO run-length encoding of binary masks, compressed string form (pycocotools-compatible).

The one codec of the masks astrea stores (sam2's ``outputs["masks"][i]["rle"]``): the sam2 expert
and the sample dataset write it, the trainer's targets read it. Here, in the lowest layer, so that
every side imports it without importing the others.

Written here rather than depending on pycocotools (a C extension that often fails to build): the
format is small. Masks are flattened column-major (Fortran order, as COCO does); counts alternate
runs of 0s and 1s starting with 0s; the string packs each count (delta to the count two back, from
the fourth on) in 5-bit groups offset by 48, as ``maskApi.c`` ``rleToString`` does.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def mask_to_counts(mask: np.ndarray) -> list[int]:
    """Binary [H, W] mask -> uncompressed COCO counts."""
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    if flat.size == 0:
        return []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(edges).tolist()
    return ([0] + counts) if flat[0] else counts


def counts_to_string(counts: list[int]) -> str:
    out = []
    for i, c in enumerate(counts):
        x = int(c) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5  # arithmetic shift: negative deltas keep their sign bits
            more = (x != -1) if (ch & 0x10) else (x != 0)
            if more:
                ch |= 0x20
            out.append(chr(ch + 48))
    return "".join(out)


def string_to_counts(s: str) -> list[int]:
    counts: list[int] = []
    p = 0
    while p < len(s):
        x = 0
        k = 0
        more = True
        while more:
            if p >= len(s):
                raise ValueError("truncated COCO RLE string")
            ch = ord(s[p]) - 48
            x |= (ch & 0x1F) << (5 * k)
            more = bool(ch & 0x20)
            p += 1
            k += 1
            if not more and (ch & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def encode(mask: np.ndarray) -> dict[str, Any]:
    """Binary [H, W] mask -> ``{"size": [H, W], "counts": str}`` (COCO compressed RLE)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D [H, W], got shape {mask.shape}")
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts_to_string(mask_to_counts(mask))}


def _counts(rle: dict[str, Any]) -> list[int]:
    counts = rle.get("counts") if isinstance(rle, dict) else None
    if isinstance(counts, (bytes, str)):
        return string_to_counts(counts.decode() if isinstance(counts, bytes) else counts)
    if not isinstance(counts, list):
        raise ValueError("RLE counts are neither a string nor a list of ints")
    try:
        arr = np.asarray(counts, dtype=np.int64)
    except (TypeError, ValueError):
        raise ValueError("RLE counts are not all integers") from None
    if arr.ndim != 1 or (arr < 0).any():
        raise ValueError("RLE counts must be a flat list of non-negative ints")
    return arr.tolist()


def decode(rle: dict[str, Any]) -> np.ndarray:
    """COCO RLE (compressed string or uncompressed list counts) -> bool [H, W] mask.

    Stored data is read, so anything malformed (no size, counts that are not non-negative ints or do
    not cover the mask) is a ``ValueError`` naming what is wrong, never a mask of another shape."""
    try:
        h, w = (int(v) for v in rle["size"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("RLE without a valid 'size' [h, w]") from None
    counts = _counts(rle)
    if any(c < 0 for c in counts):
        raise ValueError("RLE counts must be non-negative")
    if sum(counts) != h * w:
        raise ValueError(f"RLE counts sum to {sum(counts)}, expected {h}x{w}={h * w}")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True  # runs alternate, background first
    flat = np.repeat(values, counts)
    return flat.reshape((w, h)).T.copy()


def area(rle: dict[str, Any]) -> int:
    """Foreground pixels of a COCO RLE, without decoding it."""
    return int(sum(_counts(rle)[1::2]))
