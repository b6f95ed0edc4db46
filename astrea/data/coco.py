"""COCO-style datasets: an image folder plus ``annotations/instances_SPLIT.json`` and/or
``annotations/captions_SPLIT.json``.

Layout looked for (the official COCO download unpacked in one directory):

    ROOT/annotations/instances_val2017.json   categories, boxes, segmentation per object
    ROOT/annotations/captions_val2017.json    five captions per image
    ROOT/val2017/000000000139.jpg             images (also ROOT/images/val2017/, ROOT/images/, ROOT/)

Per image: ``caption`` = its first caption (lowest annotation id); ``labels`` = ``{"image_id", "split",
"file_name", "width", "height", "captions": [...], "classes": [...], "category_ids": [...],
"boxes": [[x1, y1, x2, y2], ...]`` (normalised to 0..1 by the image size), ``"masks": [...]``
(each object's ``segmentation`` exactly as the JSON gives it: a list of polygons in pixels, or an RLE
``{"size", "counts"}``), ``"iscrowd": [...]``, ``"areas": [...]}``.

Images are ordered by split, then image id, and cut into shards of ``shard_size`` (default 1000).
Keys are the file name's stem (``000000000139``), made safe by ``key_from_relpath``.
The annotation JSON is loaded once per process (COCO train2017's instances file is ~450 MB: expect
a few GB of RAM for it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from astrea.data.base import (
    DEFAULT_MAX_IMAGE_BYTES,
    DataError,
    Sample,
    ShardBase,
    check_directory_source,
    key_from_relpath,
    shard_name,
    unique_key,
)
from astrea.data.folder import read_file

FORMAT = "coco"
DEFAULT_SHARD_SIZE = 1000
_ANN_RE = re.compile(r"^(instances|captions)_(.+)\.json$")


def find_annotations(root: Path) -> dict[str, dict[str, Path]]:
    """split -> {"instances": path, "captions": path} for the annotation files under ROOT/annotations."""
    ann_dir = root / "annotations"
    found: dict[str, dict[str, Path]] = {}
    if ann_dir.is_dir():
        for p in sorted(ann_dir.iterdir()):
            m = _ANN_RE.match(p.name)
            if m and p.is_file():
                found.setdefault(m.group(2), {})[m.group(1)] = p
    return found


def _load(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({str(e)[:120]}); re-download or fix the file") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a COCO annotation object with 'images', got {type(data).__name__}")
    return data


def _norm_box(bbox: Any, w: Any, h: Any) -> list[float] | None:
    try:
        x, y, bw, bh = (float(v) for v in bbox)
        w, h = float(w), float(h)
    except (TypeError, ValueError):
        return None
    if w <= 0 or h <= 0:
        return None
    clip = lambda v: round(min(max(v, 0.0), 1.0), 6)  # noqa: E731
    return [clip(x / w), clip(y / h), clip((x + bw) / w), clip((y + bh) / h)]


def _safe_rel(file_name: Any) -> str | None:
    """A relative path inside the image folder, or None: a file name from JSON never escapes ROOT."""
    if not isinstance(file_name, str) or not file_name or "\\" in file_name or "\x00" in file_name:
        return None
    p = PurePosixPath(file_name)
    if p.is_absolute() or any(part in ("..", "") for part in p.parts):
        return None
    return p.as_posix()


class CocoShard(ShardBase):
    def __init__(self, name: str, source: CocoSource, images: list[dict[str, Any]]):
        super().__init__(name)
        self.source = source
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def _samples(self) -> Iterator[Sample]:
        used: set[str] = set()
        for img in self.images:
            labels = dict(img["labels"])
            caps = labels.get("captions") or []
            caption = caps[0] if caps else None
            rel = _safe_rel(img.get("file_name"))
            stem = str(img.get("file_name") or img.get("id"))
            key = unique_key(key_from_relpath(PurePosixPath(stem).name), f"{img['split']}/{stem}", used)
            if rel is None:
                yield Sample(key, None, caption, labels,
                             f"invalid path: file_name {img.get('file_name')!r} is not a relative path inside the image folder")
                continue
            image_dir = self.source.image_dir(img["split"])
            if image_dir is None:
                yield Sample(key, None, caption, labels, f"missing image: no image folder for split {img['split']!r}")
                continue
            data, problem = read_file(image_dir / rel, rel, self.source.max_image_bytes, image_dir)
            yield Sample(key, data, caption, labels, problem)


class CocoSource:
    format = FORMAT

    def __init__(self, path: str | Path, name: str | None = None, *, split: str | list[str] | None = None,
                 images_dir: str | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES):
        self.path = check_directory_source(path, shard_size, max_image_bytes)
        self.name = name or self.path.name
        self.shard_size = int(shard_size)
        self.max_image_bytes = max_image_bytes
        self.images_dir = Path(images_dir).expanduser() if images_dir else None
        self.annotations = find_annotations(self.path)
        if not self.annotations:
            raise DataError(f"{self.path}: no COCO annotations found (expected annotations/instances_SPLIT.json "
                            "or annotations/captions_SPLIT.json)")
        splits = [split] if isinstance(split, str) else list(split) if split else sorted(self.annotations)
        for s in splits:
            if s not in self.annotations:
                raise DataError(f"split={s!r}: no annotations for it in {self.path / 'annotations'}; "
                                f"found splits: {', '.join(sorted(self.annotations))}")
        self.splits = splits
        self.warnings: list[str] = []  # annotation problems that lose a label, never an image
        self._shards: list[CocoShard] | None = None

    def image_dir(self, split: str) -> Path | None:
        if self.images_dir is not None:
            return self.images_dir
        for cand in (self.path / split, self.path / "images" / split, self.path / "images", self.path):
            if cand.is_dir():
                return cand
        return None

    def _index(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for split in self.splits:
            files = self.annotations[split]
            images: dict[Any, dict[str, Any]] = {}
            docs = {kind: _load(p) for kind, p in sorted(files.items())}
            for kind, doc in docs.items():
                for im in doc.get("images") or []:
                    if isinstance(im, dict) and "id" in im:
                        images.setdefault(im["id"], im)
            labels: dict[Any, dict[str, Any]] = {
                iid: {"image_id": iid, "split": split, "file_name": im.get("file_name"), "width": im.get("width"),
                      "height": im.get("height"), "captions": [], "classes": [], "category_ids": [], "boxes": [],
                      "masks": [], "iscrowd": [], "areas": []}
                for iid, im in images.items()}
            if "captions" in docs:
                anns = sorted((a for a in docs["captions"].get("annotations") or [] if isinstance(a, dict)),
                              key=lambda a: (str(type(a.get("id"))), a.get("id") or 0))
                for a in anns:
                    lab = labels.get(a.get("image_id"))
                    if lab is not None and isinstance(a.get("caption"), str):
                        lab["captions"].append(a["caption"].strip())
            if "instances" in docs:
                cats = {c.get("id"): c.get("name") for c in docs["instances"].get("categories") or [] if isinstance(c, dict)}
                anns = sorted((a for a in docs["instances"].get("annotations") or [] if isinstance(a, dict)),
                              key=lambda a: (str(type(a.get("id"))), a.get("id") or 0))
                orphans = 0
                for a in anns:
                    lab = labels.get(a.get("image_id"))
                    if lab is None:
                        orphans += 1
                        continue
                    cid = a.get("category_id")
                    box = _norm_box(a.get("bbox"), lab["width"], lab["height"])
                    lab["classes"].append(cats.get(cid) or f"unknown-{cid}")
                    lab["category_ids"].append(cid)
                    lab["boxes"].append(box)
                    lab["masks"].append(a.get("segmentation"))
                    lab["iscrowd"].append(int(a.get("iscrowd") or 0))
                    lab["areas"].append(a.get("area"))
                if orphans:
                    self.warnings.append(f"{files['instances'].name}: {orphans} annotation(s) name an image id "
                                         "that the file does not list; ignored")
            for iid in sorted(images, key=lambda i: (str(type(i)), i)):
                out.append({"id": iid, "split": split, "file_name": images[iid].get("file_name"), "labels": labels[iid]})
        return out

    def shards(self) -> list[CocoShard]:
        if self._shards is None:
            images = self._index()
            if not images:
                raise DataError(f"{self.path}: the annotations list no images")
            n = self.shard_size
            self._shards = [CocoShard(shard_name(i // n), self, images[i:i + n]) for i in range(0, len(images), n)]
        return list(self._shards)

    def count(self) -> int:
        return sum(len(s) for s in self.shards())

    def __repr__(self) -> str:
        return f"CocoSource({str(self.path)!r}, splits={self.splits})"
