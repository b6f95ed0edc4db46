"""Storage dtype conversion: the fast float16 path gives numpy's exact bits."""

from __future__ import annotations

import numpy as np

from astrea.shards.dtypes import _TORCH_CAST_MIN, nonfinite_in_storage, to_storage


def _numpy_f16(a: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return a.astype(np.float16)


def test_float16_fast_path_is_bit_identical_to_numpy():
    rng = np.random.default_rng(0)
    a = (rng.standard_normal(_TORCH_CAST_MIN * 4) * rng.choice([1e-7, 1e-3, 1, 100, 7e4], _TORCH_CAST_MIN * 4)).astype(np.float32)
    edge = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 65504, 65519.99, 65520, -65520, 1e6, 6.1e-5, 6.0e-5,
                     5.96e-8, 2.98e-8, 2.99e-8, -1e-9, 1.00048828125, 1.000732421875], np.float32)
    a[: len(edge)] = edge
    got = to_storage(a, "float16")
    assert got.dtype == np.dtype("<f2") and got.flags.c_contiguous
    assert np.array_equal(got.view(np.uint16), _numpy_f16(a).view(np.uint16))
    assert nonfinite_in_storage(got, "float16")  # inf, NaN and the overflowed values are caught


def test_small_and_read_only_arrays_take_numpy():
    a = np.linspace(-3, 3, 100, dtype=np.float32)
    assert np.array_equal(to_storage(a, "float16"), _numpy_f16(a))
    ro = np.frombuffer(np.arange(_TORCH_CAST_MIN * 2, dtype=np.float32).tobytes(), np.float32)
    assert not ro.flags.writeable
    assert np.array_equal(to_storage(ro, "float16").view(np.uint16), _numpy_f16(ro).view(np.uint16))
