"""Versioned schemas of everything astrea writes: expert specs, unit rows, stats."""

from typing import Any

from astrea.schemas.expert_spec import SCHEMA_VERSION, STORAGE_DTYPES, STORE_FORMATS, ExpertSpec, SpecError

__all__ = ["ExpertSpec", "SpecError", "SCHEMA_VERSION", "STORAGE_DTYPES", "STORE_FORMATS", "INDEX_SCHEMA",
           "UNIT_SCHEMA_VERSION", "STATUS_OK", "STATUS_FAILED", "row_checksum", "check_row"]

# The unit schema needs numpy and pyarrow; the spec vocabulary above does not, and the CLI reads its
# defaults from the expert registry (which imports this package) at start-up: unit names load on first use.
_UNIT_NAMES = ("INDEX_SCHEMA", "STATUS_FAILED", "STATUS_OK", "UNIT_SCHEMA_VERSION", "check_row", "row_checksum")


def __getattr__(name: str) -> Any:
    if name in _UNIT_NAMES:
        from astrea.schemas import unit

        return getattr(unit, name)
    if name == "FORMATS":  # the old name of STORE_FORMATS (astrea.data and astrea.shards had their own FORMATS)
        import warnings

        warnings.warn("astrea.schemas.FORMATS is renamed STORE_FORMATS", DeprecationWarning, stacklevel=2)
        return STORE_FORMATS
    raise AttributeError(f"module 'astrea.schemas' has no attribute {name!r}")
