"""img2dataset's WebDataset output (and any WebDataset tar directory): one source shard per tar.

img2dataset (``output_format="webdataset"``) writes, per shard ``NNNNN``:

    NNNNN.tar           KEY.jpg, KEY.json, KEY.txt per image (members sorted by extension, one key after another)
    NNNNN.parquet       one row per input url: key, url, caption, status, error_message, width, height, ...
    NNNNN_stats.json    count, successes, failed_to_download, failed_to_resize, ...

Keys are kept exactly as img2dataset made them (``000010003`` = shard 1, row 3). The tar is read as a
stream (``tarfile`` mode ``r|``): memory holds one member at a time, never the whole tar.

Grouping follows WebDataset: a member's key is its name up to the first dot of its base name and
consecutive members with the same key form one sample. Caption: ``KEY.txt``, else ``caption`` in
``KEY.json``. Labels: ``labels`` in ``KEY.json`` (an object, or a JSON string as img2dataset passes
through a string column), plus ``url`` when present.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from astrea.data.base import DEFAULT_MAX_IMAGE_BYTES, IMAGE_EXTENSIONS, DataError, Sample, ShardBase

FORMAT = "webdataset"
_TAR_BLOCK = 512


@dataclass
class _Member:
    name: str
    data: bytes | None  # None: not read (problem says why)
    problem: str | None = None


def _split(name: str) -> tuple[str, str]:
    """``dir/000001.jpg`` -> (``dir/000001``, ``jpg``); WebDataset's rule: first dot of the base name."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head or name.startswith("/") else stem), (ext.lower() if dot else "")


