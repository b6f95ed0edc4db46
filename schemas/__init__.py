"""Versioned schemas of everything astrea writes: expert specs, unit rows, stats."""

from astrea.schemas.expert_spec import FORMATS, SCHEMA_VERSION, STORAGE_DTYPES, ExpertSpec, SpecError
from astrea.schemas.unit import INDEX_SCHEMA, STATUS_FAILED, STATUS_OK, UNIT_SCHEMA_VERSION, check_row, row_checksum

__all__ = ["ExpertSpec", "SpecError", "SCHEMA_VERSION", "STORAGE_DTYPES", "FORMATS", "INDEX_SCHEMA",
           "UNIT_SCHEMA_VERSION", "STATUS_OK", "STATUS_FAILED", "row_checksum", "check_row"]
