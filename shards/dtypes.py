"""Storage dtypes. numpy has no bfloat16, so bfloat16 is stored as its raw 16-bit patterns (uint16).

bfloat16 is the top half of an IEEE float32, so conversion needs no library:
``stored = round_to_nearest_even(f32.view(uint32) >> 16)`` and back ``(stored.astype(uint32) << 16).view(float32)``
(exact). Readers give back the storage dtype for float16/float32 and float32 for bfloat16, int8, float8_e4m3.

int8 is symmetric per-row quantisation with the row's scale stored in the same row: a ``[..., D]`` array is
stored as ``int8 [..., D + 4]``: ``D`` codes ``q = round(x / s)`` in [-127, 127], then the 4 bytes of the
row's float32 scale ``s = max|x| / 127`` (little-endian). A row is one token (``tokens [T, D]``) or the
pooled vector. One array per row keeps the formats untouched (a wider int8 array, checksummed like any
other) and lets a plain reader decode it: ``q[..., :-4] * q[..., -4:].copy().view("<f4")``. A row holding
inf/NaN gets a NaN scale and zero codes, so it is counted and refused on read like a float16 overflow.

float8_e4m3 has the same row layout in ``uint8``: ``D`` float8 e4m3 ("fn": no inf, 0x7F/0xFF are NaN) bit
patterns of ``x / s`` with ``s = max|x| / 448`` (its largest finite value), then the float32 scale. It keeps
~2 significant digits of every element whatever the row's range, where int8's step is the row's max / 127:
more accurate on rows with a few huge channels, less on well-spread rows (benchmarks/int8_storage.py).
Encoding uses torch's float8 cast (round to nearest even); decoding is a 256-entry table (``FLOAT8_E4M3``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

_NUMPY = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4"), "bfloat16": np.dtype("<u2"), "int8": np.dtype("i1"),
          "float8_e4m3": np.dtype("u1")}
INT8_SCALE_BYTES = 4  # the float32 scale appended to every int8 / float8 row
SCALED = ("int8", "float8_e4m3")  # dtypes whose rows carry their own scale
FLOAT8_MAX = 448.0


def _float8_e4m3_table() -> np.ndarray:
    """float32 value of every e4m3fn byte: sign, 4 exponent bits (bias 7), 3 mantissa bits; 0x7F/0xFF NaN."""
    b = np.arange(256, dtype=np.uint32)
    sign = np.where(b & 0x80, -1.0, 1.0)
    e, m = (b >> 3) & 0xF, (b & 0x7).astype(np.float64)
    v = np.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * 2.0 ** (e.astype(np.float64) - 7))
    v = sign * v
    v[(e == 0xF) & (m == 7)] = np.nan
    return v.astype(np.float32)


FLOAT8_E4M3 = _float8_e4m3_table()
INT8_MAX = 127  # symmetric: -128 is never used, so q and -q always both exist


def stored_width(dim: int, dtype: str) -> int:
    """Length of a stored row's last axis for a ``dim``-wide feature (int8 rows carry their scale)."""
    return dim + INT8_SCALE_BYTES if dtype in SCALED else dim


def stored_shape(shape: tuple[int, ...], dtype: str) -> tuple[int, ...]:
    """Stored array shape for a logical (float) shape."""
    return (*shape[:-1], stored_width(shape[-1], dtype)) if shape else shape


def logical_shape(shape: tuple[int, ...], dtype: str) -> tuple[int, ...]:
    """The feature shape a stored array decodes to (inverse of ``stored_shape``)."""
    return (*shape[:-1], shape[-1] - INT8_SCALE_BYTES) if dtype in SCALED and shape else tuple(shape)


def itemsize(dtype: str) -> int:
    return _NUMPY[dtype].itemsize


def numpy_storage_dtype(dtype: str) -> np.dtype:
    """The numpy dtype of the stored arrays (uint16 bit patterns for bfloat16)."""
    return _NUMPY[dtype]


def read_dtype(dtype: str) -> np.dtype:
    """What readers hand back for a storage dtype."""
    return np.dtype("float32") if dtype in ("bfloat16", *SCALED) else _NUMPY[dtype].newbyteorder("=")