class WebDatasetShard(ShardBase):
    def __init__(self, tar: Path, *, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES):
        stem = tar.name[: -len(".tar")]
        super().__init__(stem)
        self.tar = tar
        self.parquet = tar.with_name(f"{stem}.parquet")
        self.stats_file = tar.with_name(f"{stem}_stats.json")
        self.max_image_bytes = max_image_bytes

    # -- size, cheaply: img2dataset's stats say how many samples went into the tar ----------------
    def __len__(self) -> int:
        stats = self.stats()
        if isinstance(stats.get("successes"), int):
            return int(stats["successes"])
        ok = self.expected_keys()
        if ok is not None:
            return len(ok)
        return sum(1 for _ in self)

    def stats(self) -> dict[str, Any]:
        try:
            data = json.loads(self.stats_file.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def expected_keys(self) -> list[str] | None:
        """Keys img2dataset wrote into the tar (parquet rows with status ``success``), or None."""
        if not self.parquet.exists():
            return None
        import pyarrow.parquet as pq

        try:
            cols = pq.read_schema(self.parquet).names
            if "key" not in cols:
                return None
            t = pq.read_table(self.parquet, columns=[c for c in ("key", "status") if c in cols]).to_pydict()
        except Exception as e:  # a damaged index never stops the tar from being read
            self.errors.append(f"unreadable index: {self.parquet.name}: {type(e).__name__}: {str(e)[:120]}")
            return None
        status = t.get("status") or ["success"] * len(t["key"])
        return [str(k) for k, s in zip(t["key"], status, strict=True) if s == "success" and k is not None]

    # -- iteration ---------------------------------------------------------------------------
    def _samples(self) -> Iterator[Sample]:
        seen: set[str] = set()
        group: list[_Member] = []
        gkey: str | None = None
        for member in self._members():
            key, _ = _split(member.name)
            if group and key != gkey:
                seen.add(gkey)  # type: ignore[arg-type]
                yield self._sample(gkey, group)  # type: ignore[arg-type]
                group = []
            gkey = key
            group.append(member)
        if group:
            seen.add(gkey)  # type: ignore[arg-type]
            yield self._sample(gkey, group)  # type: ignore[arg-type]
        truncated = any(e.startswith("truncated tar") for e in self.errors)
        expected = self.expected_keys()
        if expected is not None:
            # img2dataset's index lists what it wrote: a key missing from the tar is lost data, counted.
            kind = "truncated tar" if truncated else "missing from tar"
            for key in expected:
                if key not in seen:
                    yield Sample(key, None, None, {}, f"{kind}: {self.parquet.name} lists this key as written "
                                                      f"but {self.tar.name} does not hold it")
        elif truncated:
            # Without an index the lost keys are unknown; one failed sample keeps the loss visible in counts.
            yield Sample("truncated-tar", None, None, {}, f"truncated tar: {self.tar.name} ends early; "
                                                          "the samples after this point are lost")

    def _members(self) -> Iterator[_Member]:
        """Regular members in tar order; problems become members with ``problem`` set, never exceptions."""
        try:
            f = open(self.tar, "rb")
        except OSError as e:
            self.errors.append(f"unreadable tar: {self.tar.name}: {e.strerror or e}")
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            end = 0  # offset just past the last member's data (rounded to the 512-byte block)
            try:
                tf = tarfile.open(fileobj=f, mode="r|")
            except tarfile.ReadError as e:
                self.errors.append(f"truncated tar: {self.tar.name}: {e}" if size else
                                   f"truncated tar: {self.tar.name} is empty (0 bytes)")
                return
            try:
                for info in tf:
                    end = info.offset_data + -(-info.size // _TAR_BLOCK) * _TAR_BLOCK
                    if info.isdir():
                        continue
                    if not info.isreg():
                        kind = ("symlink" if info.issym() else "hard link" if info.islnk() else "special file")
                        yield _Member(info.name, None, f"not a regular file: {info.name!r} is a {kind}")
                        continue
                    if info.size > self.max_image_bytes:
                        yield _Member(info.name, None, f"member too large: {info.name!r} is {info.size:,} bytes "
                                                       f"(limit max_image_bytes={self.max_image_bytes:,})")
                        continue
                    fo = tf.extractfile(info)
                    try:
                        data = fo.read() if fo is not None else b""
                    except (tarfile.ReadError, OSError, EOFError) as e:
                        yield _Member(info.name, None, f"truncated tar: member {info.name!r} is cut off ({e})")
                        self.errors.append(f"truncated tar: {self.tar.name}: member {info.name!r} is cut off")
                        return
                    if len(data) != info.size:
                        yield _Member(info.name, None, f"truncated tar: member {info.name!r} is cut off "
                                                       f"({len(data)} of {info.size} bytes)")
                        self.errors.append(f"truncated tar: {self.tar.name}: member {info.name!r} is cut off")
                        return
                    yield _Member(info.name, data)
            except (tarfile.TarError, OSError, EOFError) as e:
                self.errors.append(f"truncated tar: {self.tar.name}: {type(e).__name__}: {e}")
                return
            # tarfile's stream mode takes a header cut short for the end of the archive; a complete tar
            # ends with two zero blocks after the last member, so a shorter file lost its tail.
            if size < end + 2 * _TAR_BLOCK:
                self.errors.append(f"truncated tar: {self.tar.name} ends without the end-of-archive marker "
                                   f"({size:,} bytes)")

    def _sample(self, key: str, members: list[_Member]) -> Sample:
        image: bytes | None = None
        image_name: str | None = None
        caption: str | None = None
        meta: dict[str, Any] = {}
        problems: list[str] = []
        others: list[str] = []
        for m in members:
            _, ext = _split(m.name)
            if m.problem is not None:
                if ext in IMAGE_EXTENSIONS or image is None:
                    problems.append(m.problem)
                continue
            if ext in IMAGE_EXTENSIONS:
                if image is None:
                    image, image_name = m.data, m.name
            elif ext == "txt":
                caption = _text(m.data)
            elif ext == "json":
                try:
                    loaded = json.loads(_text(m.data) or "null")
                    meta = loaded if isinstance(loaded, dict) else {}
                except ValueError:
                    problems.append(f"bad json: {m.name!r} is not valid JSON")
            else:
                others.append(m.name)
        if caption is None and isinstance(meta.get("caption"), str):
            caption = meta["caption"]
        labels = _labels(meta)
        if image is None:
            if problems:
                return Sample(key, None, caption, labels, problems[0])
            found = ", ".join(repr(m.name) for m in members)
            return Sample(key, None, caption, labels, f"missing image: the tar holds only {found}")
        if len(image) == 0:
            return Sample(key, None, caption, labels, f"empty file: {image_name!r} is 0 bytes")
        return Sample(key, image, caption, labels, None)


def _text(data: bytes | None) -> str | None:
    if data is None:
        return None
    return data.decode("utf-8", errors="replace")


def _labels(meta: dict[str, Any]) -> dict[str, Any]:
    labels = meta.get("labels")
    if isinstance(labels, str):  # img2dataset copies a string column through as a string
        try:
            labels = json.loads(labels)
        except ValueError:
            labels = {"text": labels}
    out: dict[str, Any] = dict(labels) if isinstance(labels, dict) else {}
    if isinstance(meta.get("url"), str):
        out.setdefault("url", meta["url"])
    return out


class WebDatasetSource:
    """A directory of ``NNNNN.tar`` shards (img2dataset output), or one ``.tar`` file."""

    format = FORMAT

    def __init__(self, path: str | Path, name: str | None = None, *, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES):
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such file or directory")
        if max_image_bytes < 1:
            raise DataError(f"max_image_bytes={max_image_bytes} must be >= 1")
        self.name = name or (self.path.stem if self.path.is_file() else self.path.name)
        self.max_image_bytes = max_image_bytes
        self._shards: list[WebDatasetShard] | None = None

    def shards(self) -> list[WebDatasetShard]:
        if self._shards is None:
            if self.path.is_file():
                if not self.path.name.endswith(".tar"):
                    raise DataError(f"{self.path}: a webdataset source is a directory of .tar shards or one .tar file")
                tars = [self.path]
            else:
                tars = sorted(p for p in self.path.iterdir() if p.name.endswith(".tar") and p.is_file())
            if not tars:
                raise DataError(f"{self.path}: no .tar shards found (expected img2dataset's NNNNN.tar files)")
            self._shards = [WebDatasetShard(t, max_image_bytes=self.max_image_bytes) for t in tars]
        return list(self._shards)

    def count(self) -> int | None:
        """Images, from img2dataset's stats files when every shard has one (cheap); else None."""
        total = 0
        for s in self.shards():
            n = s.stats().get("successes")
            if not isinstance(n, int):
                return None
            total += n
        return total

    def __repr__(self) -> str:
        return f"WebDatasetSource({str(self.path)!r})"
