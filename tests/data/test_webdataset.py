"""The img2dataset WebDataset reader on tars written on the fly, bad members included."""

from __future__ import annotations

import json
import tarfile

import pytest

from astrea.data import open_source
from astrea.data.base import check_key
from astrea.data.webdataset import member_name_problem, split_member_name
from tests.data.builders import jpeg, write_tar


def _sample_members(key: str, caption: str, labels: dict | None = None, image: bytes | None = None):
    meta = {"key": key, "status": "success", "caption": caption}
    if labels is not None:
        meta["labels"] = labels
    return [(f"{key}.jpg", image if image is not None else jpeg()), (f"{key}.json", json.dumps(meta).encode()),
            (f"{key}.txt", caption.encode())]


def test_reads_keys_captions_labels_in_order(tmp_path):
    d = tmp_path / "ds"
    write_tar(d / "00000.tar", _sample_members("000000000", "a red thing", {"classes": ["red"]})
              + _sample_members("000000001", "another"))
    write_tar(d / "00001.tar", _sample_members("000010000", "third"))
    src = open_source(str(d))
    assert src.name == "ds"
    assert [s.name for s in src.shards()] == ["00000", "00001"]
    first = list(src.shards()[0])
    assert [s.key for s in first] == ["000000000", "000000001"]
    assert first[0].caption == "a red thing" and first[0].labels == {"classes": ["red"]}
    assert first[0].image == jpeg() and first[0].ok
    # iterating twice gives the same samples
    assert [(s.key, s.image) for s in src.shards()[0]] == [(s.key, s.image) for s in first]
    # no stats / parquet: the size hint comes from the tar's headers
    assert len(src.shards()[0]) == 2


def test_caption_from_json_when_no_txt(tmp_path):
    d = tmp_path / "ds"
    write_tar(d / "00000.tar", [("k1.jpg", jpeg()), ("k1.json", json.dumps({"caption": "from json"}).encode())])
    (s,) = list(open_source(str(d)).shards()[0])
    assert s.caption == "from json" and s.ok


@pytest.mark.parametrize("name", ["../x.jpg", "/abs/x.jpg", "dir/x.jpg", "a\\b.jpg", ".jpg", "..jpg"])
def test_bad_member_names_never_become_keys(tmp_path, name):
    d = tmp_path / "ds"
    write_tar(d / "00000.tar", [(name, jpeg())] + _sample_members("good", "fine"))
    out = list(open_source(str(d)).shards()[0])
    assert out[0].image is None
    assert out[0].error.startswith("bad member name: ") and repr(name) in out[0].error
    assert check_key(out[0].key) is None and out[0].key.startswith("invalid-key-")
    assert out[1].key == "good" and out[1].ok  # the job goes on
    assert not (tmp_path / "x.jpg").exists() and not (d / "x.jpg").exists()


def test_member_name_rules():
    assert split_member_name("000000001.jpg") == ("000000001", "jpg")
    assert split_member_name("k.seg.png") == ("k", "seg.png")
    assert member_name_problem("000000001.jpg") is None
    assert "parent" in member_name_problem("../x.jpg")
    assert "absolute" in member_name_problem("/etc/x.jpg")
    assert member_name_problem("") == "empty name"


def test_caption_without_image_zero_byte_and_non_image_members(tmp_path):
    d = tmp_path / "ds"
    write_tar(d / "00000.tar", [
        ("k1.txt", b"caption only"), ("k1.json", b"{}"),
        ("k2.jpg", b""), ("k2.txt", b"empty image"),
        ("k3.jpg", jpeg()), ("k3.exe", b"MZ..."), ("k3.txt", b"ok"),
        ("k4.json", b"{not json"), ("k4.jpg", jpeg()),
    ])
    shard = open_source(str(d)).shards()[0]
    out = {s.key: s for s in shard}
    assert out["k1"].image is None and out["k1"].error == "missing image" and out["k1"].caption == "caption only"
    assert out["k2"].image == b"" and out["k2"].error is None  # the expert's decoder reports "empty file"
    assert out["k3"].ok and out["k3"].caption == "ok"
    assert out["k4"].ok  # unreadable metadata does not spoil the image
    assert shard.ignored == 1  # k3.exe


def test_duplicate_and_oversized(tmp_path):
    d = tmp_path / "ds"
    write_tar(d / "00000.tar", [("k1.jpg", jpeg()), ("k2.txt", b"x"), ("k1.jpg", jpeg()), ("big.jpg", b"\xff" * 5000)])
    out = list(open_source(str(d), max_image_bytes=1000).shards()[0])
    assert [s.key for s in out[:2]] == ["k1", "k2"]
    assert out[2].error.startswith("duplicate key") and out[2].image is None
    assert out[3].key == "big" and out[3].error.startswith("too large") and out[3].image is None


