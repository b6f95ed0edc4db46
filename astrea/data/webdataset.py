"""img2dataset's WebDataset output: ``NNNNN.tar`` (+ ``NNNNN.parquet``, ``NNNNN_stats.json``) per shard.

Each tar holds, per successfully downloaded image, ``KEY.jpg`` (or another image extension),
``KEY.txt`` (caption) and ``KEY.json`` (img2dataset's metadata: url, key, status, width, ...; the
sample dataset adds ``labels``). img2dataset's keys are kept unchanged (``000010003`` = shard 1,
row 3).

Reading streams the tar (``tarfile`` in ``r|*`` mode): one member at a time, never the whole
archive in memory, gzip'd tars included. Members are grouped by key the way WebDataset does: the key
is the member name up to the first ``.`` of its file name, and consecutive members with the same key
form one sample.

Bad input never raises out of iteration (see docs/data.md, "Bad input"):

- a member whose name is unusable as a key (``../x.jpg``, ``/abs/x.jpg``, ``dir/x.jpg``, ``.jpg``,
  control characters) -> ``Sample(invalid-key-NNNNNN, None, error="bad member name: ...")``; the name
  is never used as a path and its bytes are never read;
- a caption/metadata without an image -> ``error="missing image"`` (caption kept);
- a zero-byte image -> delivered as ``b""`` (the expert's decoder reports it as an empty file);
- an image member above ``max_image_bytes`` -> ``error="too large: ..."``, not read into memory;
- members that are not regular files or have no recognised extension -> skipped, counted in
  ``shard.ignored``;
- a truncated or corrupt tar -> every sample read before the damage, then one
  ``Sample("NNNNN__truncated", None, error="truncated tar: ...")``; also in ``shard.errors``.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from astrea.data.base import (
    DEFAULT_MAX_IMAGE_BYTES,
    IMAGE_EXTENSIONS,
    SHARD_DAMAGE,
    DataError,
    Sample,
    ShardBase,
    check_key,
    shard_name,
)

# Store unit names must match this (astrea.shards); a tar whose stem does not is named by position.
_UNIT_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
# Metadata members: read (they are small) and used for caption / labels.
_TEXT_SUFFIXES = ("txt",)
_JSON_SUFFIXES = ("json",)
MAX_META_BYTES = 16 * 2**20


def split_member_name(name: str) -> tuple[str, str]:
    """``"000000001.jpg"`` -> ``("000000001", "jpg")``; WebDataset's rule: the key ends at the first
    ``.`` of the file name (directories stay in the key, which makes it unsafe on purpose)."""
    head, sep, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    return head + sep + stem, suffix.lower()


def member_name_problem(name: str) -> str | None:
    """Why a tar member name cannot give a key, or None. Checked before anything is read."""
    if not name:
        return "empty name"
    if name.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", name):
        return "absolute path"
    if any(part == ".." for part in re.split(r"[\\/]", name)):
        return "parent directory '..'"
    key, _ = split_member_name(name)
    reason = check_key(key)
    return f"key {key!r} {reason}" if reason else None


@dataclass
class WebDatasetConfig:
    """Options of the WebDataset reader (``open_source(..., format="webdataset", **options)``)."""

    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES

    def validate(self) -> None:
        if not isinstance(self.max_image_bytes, int) or self.max_image_bytes <= 0:
            raise DataError(f"max_image_bytes={self.max_image_bytes!r} must be a positive integer")


class WebDatasetShard(ShardBase):
    def __init__(self, name: str, tar: Path, cfg: WebDatasetConfig):
        super().__init__(name)
        self.tar = tar
        self.cfg = cfg
        self.ignored = 0  # members skipped by the latest iteration (not regular files, unknown suffix)

    # -- size hint -----------------------------------------------------------------------------
    def __len__(self) -> int:
        """Images img2dataset wrote into this tar: ``successes`` of ``NNNNN_stats.json`` when present,
        else parquet rows with status ``success``, else a scan of the tar's headers. A hint for
        progress and ``--limit``: bad members found while reading may add failed samples."""
        stem = self.tar.name[: -len(".tar")]
        stats = self.tar.with_name(f"{stem}_stats.json")
        try:
            # is_file(): only regular files; opening a FIFO named like a sidecar would block forever
            n = json.loads(stats.read_text()).get("successes") if stats.is_file() else None
            if isinstance(n, int) and n >= 0:
                return n
        except (OSError, ValueError, AttributeError):
            pass
        parquet = self.tar.with_name(f"{stem}.parquet")
        if parquet.is_file():
            try:
                status = _read_index(parquet, ["status"]).column("status").to_pylist()
                return sum(1 for s in status if s == "success")
            except Exception:  # unreadable index: fall back to the tar itself
                pass
        return self._count_images()

    def _count_images(self) -> int:
        keys: set[str] = set()
        try:
            with tarfile.open(self.tar, "r|*") as tf:
                for m in tf:
                    key, suffix = split_member_name(m.name)
                    if m.isfile() and suffix in IMAGE_EXTENSIONS:
                        keys.add(key)
        except (tarfile.TarError, OSError, EOFError):
            pass
        return len(keys)

    # -- iteration -----------------------------------------------------------------------------
    def _samples(self) -> Iterator[Sample]:
        """The tar's samples, then keys img2dataset's parquet lists as ``success`` that the tar lacks
        (``error="missing from tar: ..."``, so counts stay exact after damage), then the
        ``NNNNN__truncated`` sample when the tar is damaged."""
        seen: set[str] = set()
        truncated: Sample | None = None
        for sample in self._tar_samples():
            if sample.key == f"{self.name}__truncated" and sample.damages_shard:
                truncated = sample
                continue
            seen.add(sample.key)
            yield sample
        for key in self._listed_successes():
            if key not in seen:
                yield Sample(key, None, error=f"missing from tar: {self.tar.name} lacks a key that "
                                              f"{self.tar.name[:-4]}.parquet lists as success")
        if truncated is not None:
            yield truncated

    def _listed_successes(self) -> list[str]:
        parquet = self.tar.with_name(self.tar.name[: -len(".tar")] + ".parquet")
        if not parquet.exists():
            return []
        if not parquet.is_file():
            self.errors.append(f"index {parquet.name} is not a regular file (skipped)")
            return []
        try:
            t = _read_index(parquet, ["key", "status"])
            return [str(k) for k, st in zip(t.column("key").to_pylist(), t.column("status").to_pylist())
                    if st == "success" and k is not None]
        except Exception as e:  # an unreadable index never stops the images from being read
            self.errors.append(f"unreadable index {parquet.name}: {type(e).__name__}: {str(e)[:200]}")
            return []

    def _tar_samples(self) -> Iterator[Sample]:
        self.ignored = 0
        group: _Group | None = None
        try:
            tf = tarfile.open(self.tar, "r|*")
        except (tarfile.TarError, OSError, EOFError) as e:
            msg = f"{SHARD_DAMAGE}: {self.tar.name}: cannot open ({type(e).__name__}: {e})"
            self.errors.append(msg)
            yield Sample(f"{self.name}__truncated", None, error=msg)
            return
        try:
            for member in tf:
                if member.name.startswith("./"):  # `tar -cf x.tar ./000.jpg`: harmless prefix
                    member.name = member.name[2:]
                problem = member_name_problem(member.name)
                # Bad names are grouped by their (unsafe) key too, so `../x.jpg` + `../x.txt` are one
                # failed sample, and img2dataset's parquet row for that key is not reported missing.
                key, suffix = split_member_name(member.name)
                if group is not None and group.key != key:
                    yield group.sample()
                    group = None
                if group is None:
                    group = _Group(key, problem and f"bad member name: {member.name!r} ({problem})")
                if problem or not member.isfile():
                    # Never read: the name may try to escape, and links/devices carry no image.
                    if not problem:
                        self.ignored += 1
                    continue
                group.add(tf, member, suffix, self.cfg.max_image_bytes)
                self.ignored += group.ignored
                group.ignored = 0
            if group is not None:
                yield group.sample()
                group = None
            # tarfile ends quietly at a cut that falls on a header: only the missing end-of-archive
            # marker tells a truncated tar from a complete one.
            problem = _end_marker_problem(self.tar, tf.offset)
            if problem:
                raise tarfile.ReadError(problem)
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            # Corrupt or cut short: what was read is kept; a complete pending group is still good.
            if group is not None and group.complete:
                yield group.sample()
            msg = f"{SHARD_DAMAGE}: {self.tar.name}: {type(e).__name__}: {e}"
            self.errors.append(msg)
            yield Sample(f"{self.name}__truncated", None, error=msg)
        finally:
            tf.close()


class _Group:
    """The members of one key, accumulated while streaming."""

    def __init__(self, key: str, error: str | None):
        self.key = key
        self.error = error
        self.image: bytes | None = None
        self.image_error: str | None = None
        self.caption: str | None = None
        self.meta: dict[str, Any] | None = None
        self.meta_error: str | None = None
        self.ignored = 0
        self.complete = True

    def add(self, tf: tarfile.TarFile, m: tarfile.TarInfo, suffix: str, max_image_bytes: int) -> None:
        if suffix in IMAGE_EXTENSIONS:
            if self.image is not None or self.image_error is not None:
                self.ignored += 1  # a second image for the same key: the first one wins
                return
            if m.size > max_image_bytes:
                self.image_error = f"too large: member {m.name!r} is {m.size} bytes > max_image_bytes={max_image_bytes}"
                return
            self.complete = False
            self.image = _read(tf, m)
            self.complete = True
        elif suffix in _TEXT_SUFFIXES or suffix in _JSON_SUFFIXES:
            if m.size > MAX_META_BYTES:
                self.ignored += 1
                return
            self.complete = False
            raw = _read(tf, m)
            self.complete = True
            if suffix in _TEXT_SUFFIXES:
                self.caption = raw.decode("utf-8", errors="replace").strip()
            else:
                try:
                    meta = json.loads(raw)
                    self.meta = meta if isinstance(meta, dict) else None
                    if self.meta is None:
                        self.meta_error = "metadata is not a JSON object"
                except ValueError as e:
                    self.meta_error = f"unreadable metadata JSON: {e}"
        else:
            self.ignored += 1

    def sample(self) -> Sample:
        caption = self.caption
        labels: dict[str, Any] = {}
        if self.meta is not None:
            if caption is None and isinstance(self.meta.get("caption"), str):
                caption = self.meta["caption"]
            lab = self.meta.get("labels")
            if isinstance(lab, dict):
                labels = lab
        if self.error:
            return Sample(self.key, None, caption, labels, self.error)
        if self.image_error:
            return Sample(self.key, None, caption, labels, self.image_error)
        if self.image is None:
            return Sample(self.key, None, caption, labels, "missing image")
        # A bad .json next to a good image does not spoil the image: the image is still extracted.
        return Sample(self.key, self.image, caption, labels, None)


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def _end_marker_problem(path: Path, offset: int) -> str | None:
    """None when an uncompressed tar has its two zero blocks after the last member (POSIX; what
    tarfile and GNU tar write). Compressed tars are checked by their decompressor instead."""
    with open(path, "rb") as f:
        if any(f.read(6).startswith(m) for m in _COMPRESSED_MAGIC):
            return None
        f.seek(offset)
        tail = f.read(1024)
    if len(tail) < 1024 or tail.strip(b"\0"):
        return f"no end-of-archive marker after byte {offset} (file cut short or damaged)"
    return None


def _read_index(parquet: Path, columns: list[str]) -> Any:
    """Columns of img2dataset's per-shard parquet, as a pyarrow Table. ParquetFile, not read_table: the
    latter goes through pyarrow.dataset (a heavy first import, then ~2x the time per file), and this runs
    once per unit in the inference actor."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(parquet) as f:
        return f.read(columns=columns)