def as_numpy(x: Any) -> np.ndarray:
    """numpy array from numpy or torch input (torch bfloat16 is widened: numpy cannot hold it)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if not x.dtype.is_floating_point or x.dtype.itemsize < 4:
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def to_storage(x: Any, dtype: str) -> np.ndarray:
    a = as_numpy(x)
    if a.dtype.kind not in "fiu":
        raise ValueError(f"expected a numeric array, got dtype {a.dtype}")
    if dtype == "int8":
        # An int8 array is taken as already stored (the extraction actor quantises before it hands over):
        # re-quantising codes would silently scale them again.
        return np.ascontiguousarray(a) if a.dtype == np.int8 else quantize_int8(a)
    if dtype == "float8_e4m3":
        return np.ascontiguousarray(a) if a.dtype == np.uint8 else quantize_float8(a)
    if dtype == "bfloat16":
        if a.dtype == np.dtype("<u2"):
            raise ValueError("got uint16 for a bfloat16 store: pass float values, the writer rounds them")
        bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
        # round to nearest, ties to even, on the discarded low 16 bits (in place: one temporary)
        r = bits >> np.uint32(16)
        r &= np.uint32(1)
        r += np.uint32(0x7FFF)
        r += bits
        r >>= np.uint32(16)
        out = r.astype("<u2")
        nan = np.isnan(bits.view(np.float32))
        if nan.any():
            out[nan] = 0x7FC0  # a quiet NaN, whatever the payload was (rounding could have made it inf)
        return out
    if dtype == "float16" and a.dtype == np.float32 and a.size >= _TORCH_CAST_MIN and a.flags.writeable:
        return _float16_via_torch(a)
    with np.errstate(over="ignore"):  # float16 overflow -> inf is counted by the writer (nonfinite_rows)
        return np.ascontiguousarray(a, dtype=_NUMPY[dtype])


# numpy casts float32 -> float16 element by element; torch uses the CPU's vector conversion (F16C):
# 2.25 ms vs 0.24 ms for one 576x1152 token map here, the same bits (round to nearest even, overflow
# -> inf, NaN stays NaN, subnormals), checked by tests/shards/test_dtypes.py. Small arrays stay in numpy.
_TORCH_CAST_MIN = 1 << 14


def _float16_via_torch(a: np.ndarray) -> np.ndarray:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency; the store does not need it
        return np.ascontiguousarray(a, dtype=np.float16)
    return torch.from_numpy(np.ascontiguousarray(a)).to(torch.float16).numpy().astype("<f2", copy=False)


def quantize_int8(x: Any) -> np.ndarray:
    """float ``[..., D]`` -> int8 ``[..., D + 4]``: per-row codes and the row's float32 scale (module doc)."""
    a = np.asarray(x, dtype=np.float32)
    if a.ndim == 0 or a.shape[-1] == 0:
        raise ValueError(f"int8 storage needs arrays with a non-empty last axis, got shape {a.shape}")
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        amax = np.max(np.abs(a), axis=-1, keepdims=True)  # NaN or inf in the row propagate here
        scale = amax / np.float32(INT8_MAX)
        bad = ~np.isfinite(scale)
        q = a * (np.float32(1) / np.where(scale > 0, scale, np.float32(1)))  # an all-zero row stays zeros
        np.rint(q, out=q)
        np.clip(q, -INT8_MAX, INT8_MAX, out=q)
        if bad.any():
            q[np.broadcast_to(bad, q.shape)] = 0
            scale = np.where(bad, np.float32(np.nan), scale)
    out = np.empty(stored_shape(a.shape, "int8"), dtype=np.int8)
    out[..., :-INT8_SCALE_BYTES] = q
    out[..., -INT8_SCALE_BYTES:] = np.ascontiguousarray(scale, dtype="<f4").view(np.int8)
    return out


def quantize_float8(x: Any) -> np.ndarray:
    """float ``[..., D]`` -> uint8 ``[..., D + 4]``: e4m3fn bit patterns of ``x / s`` and the row's float32 scale."""
    import torch

    a = np.ascontiguousarray(x, dtype=np.float32)
    if a.ndim == 0 or a.shape[-1] == 0:
        raise ValueError(f"float8 storage needs arrays with a non-empty last axis, got shape {a.shape}")
    t = torch.from_numpy(a)
    with np.errstate(invalid="ignore", over="ignore"):
        amax = t.abs().amax(dim=-1, keepdim=True)  # NaN/inf propagate
        scale = amax / FLOAT8_MAX
        bad = ~torch.isfinite(scale)
        q = t / torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.where(bad, torch.zeros_like(q), q).clamp_(-FLOAT8_MAX, FLOAT8_MAX)
        scale = torch.where(bad, torch.full_like(scale, float("nan")), scale)
    out = np.empty(stored_shape(a.shape, "float8_e4m3"), dtype=np.uint8)
    out[..., :-INT8_SCALE_BYTES] = q.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    out[..., -INT8_SCALE_BYTES:] = np.ascontiguousarray(scale.numpy(), dtype="<f4").view(np.uint8)
    return out


