"""What a data source yields: per source shard, (key, image bytes, caption, labels) in a fixed order.

A *source shard* is the unit of work for extraction and the unit of the store: store unit
``00000`` holds exactly the keys of source shard ``00000``, in the same order.

Contract for every reader (webdataset, coco, folder):

- iterating a shard twice yields the same samples in the same order;
- ``Sample.key`` is always a *safe* key (:func:`check_key`): never empty, no ``/``, ``\\``, ``.``,
  control characters. A source key that is not safe is never used: the sample gets the stand-in key
  ``invalid-key-NNNNNN`` (its position in the shard) and ``error="invalid key: ..."`` naming the
  original (or the reader's own diagnosis when it gave one, e.g. ``"bad member name: '../x.jpg' ..."``). Keys are never used to build a path, here or downstream;
- bad input never raises out of iteration: each bad item becomes a ``Sample`` with ``error`` set
  (``"kind: detail"``, the kind before the first colon is what summaries group by), and problems of
  the shard as a whole (a truncated tar, an unreadable index) are appended to ``shard.errors``
  *and* surface as failed samples so that they are counted (see docs/data.md);
- image bytes are delivered as stored, never decoded here (experts decode with
  ``astrea.extract.experts.common.decode_image``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from astrea.errors import AstreaError

# Image extensions every reader recognises (lower case, without the dot). Anything else is not an image.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
MAX_KEY_LENGTH = 200
# Members / files larger than this are refused rather than read into memory (a 4 GB "image" in a tar
# would otherwise take a reader process down). Configurable per source with ``max_image_bytes``.
DEFAULT_MAX_IMAGE_BYTES = 64 * 2**20

_BAD_KEY_CHARS = re.compile(r"[/\\.\x00-\x1f\x7f]")
# How a source's failure marker for a shard it could not read to the end begins (``Sample.damages_shard``).
SHARD_DAMAGE = "truncated tar"


@dataclass
class Sample:
    key: str  # stable id within the dataset (img2dataset's key for WebDataset sources)
    image: bytes | None  # encoded image bytes; None when the source has a caption but no image
    caption: str | None = None
    labels: dict[str, Any] = field(default_factory=dict)  # e.g. COCO classes / boxes / masks, JSON-able
    error: str | None = None  # set when the source itself could not produce the sample

    @property
    def ok(self) -> bool:
        return self.error is None and self.image is not None

    @property
    def damages_shard(self) -> bool:
        """The marker a source yields, last, for a shard it could not read to the end (a truncated tar):
        the shard is incomplete, not just this sample."""
        return self.image is None and (self.error or "").startswith(SHARD_DAMAGE)


@runtime_checkable
class SourceShard(Protocol):
    name: str  # "00000": the store unit name

    def __iter__(self) -> Iterator[Sample]: ...


@runtime_checkable
class Source(Protocol):
    name: str

    def shards(self) -> list[SourceShard]: ...


class DataError(AstreaError, ValueError):
    """A data source that cannot be opened or configured; the message names the path / field and the fix."""


def check_key(key: object) -> str | None:
    """``None`` when ``key`` is safe to use as a store key, else the reason it is not.

    Safe = a non-empty string of at most MAX_KEY_LENGTH characters without ``/``, ``\\``, ``.`` or
    control characters. ``.`` is refused because WebDataset readers split a member name at its first
    dot (``KEY.tokens.npy``), and path separators because a key must never name a place on disk.
    """
    if not isinstance(key, str):
        return f"not a string ({type(key).__name__})"
    if not key:
        return "empty key"
    if len(key) > MAX_KEY_LENGTH:
        return f"longer than {MAX_KEY_LENGTH} characters"
    m = _BAD_KEY_CHARS.search(key)
    if m:
        ch = m.group(0)
        what = {"/": "a path separator '/'", "\\": "a path separator '\\'", ".": "a '.'"}.get(ch, f"control character {ch!r}")
        return f"contains {what}"
    return None


def stand_in_key(index: int) -> str:
    """The key a sample gets when its own key is unusable: deterministic, unique within the shard."""
    return f"invalid-key-{index:06d}"


def check_directory_source(path: Any, shard_size: int, max_image_bytes: int) -> Any:
    """The checks every directory-backed source makes on its arguments; returns the expanded path."""
    from pathlib import Path

    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    if int(shard_size) < 1:
        raise DataError(f"shard_size={shard_size} must be >= 1")
    if max_image_bytes < 1:
        raise DataError(f"max_image_bytes={max_image_bytes} must be >= 1")
    return root


def shard_name(i: int) -> str:
    return f"{i:05d}"


class ShardBase:
    """Shared plumbing of the readers' shards: a name, shard-level errors, ``__len__``.

    ``errors`` holds problems of the shard as a whole found by the *latest* iteration (a truncated
    tar, an unreadable parquet index); it is reset at the start of each iteration.
    """

    name: str

    def __init__(self, name: str):
        self.name = name
        self.errors: list[str] = []

    def __iter__(self) -> Iterator[Sample]:
        self.errors = []
        seen: set[str] = set()
        for index, sample in enumerate(self._samples()):
            yield _finalise(sample, index, seen)

    def _samples(self) -> Iterator[Sample]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def _finalise(sample: Sample, index: int, seen: set[str]) -> Sample:
    """Enforce the key contract in one place for every reader: safe and unique within the shard."""
    reason = check_key(sample.key)
    if reason is not None:
        # A reader that already diagnosed the problem (e.g. "bad member name: '../x.jpg' ...") keeps
        # its reason; the unsafe key itself is dropped either way.
        error = sample.error or f"invalid key: {sample.key!r} {reason}"
        sample = Sample(stand_in_key(index), None, sample.caption, sample.labels, error)
    elif sample.key in seen:
        sample = Sample(stand_in_key(index), None, sample.caption, sample.labels,
                        f"duplicate key: {sample.key!r} appears earlier in the shard")
    seen.add(sample.key)
    return sample


def key_from_relpath(rel: str) -> str:
    """A safe, stable key from a relative file path: extension dropped, ``/`` -> ``__``, other
    characters outside ``[A-Za-z0-9_-]`` -> ``_`` (``cats/IMG 1.v2.jpg`` -> ``cats__IMG_1_v2``)."""
    stem = rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel
    parts = [re.sub(r"[^A-Za-z0-9_\-]", "_", p) for p in stem.split("/")]
    return "__".join(parts)[:MAX_KEY_LENGTH]


def unique_key(key: str, rel: str, used: set[str]) -> str:
    """``key``, or when another file of the shard already has it (``a.jpg`` + ``a.png``, or
    ``a b.jpg`` + ``a_b.jpg``), ``key-HASH8`` from this file's own relative path: no image is lost to a
    collision and the key still depends only on the file's path. Adds the result to ``used``."""
    if key in used:
        import hashlib

        key = f"{key[: MAX_KEY_LENGTH - 9]}-{hashlib.sha1(rel.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"
    used.add(key)
    return key


def is_image_name(name: str) -> bool:
    return "." in name and name.rsplit(".", 1)[1].lower() in IMAGE_EXTENSIONS