def test_symlink_and_directory_members_are_skipped(tmp_path):
    d = tmp_path / "ds"
    link = tarfile.TarInfo("evil.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    folder = tarfile.TarInfo("sub")
    folder.type = tarfile.DIRTYPE
    write_tar(d / "00000.tar", [("k1.jpg", jpeg())], extra=[link, folder])
    shard = open_source(str(d)).shards()[0]
    out = list(shard)
    assert out[0].ok
    assert out[1].key == "evil" and out[1].error == "missing image"  # never followed
    assert shard.ignored >= 1


@pytest.mark.parametrize("cut", [0.35, 0.75, 0.999, 1.0])
def test_truncated_tar_yields_what_was_read_then_an_error(tmp_path, cut):
    d = tmp_path / "ds"
    members = []
    for i in range(6):
        members += _sample_members(f"{i:09d}", f"caption {i}", image=jpeg(40 + i, 30))
    tar = write_tar(d / "00000.tar", members)
    with tarfile.open(tar) as tf:
        last = tf.getmembers()[-1]
        data_end = last.offset_data + (last.size + 511) // 512 * 512  # before the end-of-archive blocks
    tar.write_bytes(tar.read_bytes()[: int(data_end * cut)])
    shard = open_source(str(d)).shards()[0]
    out = list(shard)  # never raises
    assert out[-1].key == "00000__truncated" and out[-1].error.startswith("truncated tar: 00000.tar")
    good = [s for s in out[:-1] if s.ok]
    assert [s.key for s in good] == [f"{i:09d}" for i in range(len(good))]
    assert all(s.image == jpeg(40 + i, 30) for i, s in enumerate(good))
    assert len(good) <= 6 and shard.errors and shard.errors[0] == out[-1].error


def test_garbage_tar(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    (d / "00000.tar").write_bytes(b"this is not a tar file at all" * 50)
    out = list(open_source(str(d)).shards()[0])
    assert len(out) == 1 and out[0].error.startswith("truncated tar")


def test_non_unit_tar_names_get_positional_shard_names(tmp_path):
    d = tmp_path / "ds"
    write_tar(d / "train.part.0.tar", _sample_members("a", "x"))
    write_tar(d / "train.part.1.tar", _sample_members("b", "y"))
    assert [s.name for s in open_source(str(d)).shards()] == ["00000", "00001"]


def test_single_tar_file_and_errors(tmp_path):
    tar = write_tar(tmp_path / "00007.tar", _sample_members("a", "x"))
    src = open_source(str(tar))
    assert [s.name for s in src.shards()] == ["00007"]
    with pytest.raises(Exception, match="max_image_bytes"):
        open_source(str(tar), max_image_bytes=0)


def test_parquet_successes_missing_from_a_truncated_tar_are_counted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "ds"
    keys = [f"{i:09d}" for i in range(5)]
    members = []
    for k in keys:
        members += _sample_members(k, f"caption {k}")
    tar = write_tar(d / "00000.tar", members)
    pq.write_table(pa.table({"key": keys + ["000000005"], "status": ["success"] * 5 + ["failed_to_download"]}),
                   d / "00000.parquet")
    with tarfile.open(tar) as tf:
        cut = tf.getmember("000000002.jpg").offset  # cut exactly at a header: tarfile alone sees no error
    tar.write_bytes(tar.read_bytes()[:cut])
    out = list(open_source(str(d)).shards()[0])
    assert [s.key for s in out[:2]] == keys[:2] and all(s.ok for s in out[:2])
    assert [(s.key, s.error.split(":")[0]) for s in out[2:5]] == [(k, "missing from tar") for k in keys[2:]]
    assert out[5].key == "00000__truncated" and len(out) == 6  # the failed download is not re-reported


def test_unreadable_parquet_does_not_stop_reading(tmp_path):
    d = tmp_path / "ds"
    write_tar(d / "00000.tar", _sample_members("a", "x"))
    (d / "00000.parquet").write_bytes(b"not parquet")
    shard = open_source(str(d)).shards()[0]
    out = list(shard)
    assert [s.key for s in out] == ["a"] and out[0].ok
    assert shard.errors and shard.errors[0].startswith("unreadable index 00000.parquet")


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="needs FIFOs")
def test_sidecars_that_are_not_regular_files_never_block(tmp_path):
    """A FIFO named like img2dataset's parquet or stats file (issue 14, item 5) would block the reader
    (no writer ever comes); it is skipped with a reason and the tar is read."""
    import os
    import threading

    d = tmp_path / "ds"
    write_tar(d / "00000.tar", _sample_members("a", "x") + _sample_members("b", "y"))
    os.mkfifo(d / "00000.parquet")
    os.mkfifo(d / "00000_stats.json")
    shard = open_source(str(d)).shards()[0]
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(n=len(shard), samples=list(shard)), daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "a FIFO sidecar blocked the reader"
    assert out["n"] == 2 and [s.key for s in out["samples"]] == ["a", "b"]
    assert shard.errors == ["index 00000.parquet is not a regular file (skipped)"]