def dequantize_float8(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8 or a.ndim == 0 or a.shape[-1] <= INT8_SCALE_BYTES:
        raise ValueError(f"not a float8 store row (dtype {a.dtype}, shape {a.shape}): expected uint8 [..., D + 4]")
    out = FLOAT8_E4M3[a[..., :-INT8_SCALE_BYTES]]
    out *= int8_scales(a).astype(np.float32)
    return out


def int8_scales(a: np.ndarray) -> np.ndarray:
    """The float32 scales ``[..., 1]`` of stored int8 / float8 rows."""
    return np.ascontiguousarray(a[..., -INT8_SCALE_BYTES:]).view("<f4")


def dequantize_int8(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.int8 or a.ndim == 0 or a.shape[-1] <= INT8_SCALE_BYTES:
        raise ValueError(f"not an int8 store row (dtype {a.dtype}, shape {a.shape}): expected int8 [..., D + 4]")
    out = a[..., :-INT8_SCALE_BYTES].astype(np.float32)
    out *= int8_scales(a).astype(np.float32)
    return out


def int8_error(x: Any, stored: np.ndarray | None = None, dtype: str = "int8") -> dict[str, float]:
    """What int8 (or float8_e4m3) storage costs a float array ``[..., D]`` (rows as stored): ``max_abs`` error, ``rel_to_max``
    (the largest error over its row's max|x|; at most 1/254 for int8), ``max_cos_dist`` (1 - the
    smallest per-row cosine to the input, rows of zeros excluded) and ``nonfinite`` (0: checked apart)."""
    a = np.asarray(x, dtype=np.float32)
    b = from_storage(to_storage(a, dtype) if stored is None else stored, dtype)
    err = np.abs(a - b)
    amax = np.max(np.abs(a), axis=-1)
    norm = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    live = norm > 0
    cos = np.sum(a * b, axis=-1)[live] / norm[live]
    rel = np.max(err, axis=-1)[amax > 0] / amax[amax > 0]
    return {"max_abs": float(err.max()) if err.size else 0.0, "rel_to_max": float(rel.max()) if rel.size else 0.0,
            "max_cos_dist": float(1.0 - cos.min()) if cos.size else 0.0, "nonfinite": 0}


def from_storage(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "int8":
        return dequantize_int8(a)
    if dtype == "float8_e4m3":
        return dequantize_float8(a)
    if dtype == "bfloat16":
        return (np.asarray(a, dtype=np.uint32) << np.uint32(16)).view(np.float32)
    return np.asarray(a, dtype=read_dtype(dtype))


def nonfinite_in_storage(a: np.ndarray, dtype: str) -> bool:
    """True when the stored values hold inf/NaN (e.g. float16 overflow of values above 65504)."""
    if dtype in SCALED:  # codes are always finite: the row's scale says (NaN for a row that held inf/NaN)
        v = np.ascontiguousarray(a[..., -INT8_SCALE_BYTES:]).view("<u4")
        return bool(((v & np.uint32(0x7F800000)) == np.uint32(0x7F800000)).any())
    if dtype == "bfloat16":  # exponent bits all ones <=> inf or NaN
        return bool(((a & np.uint16(0x7F80)) == np.uint16(0x7F80)).any())
    # The same bit test for IEEE float16/float32: ~5x faster than np.isfinite on float16, which numpy
    # widens element by element (this runs once per image on the extraction driver).
    bits, exp = {2: (np.uint16, 0x7C00), 4: (np.uint32, 0x7F800000)}.get(a.dtype.itemsize, (None, 0))
    if bits is None or a.dtype.kind != "f":
        return not bool(np.isfinite(a).all())
    v = np.ascontiguousarray(a).view(bits)
    return bool(((v & bits(exp)) == bits(exp)).any())
