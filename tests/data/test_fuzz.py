"""Readers against hostile input: random member names and a tar cut at every block boundary.

The invariants every reader promises (astrea/data/base.py), checked on many inputs at once:
iteration never raises, every key is safe (``check_key``) and unique within its shard, iterating
twice gives the same samples, and nothing is written anywhere while reading.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import pytest

from astrea.data import open_source
from astrea.data.base import check_key
from tests.data.builders import jpeg, write_tar

# Pieces that hostile or just sloppy tar writers put in member names.
PIECES = ["..", ".", "/", "\\", "a", "000001", "x y", "\x00", "\n", "\x1b", "é", "日本", "C:", "~", "-", "_",
          ".jpg", ".txt", ".json", ".png", ".JPG", ".tar.gz", "//", "./", "../", "key.with.dots"]


def _tree_snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _check_invariants(samples: list) -> None:
    keys = [s.key for s in samples]
    for s in samples:
        assert check_key(s.key) is None, (s.key, s.error)
        if s.error is None:
            assert s.image, s  # an ok sample has image bytes
        else:
            assert ":" in s.error or s.error == "missing image", s.error  # "kind: detail"
    assert len(keys) == len(set(keys)), keys


def _random_name(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 5)))


@pytest.mark.parametrize("seed", range(6))
def test_random_member_names_never_raise_and_give_safe_unique_keys(tmp_path, seed):
    rng = random.Random(seed)
    img = jpeg()
    members = []
    for _ in range(40):
        name = _random_name(rng)
        if "\x00" in name:  # tar headers end names at NUL; what comes back is the prefix, still checked
            name = name.replace("\x00", "")
        members.append((name or "x", img if rng.random() < 0.6 else b"caption"))
    d = tmp_path / "ds"
    write_tar(d / "00000.tar", members)
    before = _tree_snapshot(tmp_path)
    src = open_source(str(d))
    first = list(src.shards()[0])
    second = list(src.shards()[0])
    _check_invariants(first)
    assert [(s.key, s.image, s.error) for s in first] == [(s.key, s.image, s.error) for s in second]
    assert _tree_snapshot(tmp_path) == before  # reading wrote nothing, inside or outside the dataset


def _tar_bytes(n: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for i in range(n):
            key = f"{i:09d}"
            for ext, data in (("jpg", jpeg(40 + i, 30)), ("json", json.dumps({"key": key}).encode()),
                              ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_tar_cut_at_every_block_boundary(tmp_path):
    """A copy interrupted anywhere: the samples before the damage come back intact, the loss is
    reported (shard.errors + a failed sample), and a cut never makes a good sample out of a partial one."""
    full = _tar_bytes(4)
    d = tmp_path / "ds"
    d.mkdir()
    ref = {s.key: s.image for s in open_source(str(_write(d, "00000.tar", full))).shards()[0]}
    assert len(ref) == 4 and all(ref.values())
    for cut in range(0, len(full), 512):
        path = _write(d, "00000.tar", full[:cut])
        shard = open_source(str(path)).shards()[0]
        samples = list(shard)
        _check_invariants(samples)
        good = [s for s in samples if s.ok]
        for s in good:
            assert ref.get(s.key) == s.image, (cut, s.key)  # intact or absent, never partial
        if len(good) < 4:
            # Everything lost is visible: an error for the shard and at least one failed sample.
            assert shard.errors, (cut, [(s.key, s.error) for s in samples])
            assert any(s.error and s.error.startswith("truncated tar") for s in samples), cut


def _write(d: Path, name: str, data: bytes) -> Path:
    p = d / name
    p.write_bytes(data)
    return p


def test_cut_inside_member_data_and_garbage_tail(tmp_path):
    full = _tar_bytes(3)
    d = tmp_path / "ds"
    d.mkdir()
    with tarfile.open(fileobj=io.BytesIO(full)) as tf:
        last = tf.getmembers()[-1]
    # tarfile pads archives with zeros to 10 KiB, so a cut near the file's end may cut only padding:
    # cut inside the last member's data instead
    for cut in (700, len(full) // 2 + 13, last.offset_data + last.size - 3):
        shard = open_source(str(_write(d, "00000.tar", full[:cut]))).shards()[0]
        _check_invariants(list(shard))
        assert shard.errors
    # random bytes after a valid prefix: never a crash
    rng = random.Random(0)
    junk = full[: len(full) // 2] + bytes(rng.randrange(256) for _ in range(3000))
    shard = open_source(str(_write(d, "00000.tar", junk))).shards()[0]
    _check_invariants(list(shard))


def test_folder_with_hostile_file_names(tmp_path):
    d = tmp_path / "photos"
    (d / "sub dir" / "deeper").mkdir(parents=True)
    names = ["a.b.c.jpg", "sub dir/x y.png", "sub dir/deeper/a..jpg", "é日本.jpg", "-lead.JPG", "a_b_c.jpg",
             "sub dir/deeper/z.jpeg", "dup.jpg", "dup.png", "nl\nname.jpg"]
    for n in names:
        (d / n).write_bytes(jpeg())
    before = _tree_snapshot(tmp_path)
    src = open_source(str(d), format="folder", shard_size=3)
    samples = [s for sh in src.shards() for s in sh]
    assert len(samples) == len(names)
    # keys are made safe per shard, and a collision ("a.b.c" vs "a_b_c", "dup.jpg" vs "dup.png") gets a
    # hash of the file's own path instead of losing the image
    for sh in src.shards():
        _check_invariants(list(sh))
    assert all(s.ok for s in samples), [(s.key, s.error) for s in samples if not s.ok]
    by_path = {s.labels["path"]: s.key for s in samples}
    assert by_path["a.b.c.jpg"] == "a_b_c" and by_path["a_b_c.jpg"].startswith("a_b_c-")
    assert by_path["dup.jpg"] == "dup" and by_path["dup.png"].startswith("dup-")
    assert by_path["sub dir/deeper/a..jpg"] == "sub_dir__deeper__a_"
    # the same keys on every listing: they depend on paths, not on reading order or time
    assert [s.key for sh in open_source(str(d), format="folder", shard_size=3).shards() for s in sh] == \
        [s.key for s in samples]
    assert _tree_snapshot(tmp_path) == before
