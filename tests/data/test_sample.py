"""The embedded sample dataset: img2dataset's exact layout, deterministic, bad members present."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from astrea.data import catalog, open_source
from astrea.data.base import DataError
from astrea.data.sample import PARQUET_COLUMNS, ensure_sample, make_sample


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    return make_sample(tmp_path_factory.mktemp("s") / "sample", images=10, shards=2, seed=0)


def test_img2dataset_layout(sample_dir):
    names = sorted(p.name for p in sample_dir.iterdir())
    assert names == ["00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar",
                     "00001_stats.json", "instructions.json", "sample.json"]
    with tarfile.open(sample_dir / "00000.tar") as tf:
        members = tf.getnames()
        meta = json.load(tf.extractfile("000000000.json"))
    assert members[:3] == ["000000000.jpg", "000000000.json", "000000000.txt"]
    assert len(members) == 15  # 5 images x (jpg, json, txt)
    for k in ("url", "key", "status", "error_message", "width", "height", "original_width", "original_height",
              "caption", "sha256", "labels"):
        assert k in meta
    assert meta["key"] == "000000000" and meta["status"] == "success" and meta["error_message"] is None
    table = pq.read_table(sample_dir / "00001.parquet")
    assert tuple(table.schema.names) == PARQUET_COLUMNS
    # img2dataset keys: shard * 10**4 + row, 9 digits
    assert table.column("key").to_pylist() == [f"{10000 + i:09d}" for i in range(7)]
    stats = json.loads((sample_dir / "00001_stats.json").read_text())
    assert {"count", "successes", "failed_to_download", "failed_to_resize", "duration", "start_time",
            "end_time", "status_dict"} <= set(stats)
    assert stats["count"] == 7 and stats["successes"] == 7


def test_contents_photos_scenes_and_bad_members(sample_dir):
    from PIL import Image

    from astrea.schemas.mask_rle import decode

    samples = [s for sh in open_source(str(sample_dir)).shards() for s in sh]
    assert len(samples) == 12
    photos = [s for s in samples if s.labels.get("source", "").startswith("skimage.data.")]
    scenes = [s for s in samples if s.labels.get("source") == "generated"]
    broken = [s for s in samples if s.labels.get("source") == "broken"]
    assert len(photos) == 5 and len(scenes) == 5 and len(broken) == 2
    assert {s.key for s in broken} == {"000010005", "000010006"}  # end of the last shard
    assert sorted(len(s.image) == 0 for s in broken) == [False, True]
    for s in scenes:
        img = np.asarray(Image.open(io.BytesIO(s.image)).convert("RGB"))
        assert s.caption.endswith("background") and len(s.labels["classes"]) == len(s.labels["boxes"])
        for cls, box, m in zip(s.labels["classes"], s.labels["boxes"], s.labels["masks"]):
            assert cls in s.caption and m["label"] == cls
            mask = decode(m["rle"])
            assert mask.shape == img.shape[:2] and mask.sum() == m["area"] > 0
            ys, xs = np.nonzero(mask)
            assert box == pytest.approx([xs.min() / 256, ys.min() / 256, (xs.max() + 1) / 256, (ys.max() + 1) / 256])
    # the truncated JPEG really does not decode
    trunc = next(s for s in broken if s.image)
    with pytest.raises(OSError):
        Image.open(io.BytesIO(trunc.image)).load()


def test_deterministic_and_seed_matters(tmp_path, sample_dir):
    again = make_sample(tmp_path / "again", images=10, shards=2, seed=0)
    other = make_sample(tmp_path / "other", images=10, shards=2, seed=1)
    for name in ("00000.tar", "00001.tar", "00000.parquet", "00001_stats.json"):
        assert (again / name).read_bytes() == (sample_dir / name).read_bytes()
    assert (other / "00001.tar").read_bytes() != (sample_dir / "00001.tar").read_bytes()


def test_no_bad(tmp_path):
    d = make_sample(tmp_path / "clean", images=4, shards=1, bad=False)
    samples = list(open_source(str(d)).shards()[0])
    assert len(samples) == 4 and all(s.image for s in samples)


def test_ensure_sample_reuses_registers_and_refuses_foreign_dirs(tmp_path):
    p = ensure_sample(tmp_path / "s", images=4, shards=1)
    assert catalog()["sample"] == {"format": "webdataset", "path": str(p)}
    stamp = (p / "00000.tar").stat().st_mtime_ns
    assert ensure_sample(tmp_path / "s", images=4, shards=1) == p
    assert (p / "00000.tar").stat().st_mtime_ns == stamp  # reused, not rewritten
    ensure_sample(tmp_path / "s", images=6, shards=1)  # other parameters: rewritten
    assert len(list(open_source("sample").shards()[0])) == 8
    (p / "00000.tar").unlink()  # incomplete: rewritten
    assert (ensure_sample(tmp_path / "s", images=6, shards=1) / "00000.tar").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("do not delete")
    with pytest.raises(DataError, match="not an astrea sample"):
        ensure_sample(foreign)
    assert (foreign / "thesis.tex").exists()
    with pytest.raises(DataError, match="shards"):
        ensure_sample(tmp_path / "x", images=1, shards=2)


def test_sample_name_is_written_on_first_use():
    src = open_source("sample")  # not in the (fresh, per-test) catalog: written to $ASTREA_HOME/sample
    assert src.name == "sample" and len(src.shards()) == 2
    assert "sample" in catalog()


def test_instruction_set_about_the_generated_scenes(sample_dir):
    """instructions.json (issue 16): LLaVA layout, one conversation per scene, answers from what was drawn."""
    from astrea.data.sample import NUMBERS, position
    from astrea.train.instructions import join, read_instructions

    convs = read_instructions(sample_dir / "instructions.json")
    scenes = {s.key: s for sh in open_source(str(sample_dir)).shards() for s in sh
              if s.labels.get("source") == "generated"}
    joined = join(convs, set(scenes))
    assert len(joined.by_key) == len(scenes) == 5 and len(joined.text_only) == 1 and not joined.unmatched
    for key, (conv,) in joined.by_key.items():
        objs = scenes[key].labels["masks"]
        (q1, a1), (q2, a2), (q3, a3) = [(conv.turns[i][1], conv.turns[i + 1][1]) for i in range(0, 6, 2)]
        assert q1 == "How many shapes are there?" and a1 == NUMBERS[len(objs)]
        colour, shape = q3.removeprefix("Where is the ").removesuffix("?").split(" ", 1)
        assert a2 == colour and shape in q2
        (obj,) = [o for o in objs if o["label"] == f"{colour} {shape}" and position(o["box"]) == a3]
