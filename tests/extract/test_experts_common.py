"""Shared expert blocks: safe decoding of every awkward image kind (converted or refused per key,
never a crash), grid resampling, and the storage-error report."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from astrea.extract.experts.base import BadImageError
from astrea.extract.experts.common import MAX_PIXELS, decode_image, resample_grid, storage_error


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(w=40, h=30, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_rgb_passes_through_unchanged():
    img = _rgb()
    out = decode_image(_encode(img))
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(img))


def test_grayscale_becomes_rgb_with_equal_channels():
    gray = _rgb().convert("L")
    out = np.asarray(decode_image(_encode(gray)))
    assert out.shape == (30, 40, 3)
    assert all(np.array_equal(out[..., c], np.asarray(gray)) for c in range(3))


def test_one_bit_and_palette_images():
    bw = _rgb().convert("L").point(lambda v: 255 if v > 127 else 0).convert("1")
    assert decode_image(_encode(bw)).mode == "RGB"
    pal = _rgb().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    out = decode_image(_encode(pal))
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(pal.convert("RGB")))


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (32, 24), (0, 255, 255, 0))  # pure red in CMYK
    out = np.asarray(decode_image(_encode(cmyk, "JPEG", quality=95)))
    assert out.shape == (24, 32, 3)
    r, g, b = out[..., 0].mean(), out[..., 1].mean(), out[..., 2].mean()
    assert r > 200 and g < 60 and b < 60


def test_alpha_is_composited_on_white():
    rgba = np.zeros((10, 12, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red-ish
    rgba[:, :6, 3] = 255  # left half opaque, right half fully transparent
    out = np.asarray(decode_image(_encode(Image.fromarray(rgba, "RGBA"))))
    assert (out[:, :6] == [200, 0, 0]).all()
    assert (out[:, 6:] == 255).all()
    la = Image.fromarray(np.stack([np.full((8, 8), 10, np.uint8), np.zeros((8, 8), np.uint8)], -1), "LA")
    assert (np.asarray(decode_image(_encode(la))) == 255).all()  # transparent gray -> white


def test_palette_with_transparency():
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.info["transparency"] = 0
    out = np.asarray(decode_image(_encode(p, transparency=0)))
    assert (out == 255).all()


def test_sixteen_bit_is_scaled_to_eight_bit():
    ramp = (np.arange(64 * 16, dtype=np.uint16).reshape(16, 64) * 60).astype(np.uint16)  # up to 61380
    img16 = Image.fromarray(ramp)
    assert img16.mode.startswith("I;16")
    out = np.asarray(decode_image(_encode(img16)))
    assert out.dtype == np.uint8 and out.shape == (16, 64, 3)
    assert out.max() == 255 and out.min() == 0  # the image's maximum maps to white, not clipped
    assert np.all(np.diff(out[0, :, 0].astype(int)) >= 0)  # monotone ramp kept


def test_float_tiff_is_normalised():
    arr = np.linspace(-3.0, 5.0, 20 * 10, dtype=np.float32).reshape(10, 20)
    out = np.asarray(decode_image(_encode(Image.fromarray(arr, "F"), "TIFF")))
    assert out.shape == (10, 20, 3) and out.min() == 0 and out.max() == 255


@pytest.mark.parametrize(
    "size, reason",
    [((1, 1), "too small"), ((1, 50), "too small"), ((2000, 10), "extreme aspect ratio"), ((10, 2000), "extreme aspect")],
)
def test_tiny_and_extreme_aspect_images_are_refused(size, reason):
    with pytest.raises(BadImageError, match=reason):
        decode_image(_encode(Image.new("RGB", size, (1, 2, 3))))


def test_moderate_aspect_is_accepted():
    assert decode_image(_encode(Image.new("RGB", (400, 10)))).size == (400, 10)


def test_decompression_bomb_is_refused_before_decoding():
    # A real 81-megapixel 1-bit PNG: ~10 kB on disk, 243 MB once decoded to RGB.
    side = 9000
    assert side * side > MAX_PIXELS
    data = _encode(Image.new("1", (side, side), 0), optimize=False)
    assert len(data) < 2_000_000
    with pytest.raises(BadImageError, match="too large"):
        decode_image(data)
    # the limit is configurable per job
    with pytest.raises(BadImageError, match="too large: 40x30 pixels > limit 1000"):
        decode_image(_encode(_rgb()), max_pixels=1000)


def test_pil_bomb_error_is_reported_as_too_large():
    # Above PIL's own hard limit, Image.open itself raises; that is still a per-key reason.
    old = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = 100
        with pytest.raises(BadImageError, match="too large"):
            decode_image(_encode(_rgb()), max_pixels=10**9)
    finally:
        Image.MAX_IMAGE_PIXELS = old


@pytest.mark.parametrize(
    "data, reason",
    [(None, "missing image"), (b"", "empty file"), (b"not an image at all", "undecodable"),
     (None, "undecodable")],
)
def test_missing_empty_and_corrupt(data, reason):
    if reason == "undecodable" and data is None:
        data = _encode(_rgb(200, 200), "JPEG")[:300]  # truncated JPEG
    with pytest.raises(BadImageError, match=reason):
        decode_image(data)


def test_bad_image_error_message_is_short_and_single_line():
    with pytest.raises(BadImageError) as e:
        decode_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    assert "\n" not in str(e.value) and len(str(e.value)) < 200


# ---------------------------------------------------------------------------------- resample_grid


def test_resample_identity_area_mean_and_upsampling():
    x = torch.randn(2, 6 * 6, 5)
    assert resample_grid(x, 6, 6, 6) is x
    down = resample_grid(x, 6, 6, 3)
    ref = x.reshape(2, 3, 2, 3, 2, 5).mean(dim=(2, 4)).reshape(2, 9, 5)
    torch.testing.assert_close(down, ref)
    up = resample_grid(torch.ones(1, 4, 3), 2, 2, 5)
    assert up.shape == (1, 25, 3) and torch.allclose(up, torch.ones_like(up))
    # non-divisible shrink (SigLIP 27 -> 24): adaptive pooling keeps the mean of a constant map
    c = torch.full((1, 27 * 27, 2), 3.0)
    torch.testing.assert_close(resample_grid(c, 27, 27, 24), torch.full((1, 576, 2), 3.0))


def test_resample_rejects_wrong_token_count():
    with pytest.raises(ValueError, match="expected 4x4=16"):
        resample_grid(torch.zeros(1, 15, 3), 4, 4, 2)


# ---------------------------------------------------------------------------------- storage_error


def test_storage_error_bounds_and_overflow():
    x = np.random.default_rng(0).normal(0, 10, (100, 8)).astype(np.float32)
    e16 = storage_error(x, "float16")
    assert 0 < e16["max_rel"] <= 2.0**-11 * 1.0001 and e16["nonfinite"] == 0
    assert storage_error(x, "bfloat16")["max_rel"] <= 2.0**-8 * 1.0001
    assert storage_error(x, "float32") == {"max_abs": 0.0, "max_rel": 0.0, "rel_to_max": 0.0, "nonfinite": 0}
    x[0, 0] = 1e5  # above float16's 65504
    assert storage_error(x, "float16")["nonfinite"] == 1
    assert storage_error(x, "bfloat16")["nonfinite"] == 0
    with pytest.raises(ValueError, match="storage dtype"):
        storage_error(x, "int8")


def test_undecodable_reason_holds_no_object_address():
    # PIL names the file object it could not identify, address included: a reason must not change per run
    reasons = set()
    for _ in range(2):
        with pytest.raises(BadImageError) as ei:
            decode_image(b"plain text, not an image of any kind" * 4)
        reasons.add(ei.value.args[0])
    (reason,) = reasons
    assert reason.startswith("undecodable: UnidentifiedImageError") and "0x" not in reason, reason


def test_writer_strips_addresses_from_any_failure_reason(tmp_path):
    from astrea.shards import Store
    from tests.shards.helpers import make_spec

    edir = Store(tmp_path).expert_dir("ds", make_spec(), create=True)
    with edir.open_unit("00000") as w:
        w.add_failure("a", "forward failed: RuntimeError: <Foo object at 0x7f00deadbeef> broke")
        w.commit()
    (rec,) = edir.iter_unit("00000")
    assert rec.error == "forward failed: RuntimeError: <Foo object> broke"


# -- large images: converted in strips, same pixels, bounded memory (issue 14, item 8) --------------
def _awkward_images(h: int, w: int, seed: int = 0) -> dict[str, Image.Image]:
    rng = np.random.default_rng(seed)
    rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    pal = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert("P", palette=Image.ADAPTIVE)
    pal.info["transparency"] = 3
    floats = rng.normal(0, 100, (h, w)).astype(np.float32)
    floats[rng.random((h, w)) < 0.01] = np.nan
    return {
        "RGBA": rgba, "LA": rgba.convert("LA"), "PA": rgba.convert("PA"), "P+transparency": pal,
        "CMYK": rgba.convert("CMYK"), "1": rgba.convert("1"), "YCbCr": rgba.convert("RGB").convert("YCbCr"),
        "I;16": Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16)),
        "I": Image.fromarray(rng.integers(-1000, 100_000, (h, w), dtype=np.int32)), "F": Image.fromarray(floats, "F"),
    }


@pytest.mark.parametrize("mode", list(_awkward_images(2, 2)))
def test_conversion_in_strips_gives_the_whole_image_pixels(monkeypatch, mode):
    """A big image is converted strip by strip (strips of 3 rows here): bit-identical to converting it
    whole, 16-bit and float scaling included (they use the whole image's range, not a strip's)."""
    from astrea.extract.experts import common

    img = _awkward_images(257, 300)[mode]
    whole = np.asarray(common._to_rgb(img, common._value_range(img)))
    monkeypatch.setattr(common, "STRIP_PIXELS", 1000)
    strips = np.asarray(common.to_rgb(img))
    assert strips.shape == whole.shape == (257, 300, 3) and np.array_equal(strips, whole)


def test_normal_size_images_decode_to_the_same_pixels_as_before():
    """Pixel hashes of decode_image's output, computed with the decoder before strips existed
    (lossless formats only: a JPEG's pixels depend on the libjpeg build)."""
    import hashlib

    imgs = _awkward_images(61, 83, seed=7)
    want = {"RGBA": "3be4a4861988dd3c", "LA": "70ddb2a2bdf54c9d", "P+transparency": "04bdda4446c56f68",
            "I;16": "782d971ed746cc9c", "F": "d432a9ec4d47f51d"}
    got = {}
    for mode in want:
        data = _encode(imgs[mode], "TIFF" if mode == "F" else "PNG")
        got[mode] = hashlib.sha256(np.asarray(decode_image(data)).tobytes()).hexdigest()[:16]
    assert got == want


def test_sixteen_bit_conversion_memory_is_bounded_by_a_strip(monkeypatch):
    """numpy temporaries of a 16-bit -> 8-bit conversion (traced by tracemalloc) stay near one strip's,
    not several float64 copies of the image (a 64M-pixel image used to cost 1.6 GB here)."""
    import tracemalloc

    from astrea.extract.experts import common

    side = 2000  # 4M pixels: one float64 copy is 32 MB
    img = Image.fromarray(np.random.default_rng(0).integers(0, 65535, (side, side), dtype=np.uint16))
    monkeypatch.setattr(common, "STRIP_PIXELS", 250_000)
    tracemalloc.start()
    try:
        common.to_rgb(img)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < side * side * 8 / 2, f"{peak / 2**20:.0f} MiB traced"
