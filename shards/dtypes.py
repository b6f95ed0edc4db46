"""Storage dtypes. numpy has no bfloat16, so bfloat16 is stored as its raw 16-bit patterns (uint16).

bfloat16 is the top half of an IEEE float32, so conversion needs no library:
``stored = round_to_nearest_even(f32.view(uint32) >> 16)`` and back ``(stored.astype(uint32) << 16).view(float32)``
(exact). Readers give back the storage dtype for float16/float32 and float32 for bfloat16.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_NUMPY = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4"), "bfloat16": np.dtype("<u2")}


def numpy_storage_dtype(dtype: str) -> np.dtype:
    """The numpy dtype of the stored arrays (uint16 bit patterns for bfloat16)."""
    return _NUMPY[dtype]


def read_dtype(dtype: str) -> np.dtype:
    """What readers hand back for a storage dtype."""
    return np.dtype("float32") if dtype == "bfloat16" else _NUMPY[dtype].newbyteorder("=")


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


def from_storage(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (np.asarray(a, dtype=np.uint32) << np.uint32(16)).view(np.float32)
    return np.asarray(a, dtype=read_dtype(dtype))


def nonfinite_in_storage(a: np.ndarray, dtype: str) -> bool:
    """True when the stored values hold inf/NaN (e.g. float16 overflow of values above 65504)."""
    if dtype == "bfloat16":  # exponent bits all ones <=> inf or NaN
        return bool(((a & np.uint16(0x7F80)) == np.uint16(0x7F80)).any())
    # The same bit test for IEEE float16/float32: ~5x faster than np.isfinite on float16, which numpy
    # widens element by element (this runs once per image on the extraction driver).
    bits, exp = {2: (np.uint16, 0x7C00), 4: (np.uint32, 0x7F800000)}.get(a.dtype.itemsize, (None, 0))
    if bits is None or a.dtype.kind != "f":
        return not bool(np.isfinite(a).all())
    v = np.ascontiguousarray(a).view(bits)
    return bool(((v & bits(exp)) == bits(exp)).any())
