"""Image folder and COCO sources on fixture data written on the fly."""

from __future__ import annotations

import json

import pytest

from astrea.data import open_source
from astrea.data.base import DataError
from tests.data.builders import jpeg


def test_folder_recursive_sorted_sidecars_and_sharding(tmp_path):
    d = tmp_path / "photos"
    (d / "cats").mkdir(parents=True)
    (d / "b.jpg").write_bytes(jpeg(colour=(1, 2, 3)))
    (d / "a.png").write_bytes(jpeg())  # content is not checked here: the expert's decoder does that
    (d / "a.txt").write_text("caption of a\n")
    (d / "cats" / "IMG 1.v2.jpg").write_bytes(jpeg())
    (d / "cats" / "orphan.txt").write_text("no image for me")
    (d / "notes.md").write_text("ignored")
    (d / ".hidden.jpg").write_bytes(jpeg())
    (d / "empty.jpg").write_bytes(b"")
    src = open_source(str(d), shard_size=2)
    assert src.name == "photos"
    shards = src.shards()
    assert [s.name for s in shards] == ["00000", "00001", "00002"]
    samples = [s for sh in shards for s in sh]
    assert [s.key for s in samples] == ["a", "b", "cats__IMG_1_v2", "cats__orphan", "empty"]
    assert samples[0].caption == "caption of a" and samples[0].ok
    assert samples[3].image is None and samples[3].error.startswith("missing image")
    # same failure kind ("empty file") as the expert's decoder gives a zero-byte tar member
    assert samples[4].image is None and samples[4].error.startswith("empty file")
    assert [s.key for s in src.shards()[0]] == ["a", "b"]  # stable across iterations


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no image files"):
        (tmp_path / "e").mkdir()
        open_source(str(tmp_path / "e"), format="folder").shards()
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "x.jpg").write_bytes(jpeg())
    with pytest.raises(DataError, match="shard_size"):
        open_source(str(tmp_path / "f"), shard_size=0)


def _coco(tmp_path):
    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    for i in (1, 2, 3):
        (root / "val2017" / f"{i:012d}.jpg").write_bytes(jpeg(100, 50))
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 100, "height": 50} for i in (3, 1, 2)]
    images.append({"id": 4, "file_name": "../../etc/passwd", "width": 100, "height": 50})
    instances = {
        "images": images,
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 18, "bbox": [10, 5, 50, 20], "area": 1000, "iscrowd": 0,
             "segmentation": [[10, 5, 60, 5, 60, 25, 10, 25]]},
            {"id": 11, "image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 50], "area": 5000, "iscrowd": 1,
             "segmentation": {"size": [50, 100], "counts": [0, 5000]}},
            {"id": 12, "image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1]},
        ],
    }
    captions = {"images": images, "annotations": [
        {"id": 21, "image_id": 1, "caption": "a dog next to a person"},
        {"id": 20, "image_id": 1, "caption": "first caption"},
        {"id": 22, "image_id": 2, "caption": "an empty room"}]}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(instances))
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps(captions))
    return root


def test_coco_captions_classes_boxes_masks(tmp_path):
    src = open_source(str(_coco(tmp_path)), shard_size=3)  # format detected from annotations/
    assert src.format == "coco"
    shards = src.shards()
    assert [s.name for s in shards] == ["00000", "00001"] and len(shards[0]) == 3
    samples = [s for sh in shards for s in sh]
    assert [s.key for s in samples[:3]] == ["000000000001", "000000000002", "000000000003"]  # by image id
    one = samples[0]
    assert one.ok and one.caption == "first caption"  # lowest caption id
    assert one.labels["captions"] == ["first caption", "a dog next to a person"]
    assert one.labels["classes"] == ["dog", "person"]
    assert one.labels["boxes"][0] == pytest.approx([0.1, 0.1, 0.6, 0.5])
    assert one.labels["masks"][0] == [[10, 5, 60, 5, 60, 25, 10, 25]]  # masks as given
    assert one.labels["masks"][1]["size"] == [50, 100]
    assert samples[2].labels["classes"] == [] and samples[2].caption is None
    bad = samples[3]
    assert bad.image is None and bad.error.startswith("invalid path")  # never read outside ROOT
    assert any("99" in w or "image id" in w for w in src.warnings)


def test_coco_split_and_bad_json(tmp_path):
    root = _coco(tmp_path)
    with pytest.raises(DataError, match="found splits: val2017"):
        open_source(str(root), format="coco", split="train2017")
    (root / "annotations" / "instances_val2017.json").write_text("{broken")
    with pytest.raises(DataError, match="not valid JSON"):
        open_source(str(root), format="coco").shards()
