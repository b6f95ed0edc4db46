"""``target_sources.<task>: dataset``: stage targets from the dataset's own annotations (COCO's boxes and
masks, the sample's drawn objects) instead of an expert's stored predictions."""

from __future__ import annotations

import numpy as np
import pytest

from astrea.schemas.stages import DATASET
from astrea.train.config import TrainConfig
from astrea.train.runner import run_local
from astrea.train.targets import (
    TargetOptions,
    TargetStats,
    dataset_outputs,
    decode_rle,
    encode_rle,
    mask_iou,
    masks_items,
    parse_masks,
)
from astrea.train.templates import render
from tests.train.fixtures import WORDS, make_store

SOURCES = {"tags": "ram_plus", "boxes": DATASET, "masks": DATASET}


def _disc(h=40, w=60):
    yy, xx = np.mgrid[:h, :w]
    return (yy - 20) ** 2 + (xx - 30) ** 2 <= 100


def test_sample_layout_renders_as_expert_outputs_would():
    """The sample's labels (and any webdataset ``labels`` in its layout) become the same text an expert's
    outputs of the same boxes and masks give."""
    m = _disc()
    lab = {"classes": ["red circle"], "tags": ["circle", "red"], "boxes": [[0.33, 0.25, 0.67, 0.75]],
           "masks": [{"rle": encode_rle(m), "label": "red circle", "area": int(m.sum())}]}
    sample = {"key": "k", "caption": "a red circle", "labels": lab, "experts": {"ram_plus": {"outputs": {"tags": ["x"]}}}}
    r = render(sample, ["caption", "tags", "boxes", "masks"], SOURCES, TargetOptions(), TargetStats())
    boxes_line, masks_line = r.target.split("\n")[2:]
    assert boxes_line == "boxes: red circle [33,25,66,74]"
    assert masks_line.startswith("masks: red circle [")
    assert r.target.split("\n")[1] == "tags: x"  # tags still from ram_plus
    (label, decoded), = parse_masks(masks_line, m.shape)
    assert label == "red circle" and mask_iou(decoded, m) > 0.7


def test_coco_polygons_and_rle_are_read():
    h, w = 40, 60
    square = [10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]  # COCO: pixel x,y pairs
    disc = _disc(h, w)
    lab = {"width": w, "height": h, "classes": ["box", "ball", "crowd"],
           "boxes": [[10 / w, 10 / h, 30 / w, 30 / h], None, [0, 0, 1, 1]],
           "masks": [[square], encode_rle(disc), {"size": [h, w], "counts": [h * w]}]}
    stats = TargetStats()
    out = dataset_outputs(lab, "masks", stats)
    assert [m["label"] for m in out["masks"]] == ["box", "ball", "crowd"]
    sq = out["masks"][0]["mask"]  # polygons are rasterised once, not encoded to RLE and decoded again
    want = np.zeros((h, w), bool)
    want[10:31, 10:31] = True  # PIL fills the polygon's boundary pixels too
    assert mask_iou(sq, want) > 0.95
    assert np.array_equal(decode_rle(out["masks"][1]["rle"]), disc)
    items = masks_items(out, TargetOptions(), stats)
    assert len(items) == 2 and stats.dropped["masks: empty mask"] == 1  # the all-background RLE
    boxes = dataset_outputs(lab, "boxes", stats)
    assert boxes["labels"] == ["box", "ball", "crowd"]
    assert render({"caption": None, "labels": lab}, ["boxes"], SOURCES, TargetOptions(), stats).target == (
        "boxes: box [16,25,50,74]; crowd [0,0,99,99]")  # round(16.5) = 16
    assert stats.dropped["boxes: box not 4 finite numbers"] == 1  # COCO's unreadable bbox (None)


def test_rows_without_annotations_have_no_line_and_are_counted():
    stats = TargetStats()
    photo = {"caption": "a photo", "labels": {"classes": ["clock"], "tags": ["clock"]}}
    r = render(photo, ["caption", "tags", "boxes"], {**SOURCES, "tags": DATASET}, TargetOptions(), stats)
    assert r.target == "caption: a photo\ntags: clock"
    assert stats.dropped["boxes: row without dataset boxes (line left out)"] == 1
    assert render({"caption": None, "labels": None}, ["boxes", "masks"], SOURCES, TargetOptions(), stats) is None
    assert stats.dropped["masks: row without dataset masks (line left out)"] == 1
    # polygons without the image size cannot be rasterised: dropped and counted, never guessed
    out = dataset_outputs({"classes": ["x"], "masks": [[[1, 1, 5, 1, 5, 5]]]}, "masks", stats)
    assert out == {"masks": []}
    assert stats.dropped["masks: dataset segmentation neither RLE nor polygons with the image size"] == 1


def _labels(i: int) -> dict | None:
    if i % 4 == 0:
        return None  # an unannotated image: trains the caption only
    cls = i % len(WORDS)
    return {"classes": [f"big {WORDS[cls]}"], "boxes": [[0.1, 0.1, 0.3 + 0.1 * cls, 0.4]]}


def test_detection_stage_trains_on_dataset_boxes_without_the_detectors_outputs(tmp_path):
    """The detection stage reads grounding_dino's features but its boxes from the rows' labels; the
    store needs no expert for the targets (before: 'dataset' was looked up as an expert and refused)."""
    store = make_store(tmp_path / "store", experts=("siglip", "grounding_dino"), units=2, per_unit=8, labels=_labels)
    out = tmp_path / "run"
    cfg = TrainConfig.load(None, {
        "store": str(store), "data": "toy", "out": str(out), "stages": "caption,detection", "steps": 2,
        "batch_size": 4, "dataset.heldout_fraction": 0.25, "progress": False, "llm.text_warmup_steps": 0,
        "target_sources": {"boxes": DATASET},
    })
    summary = run_local(cfg)
    drops = summary["target_render_drops"]
    assert drops.get("boxes: row without dataset boxes (line left out)", 0) >= 1
    assert not any(k.startswith("boxes: no outputs") for k in drops)
    from astrea.train.eval import EvalConfig, evaluate

    e = evaluate(EvalConfig(run=str(out)))
    assert "boxes" in e["heldout"]["lines"]["detection"]


@pytest.mark.parametrize("task", ["tags", "boxes", "masks"])
def test_dataset_source_is_not_an_expert_the_stage_needs(task):
    from astrea.train.stages import build_stages

    stages = {"tags": "classification", "boxes": "detection", "masks": "segmentation"}
    cfg = TrainConfig.load(None, {"store": "s", "data": "d", "out": "o", "stages": ["caption", stages[task]],
                                  "target_sources": {task: DATASET}})
    need = build_stages(cfg)[1].required_experts()
    assert DATASET not in need
