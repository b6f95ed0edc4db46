"""Stage targets rendered from stored expert outputs, and the instruction templates."""

from __future__ import annotations

import numpy as np
import pytest

from astrea.train.targets import (
    TargetOptions,
    TargetStats,
    boxes_text,
    decode_rle,
    encode_rle,
    mask_polygon,
    masks_text,
    tags_text,
)
from astrea.train.templates import render

SOURCES = {"tags": "ram_plus", "boxes": "grounding_dino", "masks": "sam2"}


def _sample(caption="a dog  on grass"):
    m = np.zeros((10, 20), bool)
    m[2:8, 5:15] = True
    return {
        "key": "k",
        "caption": caption,
        "experts": {
            "ram_plus": {"outputs": {"tags": ["dog", "grass"], "scores": [0.9, 0.6]}},
            "grounding_dino": {"outputs": {"boxes": [[0.1, 0.25, 0.5, 0.755]], "labels": ["dog"], "scores": [0.8]}},
            "sam2": {"outputs": {"masks": [{"rle": encode_rle(m), "score": 0.9, "area": 60, "box": [0, 0, 1, 1], "label": "dog"}]}},
        },
    }


def test_rle_round_trip_and_known_encoding():
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = rng.random((7, 9)) > 0.6
        assert np.array_equal(decode_rle(encode_rle(m)), m)
    # pycocotools' encoding of a 3x3 mask with only the centre set: counts [4, 1, 4]
    m = np.zeros((3, 3), bool)
    m[1, 1] = True
    assert encode_rle(m)["counts"] == "414"
    assert np.array_equal(decode_rle({"size": [3, 3], "counts": [4, 1, 4]}), m)


def test_bad_rle_is_refused():
    with pytest.raises(ValueError):
        decode_rle({"size": [3, 3], "counts": [4, 1]})
    with pytest.raises(ValueError):
        decode_rle({"counts": "414"})


def test_polygon_of_a_rectangle_is_its_corners():
    m = np.zeros((11, 21), bool)
    m[2:9, 4:17] = True
    poly = mask_polygon(m, 8)
    xs, ys = [p[0] for p in poly], [p[1] for p in poly]
    assert 3 <= len(poly) <= 8
    assert min(xs) == pytest.approx(4 / 20, abs=0.05) and max(xs) == pytest.approx(16 / 20, abs=0.05)
    assert min(ys) == pytest.approx(2 / 10, abs=0.06) and max(ys) == pytest.approx(8 / 10, abs=0.06)


def test_boxes_fixed_precision_and_clamped():
    stats = TargetStats()
    out = {"boxes": [[0.1234, -0.2, 0.5, 1.3], [1, 2]], "labels": ["a  cat", "x"]}
    assert boxes_text(out, TargetOptions(), stats) == "a cat [12,0,50,99]"  # 0..99 bins: round(v * 99)
    assert boxes_text(out, TargetOptions(format="decimal"), stats) == "a cat [0.12,0.00,0.50,1.00]"
    assert stats.dropped["boxes: box not 4 finite numbers"] == 2


def test_missing_outputs_are_counted_not_raised():
    stats = TargetStats()
    assert tags_text({}, TargetOptions(), stats) == "none"
    assert masks_text({"masks": [{"rle": {"size": [2, 2], "counts": "zz"}}]}, TargetOptions(), stats) == "none"
    assert sum(stats.dropped.values()) == 2


def test_render_is_cumulative_in_stage_order():
    s, stats = _sample(), TargetStats()
    r = render(s, ["caption", "tags"], SOURCES, TargetOptions(), stats)
    assert r.prompt == "Instruction: caption, recognition.\nAnswer:\n"
    assert r.target == "caption: a dog on grass\ntags: dog, grass"
    full = render(s, ["caption", "tags", "boxes", "masks"], SOURCES, TargetOptions(), stats)
    lines = full.target.split("\n")
    assert lines[2] == "boxes: dog [10,25,50,75]"
    # the mask (rows 2..7, columns 5..14 of 10x20) as its own box and a 4x4 occupancy code: all on
    assert lines[3] == "masks: dog [25,20,74,79] ffff" and full.task == "masks"
    rev = render(s, ["masks", "boxes"], SOURCES, TargetOptions(), stats)
    assert rev.prompt == "Instruction: segmentation, detection.\nAnswer:\n"


def test_render_without_caption_keeps_other_tasks_and_none_when_empty():
    stats = TargetStats()
    r = render(_sample(caption=None), ["caption", "tags"], SOURCES, TargetOptions(), stats)
    assert r.target == "tags: dog, grass"
    assert render(_sample(caption=""), ["caption"], SOURCES, TargetOptions(), stats) is None


def test_reads_the_extractors_rle():
    """Masks written by the sam2 expert decode to the same pixels here: one codec (schemas/mask_rle.py)."""
    from astrea.schemas import mask_rle as rle

    assert decode_rle is rle.decode and encode_rle is rle.encode
    rng = np.random.default_rng(1)
    m = rng.random((13, 17)) > 0.5
    assert np.array_equal(decode_rle(rle.encode(m)), m)
    assert np.array_equal(rle.decode(encode_rle(m)), m)
