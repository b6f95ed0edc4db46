"""What a data source yields: per source shard, (key, image bytes, caption, labels) in a fixed order.

A *source shard* is the unit of work for extraction and the unit of the store: store unit
``00000`` holds exactly the keys of source shard ``00000``, in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Sample:
    key: str  # stable id within the dataset (img2dataset's key for WebDataset sources)
    image: bytes | None  # encoded image bytes; None when the source has a caption but no image
    caption: str | None = None
    labels: dict[str, Any] = field(default_factory=dict)  # e.g. COCO classes / boxes / masks, JSON-able
    error: str | None = None  # set when the source itself could not produce the sample


class SourceShard(Protocol):
    name: str  # "00000": the store unit name

    def __iter__(self) -> Iterator[Sample]: ...


class Source(Protocol):
    name: str

    def shards(self) -> list[SourceShard]: ...
