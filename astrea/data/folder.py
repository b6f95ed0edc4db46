"""An image folder: every image file below a directory (recursive, sorted by relative path).

Keys come from the relative path (``cats/IMG 1.jpg`` -> ``cats__IMG_1``, see ``key_from_relpath``), so
they are stable as long as the file stays where it is. Captions come from a sidecar ``.txt`` with the
same stem (``cats/IMG 1.txt``), labels from a sidecar ``.json`` object. A ``.txt`` with no image beside
it is a sample with ``error="missing image: ..."`` (counted, like a caption-only tar member).
Hidden files and folders (``.git``, ``.DS_Store``) are skipped; other non-image files are ignored.

Sharding: the sorted list is cut into shards of ``shard_size`` files (default 1000): ``00000``,
``00001``, ... Adding or removing files moves later files into other shards, so treat a folder as a
snapshot: after changing it, extract it under a new ``--dataset`` name.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from astrea.data.base import (
    DEFAULT_MAX_IMAGE_BYTES,
    DataError,
    Sample,
    ShardBase,
    check_directory_source,
    is_image_name,
    key_from_relpath,
    shard_name,
    unique_key,
)

FORMAT = "folder"
DEFAULT_SHARD_SIZE = 1000


SIDECAR_MAX_BYTES = 1 << 20  # a caption or labels file; anything bigger is not one


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def read_file(path: Path, rel: str, max_bytes: int, root: Path | None = None) -> tuple[bytes | None, str | None]:
    """(bytes, None) or (None, reason): a file that cannot be read is a failed sample, not a crash.

    Only regular files inside ``root`` are read: a FIFO would block the job forever and a device
    (``/dev/zero`` behind a symlink) never ends, so neither is opened for a blocking read; a symlink
    leading out of the source is refused. ``max_bytes`` is enforced while reading, not only from the
    size the file claims (a file that grows, a filesystem that lies)."""
    try:
        if root is not None and path.exists() and not path.resolve().is_relative_to(root.resolve()):
            return None, f"outside the source: {rel!r} is a symlink to a file outside the source folder"
        # O_NONBLOCK: opening a FIFO with no writer returns at once instead of waiting for one.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None, f"missing image: {rel!r} not found"
    except OSError as e:
        return None, f"unreadable: {rel!r}: {e.strerror or type(e).__name__}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, f"not a regular file: {rel!r} is {_kind(st.st_mode)}"
        if st.st_size > max_bytes:
            return None, f"file too large: {rel!r} is {st.st_size:,} bytes (limit max_image_bytes={max_bytes:,})"
        chunks, n = [], 0
        while True:
            b = os.read(fd, min(1 << 20, max_bytes + 1 - n))
            if not b:
                break
            chunks.append(b)
            n += len(b)
            if n > max_bytes:
                return None, f"file too large: {rel!r} grew past the limit max_image_bytes={max_bytes:,} while read"
        data = b"".join(chunks)
    except OSError as e:
        return None, f"unreadable: {rel!r}: {e.strerror or type(e).__name__}"
    finally:
        os.close(fd)
    if not data:
        return None, f"empty file: {rel!r} is 0 bytes"
    return data, None


def _sidecar_text(path: Path, root: Path | None = None) -> str | None:
    if not path.exists() and not path.is_symlink():
        return None
    data, _ = read_file(path, path.name, SIDECAR_MAX_BYTES, root)
    return data.decode("utf-8", errors="replace").strip() or None if data else None


def _sidecar_labels(path: Path, root: Path | None = None) -> tuple[dict[str, Any], str | None]:
    if not path.exists() and not path.is_symlink():
        return {}, None
    raw, problem = read_file(path, path.name, SIDECAR_MAX_BYTES, root)
    if raw is None:
        return {}, f"bad json: {problem}"
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError as e:
        return {}, f"bad json: {path.name!r}: {str(e)[:100]}"
    return (data, None) if isinstance(data, dict) else ({}, f"bad json: {path.name!r} is not an object")


class FolderShard(ShardBase):
    def __init__(self, name: str, root: Path, entries: list[tuple[str, bool]], max_image_bytes: int):
        super().__init__(name)
        self.root = root
        self.entries = entries  # (relative posix path, is_image); non-images are orphan .txt captions
        self.max_image_bytes = max_image_bytes

    def __len__(self) -> int:
        return len(self.entries)

    def _samples(self) -> Iterator[Sample]:
        used: set[str] = set()
        for rel, is_image in self.entries:
            path = self.root / rel
            stem = path.with_suffix("")
            key = unique_key(key_from_relpath(rel), rel, used)
            caption = _sidecar_text(stem.with_name(stem.name + ".txt"), self.root)
            labels, bad_json = _sidecar_labels(stem.with_name(stem.name + ".json"), self.root)
            labels = {**labels, "path": rel}
            if bad_json:  # a malformed sidecar only loses the labels; the image is still usable
                labels["labels_error"] = bad_json
            if not is_image:
                yield Sample(key, None, caption, labels, f"missing image: {rel!r} has no image beside it")
                continue
            data, problem = read_file(path, rel, self.max_image_bytes, self.root)
            yield Sample(key, data, caption, labels, problem)


class FolderSource:
    format = FORMAT

    def __init__(self, path: str | Path, name: str | None = None, *, shard_size: int = DEFAULT_SHARD_SIZE,
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES):
        self.path = check_directory_source(path, shard_size, max_image_bytes)
        self.name = name or self.path.name
        self.shard_size = int(shard_size)
        self.max_image_bytes = max_image_bytes
        self._shards: list[FolderShard] | None = None

    def entries(self) -> list[tuple[str, bool]]:
        images: set[str] = set()
        texts: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.path):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = Path(dirpath).relative_to(self.path).as_posix()
            for f in filenames:
                if f.startswith("."):
                    continue
                rel = f if rel_dir == "." else f"{rel_dir}/{f}"
                if is_image_name(f):
                    images.add(rel)
                elif f.lower().endswith(".txt"):
                    texts.append(rel)
        if not images:  # captions alone are not an image dataset
            return []
        stems = {r.rsplit(".", 1)[0] for r in images}
        orphans = [t for t in texts if t.rsplit(".", 1)[0] not in stems]
        return sorted([(r, True) for r in images] + [(t, False) for t in orphans])

    def shards(self) -> list[FolderShard]:
        if self._shards is None:
            entries = self.entries()
            if not entries:
                raise DataError(f"{self.path}: no image files found (looked for "
                                "jpg, jpeg, png, webp, bmp, gif, tif, tiff, recursively)")
            n = self.shard_size
            self._shards = [FolderShard(shard_name(i // n), self.path, entries[i:i + n], self.max_image_bytes)
                            for i in range(0, len(entries), n)]
        return list(self._shards)

    def count(self) -> int:
        return sum(len(s) for s in self.shards())

    def __repr__(self) -> str:
        return f"FolderSource({str(self.path)!r})"