def _read(tf: tarfile.TarFile, m: tarfile.TarInfo) -> bytes:
    f = tf.extractfile(m)
    if f is None:
        return b""
    data = f.read()
    if len(data) != m.size:
        raise EOFError(f"member {m.name!r}: read {len(data)} of {m.size} bytes")
    return data


class WebDatasetSource:
    """A directory of img2dataset WebDataset shards (or a single ``.tar`` file)."""

    format = "webdataset"

    def __init__(self, path: Path, name: str, cfg: WebDatasetConfig):
        self.path = path
        self.name = name
        self.cfg = cfg

    def tars(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        return sorted(p for p in self.path.iterdir() if p.name.endswith(".tar") and p.is_file())

    def shards(self) -> list[WebDatasetShard]:
        tars = self.tars()
        stems = [t.name[: -len(".tar")] for t in tars]
        # img2dataset names shards 00000, 00001, ...: kept. Other names that the store cannot use as
        # unit names (dots, spaces) are replaced by the position, for every shard so names stay unique.
        use_stems = all(_UNIT_NAME_OK.match(s) for s in stems)
        return [WebDatasetShard(s if use_stems else shard_name(i), t, self.cfg)
                for i, (s, t) in enumerate(zip(stems, tars))]

    def __repr__(self) -> str:
        return f"WebDatasetSource({self.name!r}, {str(self.path)!r})"


def open_webdataset(path: str | Path, name: str | None = None, **options: Any) -> WebDatasetSource:
    p = Path(path).expanduser()
    cfg = WebDatasetConfig(**options)
    cfg.validate()
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory (expected img2dataset's output directory)")
    if p.is_file() and not p.name.endswith(".tar"):
        raise DataError(f"{p}: not a .tar file; give img2dataset's output directory or one NNNNN.tar")
    src = WebDatasetSource(p, name or (p.stem if p.is_file() else p.resolve().name), cfg)
    if not src.tars():
        raise DataError(f"{p}: no .tar shards found (img2dataset writes 00000.tar, 00001.tar, ... with "
                        "output_format='webdataset'); pass --format folder for a plain image folder")
    return src
