"""Folder and COCO sources: the less common layouts and the inputs that go wrong."""

from __future__ import annotations

import json
import os

import pytest

from astrea.data import open_source
from astrea.data.base import DataError, check_key
from tests.data.builders import jpeg


def _all(src):
    return [s for sh in src.shards() for s in sh]


# -- folder ---------------------------------------------------------------------------------------
def test_folder_size_limit_bad_sidecar_and_json_labels(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    big = jpeg(400, 300)
    (d / "big.jpg").write_bytes(big)
    (d / "small.jpg").write_bytes(jpeg())
    (d / "small.json").write_text(json.dumps({"classes": ["cat"], "boxes": [[0, 0, 1, 1]]}))
    (d / "broken.jpg").write_bytes(jpeg())
    (d / "broken.json").write_text("{not json")
    src = open_source(str(d), format="folder", max_image_bytes=len(big) - 1)
    by_key = {s.key: s for s in _all(src)}
    assert by_key["big"].image is None and by_key["big"].error.startswith("file too large")
    assert by_key["small"].ok and by_key["small"].labels == {"classes": ["cat"], "boxes": [[0, 0, 1, 1]],
                                                              "path": "small.jpg"}
    # a malformed sidecar loses the labels, not the image, and says so
    assert by_key["broken"].ok and by_key["broken"].labels["labels_error"].startswith("bad json")
    for s in by_key.values():
        json.dumps(s.labels)  # labels always travel as JSON into the store


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_folder_symlinks(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "o.jpg").write_bytes(jpeg())
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "real.jpg").write_bytes(jpeg())
    os.symlink(outside, d / "linked_dir")  # a linked folder is not walked (no cycles, no surprises)
    os.symlink(outside / "o.jpg", d / "linked.jpg")  # out of the tree: refused (issue 14, item 5)
    os.symlink(d / "real.jpg", d / "inside.jpg")  # a link that stays inside the folder is read
    os.symlink(tmp_path / "nowhere.jpg", d / "dangling.jpg")
    by_key = {s.key: s for s in _all(open_source(str(d), format="folder"))}
    assert set(by_key) == {"dangling", "inside", "linked", "real"}
    assert by_key["inside"].ok and by_key["real"].ok
    assert by_key["linked"].image is None and by_key["linked"].error.startswith("outside the source")
    assert by_key["dangling"].image is None and by_key["dangling"].error.startswith("missing image")


def test_folder_shards_are_sized_and_stable(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(7):
        (d / f"{i:03d}.jpg").write_bytes(jpeg())
    src = open_source(str(d), format="folder", shard_size=3)
    assert [(s.name, len(s)) for s in src.shards()] == [("00000", 3), ("00001", 3), ("00002", 1)]
    assert [s.key for s in src.shards()[2]] == ["006"]
    assert src.count() == 7


# -- coco -----------------------------------------------------------------------------------------
def _write_coco(root, split, images, annotations=None, captions=None, categories=None, image_dir=None):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    img_dir = image_dir if image_dir is not None else root / split
    img_dir.mkdir(parents=True, exist_ok=True)
    for im in images:
        if im.get("_write", True):
            (img_dir / im["file_name"]).write_bytes(jpeg(im["width"], im["height"]))
    clean = [{k: v for k, v in im.items() if not k.startswith("_")} for im in images]
    if annotations is not None:
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": clean, "annotations": annotations, "categories": categories or []}))
    if captions is not None:
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(
            {"images": clean, "annotations": captions}))


def test_coco_several_splits_selection_and_layouts(tmp_path):
    root = tmp_path / "coco"
    _write_coco(root, "val2017", [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 20}],
                captions=[{"id": 1, "image_id": 1, "caption": "val image"}])
    # train2017's images live under ROOT/images/train2017 (a common re-packaging)
    _write_coco(root, "train2017", [{"id": 7, "file_name": "b.jpg", "width": 40, "height": 20}],
                captions=[{"id": 1, "image_id": 7, "caption": "train image"}],
                image_dir=root / "images" / "train2017")
    both = _all(open_source(str(root)))
    assert [(s.key, s.caption, s.labels["split"]) for s in both] == [("b", "train image", "train2017"),
                                                                     ("a", "val image", "val2017")]
    assert all(s.ok for s in both)
    (only,) = _all(open_source(str(root), split="val2017"))
    assert only.key == "a"
    two = open_source(str(root), split=["val2017", "train2017"])
    assert [s.key for s in _all(two)] == ["a", "b"]  # the order asked for


def test_coco_images_dir_option_missing_files_and_odd_annotations(tmp_path):
    root = tmp_path / "coco"
    elsewhere = tmp_path / "pics"
    images = [
        {"id": 1, "file_name": "ok.jpg", "width": 100, "height": 50},
        {"id": 2, "file_name": "gone.jpg", "width": 100, "height": 50, "_write": False},
        {"id": 3, "file_name": "nosize.jpg", "width": 0, "height": 0, "_write": False},
        {"id": 4, "file_name": "/etc/hostname", "width": 10, "height": 10, "_write": False},
    ]
    (root / "val").mkdir(parents=True)
    (root / "val" / "nosize.jpg").write_bytes(jpeg())
    anns = [
        {"id": 1, "image_id": 1, "category_id": 5, "bbox": [-10, 10, 200, 20], "segmentation": [[0, 0, 1, 1, 1, 0]]},
        {"id": 2, "image_id": 3, "category_id": 1, "bbox": [1, 1, 2, 2]},
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": "not a box"},
    ]
    _write_coco(root, "val", images, annotations=anns, categories=[{"id": 1, "name": "person"}],
                image_dir=elsewhere)
    src = open_source(str(root), format="coco", images_dir=str(elsewhere))
    by_key = {s.key: s for s in _all(src)}
    assert by_key["ok"].ok
    assert by_key["ok"].labels["classes"] == ["unknown-5", "person"]  # an id with no category is named, not dropped
    assert by_key["ok"].labels["boxes"][0] == [0.0, 0.2, 1.0, 0.6]  # clipped to the image
    assert by_key["ok"].labels["boxes"][1] is None  # unusable bbox: kept as None so lists stay aligned
    assert by_key["gone"].image is None and by_key["gone"].error.startswith("missing image")
    assert by_key["nosize"].labels["boxes"] == [None]  # no image size: cannot normalise
    assert by_key["hostname"].error.startswith("invalid path")
    for s in by_key.values():
        assert check_key(s.key) is None
        json.dumps(s.labels)
    # the default image folder (ROOT/val) is used when images_dir is not given
    by_key = {s.key: s for s in _all(open_source(str(root), format="coco"))}
    assert by_key["nosize"].ok and by_key["ok"].error.startswith("missing image")


def test_coco_without_annotations_or_images(tmp_path):
    (tmp_path / "c" / "annotations").mkdir(parents=True)
    with pytest.raises(DataError, match="no COCO annotations"):
        open_source(str(tmp_path / "c"), format="coco")
    _write_coco(tmp_path / "c", "val", [], captions=[])
    with pytest.raises(DataError, match="list no images"):
        open_source(str(tmp_path / "c"), format="coco").shards()
    (tmp_path / "c" / "annotations" / "captions_val.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="expected a COCO annotation object"):
        open_source(str(tmp_path / "c"), format="coco").shards()


def test_unknown_option_names_the_format(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "a.jpg").write_bytes(jpeg())
    with pytest.raises(DataError, match="folder"):
        open_source(str(d), format="folder", split="val")
