"""Blocks every expert shares: safe image decoding and resampling token maps to the common grid."""

from __future__ import annotations

import io
import warnings

import numpy as np

from astrea.extract.experts.base import BadImageError

# Decompression-bomb limit: an image above this many pixels is refused per key instead of
# exhausting a worker's memory (PIL's own default warns at 89M and errors at 179M).
MAX_PIXELS = 64_000_000
MIN_SIDE = 2
MAX_ASPECT = 50.0


def decode_image(data: bytes | None, *, max_pixels: int = MAX_PIXELS):
    """Bytes -> RGB ``PIL.Image``, or :class:`BadImageError` with a short, stable reason.

    Converts grayscale, palette, CMYK, 16-bit and alpha images to 8-bit RGB (alpha composited on
    white, as a viewer would show it) and refuses empty, truncated, tiny, extreme-aspect and huge ones.
    """
    from PIL import Image, ImageFile

    if data is None:
        raise BadImageError("missing image")
    if len(data) == 0:
        raise BadImageError("empty file")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise BadImageError(f"too large: {w}x{h} pixels > limit {max_pixels}")
            img.load()
    except BadImageError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise BadImageError("too large: decompression bomb limit") from None
    except Exception as e:  # PIL raises many types for corrupt data
        from astrea.schemas.unit import stable_reason

        raise BadImageError(f"undecodable: {type(e).__name__}: {stable_reason(str(e))[:120]}") from None
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        raise BadImageError(f"too small: {w}x{h}")
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise BadImageError(f"extreme aspect ratio: {w}x{h}")
    return to_rgb(img)


# Images above this many pixels are converted to RGB in horizontal strips of about this size: the same
# pixels (every step is per pixel, and the 16-bit / float scaling uses the whole image's range), but the
# temporaries of one strip instead of several full-size copies (an RGBA or 16-bit image near MAX_PIXELS
# cost 1-1.6 GB here, benchmarks/decode_memory.py).
STRIP_PIXELS = 4_000_000


