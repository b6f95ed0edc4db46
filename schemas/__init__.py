"""Versioned schemas of everything astrea writes: expert specs, unit rows, stats."""

from astrea.schemas.expert_spec import FORMATS, SCHEMA_VERSION, STORAGE_DTYPES, ExpertSpec, SpecError

__all__ = ["ExpertSpec", "SpecError", "SCHEMA_VERSION", "STORAGE_DTYPES", "FORMATS"]
