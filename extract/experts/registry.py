"""The expert registry: names -> modules, variants (architectures) named apart from weights.

Each expert module exposes ``VARIANTS: dict[str, Variant]`` and ``build(cfg: ExpertConfig) -> Expert``.
Modules are imported only when a name is resolved, so ``astrea experts ls`` stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from astrea.registry import Registry, UnknownNameError, check_choice
from astrea.schemas import STORE_FORMATS, STORAGE_DTYPES
from astrea.schemas.expert_spec import CODECS, DEFAULT_CODEC

# Which stage each expert serves, their order and prerequisites: astrea.schemas.stages (the stage table).
EXPERTS: Registry[Any] = Registry("expert")
EXPERTS.register("siglip", "astrea.extract.experts.siglip", "SigLIP / CLIP / EVA-CLIP / DINOv2 (open_clip): global tokens")
EXPERTS.register("ram_plus", "astrea.extract.experts.ram_plus", "RAM++ Swin + 4585-tag head: tags")
EXPERTS.register("grounding_dino", "astrea.extract.experts.grounding_dino", "Grounding-DINO 1.0 (transformers): boxes")
EXPERTS.register("sam2", "astrea.extract.experts.sam2", "SAM2 / SAM2.1 hiera (sam2 package): masks")
EXPERTS.register("sam", "astrea.extract.experts.sam", "SAM v1 ViT-B/L/H (transformers), Tab. 5 alternative: masks")


@dataclass(frozen=True)
class Variant:
    """One architecture of an expert. ``small`` variants are test/demo sized, random weights only."""

    name: str  # full name, e.g. "sam2.hiera_tiny"
    token_dim: int
    pooled_dim: int
    image_size: int
    description: str
    default_weights: str | None = None  # hub id (or None for random-only test sizes)
    small: bool = False


def expert_module(name: str) -> Any:
    return EXPERTS.get(name)


def variants(name: str) -> dict[str, Variant]:
    return expert_module(name).VARIANTS


def default_variant(name: str, small: bool) -> str:
    return expert_module(name).DEFAULT_SMALL if small else expert_module(name).DEFAULT


@dataclass
class ExpertConfig:
    """How to build one frozen expert. ``arch`` and ``weights`` are named apart:
    ``ExpertConfig("sam2", arch="sam2.hiera_tiny", weights="facebook/sam2.1-hiera-tiny")``."""

    name: str
    arch: str | None = None  # None -> the expert's real-size default
    weights: str = "random"  # "random" | hub id | local path
    grid: int = 24
    dtype: str = "float16"  # storage dtype
    format: str = "zarr"  # storage format of the units
    codec: str = DEFAULT_CODEC  # array codec inside the unit (raw | zstd for zarr), part of the spec
    seed: int = 0
    device: str = "cpu"
    compute_dtype: str = "float32"  # model compute dtype: float32 | bfloat16 | float16
    options: dict[str, Any] = field(default_factory=dict)  # expert-specific knobs (vocabulary, thresholds)

    def validate(self) -> None:
        if self.name not in EXPERTS:
            raise UnknownNameError("expert", self.name, EXPERTS.names())
        if self.arch is not None:
            valid = list(variants(self.name))
            if self.arch not in valid:
                raise UnknownNameError(f"{self.name} arch", self.arch, valid)
        check_choice("dtype", self.dtype, STORAGE_DTYPES)
        check_choice("format", self.format, STORE_FORMATS)
        check_choice("codec", self.codec, CODECS[self.format])
        check_choice("compute_dtype", self.compute_dtype, ("float32", "bfloat16", "float16"))
        if self.grid < 1:
            raise ValueError(f"grid={self.grid} must be >= 1")

    def resolved_arch(self) -> str:
        return self.arch or expert_module(self.name).DEFAULT

    def build(self, prerequisites: dict[str, str] | None = None) -> Any:
        """Build the expert. ``prerequisites`` maps prerequisite expert name -> fingerprint of the
        stored outputs it will be prompted with (part of this expert's spec)."""
        self.validate()
        return expert_module(self.name).build(self, prerequisites=dict(prerequisites or {}))