def to_rgb(img):
    """Any PIL mode -> 8-bit RGB (16-bit and float scaled by the image's range, alpha on white)."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    w, h = img.size
    if w * h <= STRIP_PIXELS:
        return _to_rgb(img, _value_range(img))
    rng = _value_range(img)
    rows = max(1, STRIP_PIXELS // w)
    out = Image.new("RGB", (w, h))
    for top in range(0, h, rows):
        out.paste(_to_rgb(img.crop((0, top, w, min(h, top + rows))), rng), (0, top))
    return out


def _value_range(img) -> tuple[float, float] | None:
    """(lo, hi) that 16-bit / 32-bit / float pixels are scaled by, from the whole image; None for other modes.
    Computed strip by strip (a float64 copy of a 64M-pixel image is 512 MB); max and min are exact."""
    if img.mode not in ("I;16", "I;16B", "I;16L", "I", "F"):
        return None
    w, h = img.size
    rows = max(1, STRIP_PIXELS // max(w, 1))
    lo, hi = np.inf, -np.inf
    for top in range(0, h, rows):
        arr = np.asarray(img.crop((0, top, w, min(h, top + rows))), dtype=np.float64)
        if img.mode == "F":
            arr = np.nan_to_num(arr)
        if arr.size:
            lo, hi = min(lo, float(arr.min())), max(hi, float(arr.max()))
    if img.mode == "F":
        return (lo, hi) if np.isfinite(lo) else (0.0, 0.0)
    return 0.0, (hi if np.isfinite(hi) and hi > 0 else 1.0)


def _to_rgb(img, rng: tuple[float, float] | None):
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray((arr / rng[1] * 255.0).round().astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        lo, hi = rng
        img = Image.fromarray(((arr - lo) / ((hi - lo) or 1.0) * 255.0).round().astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return img.convert("RGB")


def resample_grid(tokens, h: int, w: int, grid: int):
    """Token map [B, h*w, D] (row-major) -> [B, grid*grid, D].

    Area-averaging when shrinking (no aliasing: each output token summarises the patch it covers,
    like LLaVA-style pooling), bilinear when growing. Identity when the map already is grid x grid.
    """
    import torch.nn.functional as F

    b, n, d = tokens.shape
    if n != h * w:
        raise ValueError(f"token map has {n} tokens, expected {h}x{w}={h * w}")
    if h == grid and w == grid:
        return tokens
    x = tokens.transpose(1, 2).reshape(b, d, h, w)
    if h >= grid and w >= grid:
        x = F.adaptive_avg_pool2d(x.float(), grid)
    else:
        x = F.interpolate(x.float(), size=(grid, grid), mode="bilinear", align_corners=False)
    return x.to(tokens.dtype).flatten(2).transpose(1, 2).contiguous()


def map_features(embed, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """A [B, D, H, W] feature map -> (tokens [B, grid*grid, D], pooled [B, D]) as float32 numpy: the
    tokens resampled to the common grid, pooled = the spatial mean (the SAM-family experts)."""
    b, d, h, w = embed.shape
    tokens = resample_grid(embed.float().flatten(2).transpose(1, 2), h, w, grid)
    pooled = embed.float().mean(dim=(2, 3))
    return (tokens.cpu().numpy().astype(np.float32, copy=False),
            pooled.cpu().numpy().astype(np.float32, copy=False))


def storage_error(x, dtype: str) -> dict[str, float]:
    """What storing float32 features as ``dtype`` costs: round-trip ``x -> dtype -> float32``.

    Returns ``max_abs`` (largest absolute error), ``max_rel`` (largest error relative to the element,
    over elements whose magnitude is in the format's normal range, where the bound is 2**-11 for
    float16 and 2**-8 for bfloat16), ``rel_to_max`` (``max_abs / max|x|``) and ``nonfinite`` (elements
    that overflow to inf/nan, e.g. |x| > 65504 in float16). The extraction job records these per unit.
    """
    if dtype not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"dtype={dtype!r} is not a storage dtype (float16 | bfloat16 | float32)")
    a = np.ascontiguousarray(np.asarray(x, dtype=np.float32)).ravel()
    if dtype == "float32" or a.size == 0:
        return {"max_abs": 0.0, "max_rel": 0.0, "rel_to_max": 0.0, "nonfinite": 0}
    from astrea.shards.dtypes import from_storage, to_storage

    with np.errstate(over="ignore", invalid="ignore"):
        b = from_storage(to_storage(a, dtype), dtype).astype(np.float32)
        total = np.sum(b, dtype=np.float64)
    if not np.isfinite(total):  # a float64 sum of float32 values is finite iff every element is
        return _storage_error_nonfinite(a, b, dtype)
    # Everything finite (the extraction job's case: it checks before it asks): in-place numpy passes,
    # ~4x faster than the masked form below on a 576x1152 token map.
    err = np.subtract(a, b, out=b)
    np.abs(err, out=err)
    mag = np.abs(a)
    max_abs, amax = float(err.max()), float(mag.max())
    normal = mag >= _TINY[dtype]
    rel = np.divide(err, mag, out=np.zeros_like(err), where=normal)
    return {"max_abs": max_abs, "max_rel": float(rel.max()), "rel_to_max": max_abs / amax if amax > 0 else 0.0,
            "nonfinite": 0}


_TINY = {"float16": float(np.finfo(np.float16).tiny), "bfloat16": float(np.finfo(np.float32).tiny)}


def _storage_error_nonfinite(a: np.ndarray, b: np.ndarray, dtype: str) -> dict[str, float]:
    finite = np.isfinite(b)
    nonfinite = int(np.count_nonzero(~finite & np.isfinite(a)))
    err = np.abs(a[finite] - b[finite])
    mag = np.abs(a[finite])
    normal = mag >= _TINY[dtype]
    amax = float(np.abs(a).max())
    max_abs = float(err.max()) if err.size else 0.0
    return {
        "max_abs": max_abs,
        "max_rel": float((err[normal] / mag[normal]).max()) if normal.any() else 0.0,
        "rel_to_max": max_abs / amax if amax > 0 else 0.0,
        "nonfinite": nonfinite,
    }


def ensure_rgb(image):
    """An already-decoded PIL image -> RGB, or a per-key :class:`BadImageError` (mode PIL cannot convert)."""
    try:
        return to_rgb(image)
    except Exception as e:
        raise BadImageError(f"cannot convert to RGB: {type(e).__name__}: {e}") from None
