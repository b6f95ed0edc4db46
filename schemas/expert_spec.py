"""The expert spec: everything that determines the bytes an expert writes into the store.

The fingerprint is a hash of the spec's *hashed* fields. Same spec -> same directory
(``STORE/DATASET/EXPERT@FINGERPRINT``) -> finished units are reused by every experiment; a spec that
differs in anything that changes the features (weights, preprocessing, grid, dtype, prompts, format)
gets its own directory, so caches never mix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from astrea.errors import AstreaError

SCHEMA_VERSION = 1
STORAGE_DTYPES = ("float16", "bfloat16", "float32", "int8", "float8_e4m3")  # the last two: per-row scale, see astrea.shards.dtypes
STORE_FORMATS = ("zarr", "wds")  # unit containers of the store (astrea.shards.formats implements each)
# Codecs of the token/pooled arrays, per format. "raw": the storage dtype's bytes as they are (float16
# mantissas barely compress: zstd saved 8% of bytes and cost ~30x on read, docs/store.md "Size and speed").
CODECS = {"zarr": ("raw", "zstd"), "wds": ("raw",)}
DEFAULT_CODEC = "raw"
# What a spec written before ``codec`` existed meant. A spec with its format's legacy codec hashes without
# the field, so every directory written before keeps its fingerprint; any other codec is hashed.
LEGACY_CODEC = {"zarr": "zstd", "wds": "raw"}


class SpecError(AstreaError, ValueError):
    """An expert spec that is malformed, or that does not match the directory it was found in."""


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


@dataclass(frozen=True)
class ExpertSpec:
    expert: str  # registry name: siglip | ram_plus | grounding_dino | sam2
    arch: str  # architecture variant, e.g. "sam2.hiera_tiny"; weights are named apart
    weights: str  # "random" | hub id | local path, as the user gave it
    weights_sha256: str  # hash of the loaded state dict (random init included), see extract.experts.base
    preprocessing: dict[str, Any]  # exact resize / normalisation / padding, enough to reproduce it
    grid: int  # tokens are resampled to grid x grid
    token_dim: int
    pooled_dim: int
    dtype: str = "float16"  # storage dtype of tokens and pooled
    format: str = "zarr"  # unit container, see astrea.shards
    codec: str = DEFAULT_CODEC  # array codec inside the container (CODECS[format]); changes the bytes
    seed: int = 0  # init seed when weights == "random"
    config: dict[str, Any] = field(default_factory=dict)  # anything else that changes outputs
    prerequisites: dict[str, str] = field(default_factory=dict)  # expert name -> fingerprint it read
    schema_version: int = SCHEMA_VERSION
    # sha256 of the checkpoint file(s) read ("" for random weights; specs written before it existed
    # read as ""). Provenance only, outside the fingerprint: two files holding the same tensors (a
    # .pt and its .safetensors copy) give the same features, which weights_sha256 already follows.
    weights_file_sha256: str = ""
    # Set by `astrea shards convert`: the directory these bytes were re-encoded from (its fingerprint, dtype,
    # format). Hashed when set: int8 from float16 is not int8 from the model's float32, so the two never share
    # a directory. Left out of the hash and of expert.json when empty, so no existing fingerprint changes.
    converted_from: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in STORAGE_DTYPES:
            raise SpecError(f"dtype={self.dtype!r} is not valid; choose one of {list(STORAGE_DTYPES)}")
        if self.format not in STORE_FORMATS:
            raise SpecError(f"format={self.format!r} is not valid; choose one of {list(STORE_FORMATS)}")
        if self.codec not in CODECS[self.format]:
            raise SpecError(f"codec={self.codec!r} is not valid for format {self.format!r}; choose one of "
                            f"{list(CODECS[self.format])}")
        if self.grid < 1:
            raise SpecError(f"grid={self.grid} must be >= 1")
        if "@" in self.expert or "/" in self.expert:
            raise SpecError(f"expert={self.expert!r} must not contain '@' or '/'")

    @property
    def random_weights(self) -> bool:
        return self.weights == "random"

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    def hashed_fields(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        # Where the weights came from does not change the features; their hash does.
        d.pop("weights")
        d.pop("weights_file_sha256")
        if not self.random_weights:
            d.pop("seed")
        d["random_weights"] = self.random_weights
        if not self.converted_from:
            d.pop("converted_from")
        if self.codec == LEGACY_CODEC[self.format]:
            d.pop("codec")  # as before the field existed: older directories keep their fingerprint
        return d

    def fingerprint(self) -> str:
        return hashlib.sha256(canonical_json(self.hashed_fields()).encode()).hexdigest()[:12]

    @property
    def dirname(self) -> str:
        return f"{self.expert}@{self.fingerprint()}"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["fingerprint"] = self.fingerprint()
        d["random_weights"] = self.random_weights
        # empty provenance fields stay out of expert.json: a store that does not use them stays readable
        # by an astrea that predates them
        for k in ("converted_from", "weights_file_sha256"):
            if not d[k]:
                d.pop(k)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "expert spec") -> "ExpertSpec":
        d = dict(d)
        stored_fp = d.pop("fingerprint", None)
        d.pop("random_weights", None)
        d.pop("created_by", None)
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise SpecError(
                f"{source}: written with schema version {version}, this astrea reads version "
                f"{SCHEMA_VERSION}; use a matching astrea release or re-extract into a new store"
            )
        if "codec" not in d:  # written before the field existed: the codec its format used then
            d["codec"] = LEGACY_CODEC.get(d.get("format", "zarr"), DEFAULT_CODEC)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SpecError(f"{source}: unknown fields {unknown}")
        try:
            spec = cls(**d)
        except TypeError as e:
            raise SpecError(f"{source}: {e}") from None
        if stored_fp is not None and stored_fp != spec.fingerprint():
            raise SpecError(
                f"{source}: stored fingerprint {stored_fp} does not match its content "
                f"({spec.fingerprint()}); the file was edited or corrupted"
            )
        return spec

    @classmethod
    def from_json(cls, text: str, *, source: str = "expert spec") -> "ExpertSpec":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"{source}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=source)
