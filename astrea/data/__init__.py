"""Data sources: open a dataset by catalog name or path, as source shards of ``Sample``s.

```python
from astrea.data import open_source
src = open_source("sample")                  # catalog name (astrea data ls), or a path
for shard in src.shards():                   # shard.name == "00000": the store unit it becomes
    for s in shard:                          # Sample(key, image bytes | None, caption, labels, error)
        ...
```

Formats are registered by name in :data:`SOURCE_FORMATS` (a format = a factory ``(path, name=None,
**options) -> Source``); nothing else dispatches on format names. The catalog lives in
``$ASTREA_HOME/config.yaml`` under ``datasets:`` (see :mod:`astrea.config`). Importing this package
is cheap: no torch, no pyarrow, no PIL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from astrea.data.base import DataError, Sample, Source, SourceShard
from astrea.registry import Registry, UnknownNameError

__all__ = ["SOURCE_FORMATS", "DataError", "Sample", "Source", "SourceShard", "UnknownDatasetError", "catalog",
           "catalog_add", "catalog_remove", "detect_format", "open_source"]

SOURCE_FORMATS: Registry[Any] = Registry("data format")
SOURCE_FORMATS.register("webdataset", "astrea.data.webdataset:open_webdataset",
                        "img2dataset output: NNNNN.tar (KEY.jpg/.txt/.json) + NNNNN.parquet + NNNNN_stats.json")
SOURCE_FORMATS.register("coco", "astrea.data.coco:CocoSource",
                        "COCO: images + annotations/instances_SPLIT.json and/or captions_SPLIT.json")
SOURCE_FORMATS.register("folder", "astrea.data.folder:FolderSource",
                        "a folder of images (recursive, sorted), sidecar KEY.txt captions")

# Names a catalog entry may have: they become store directory names (STORE/DATASET/...).
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


class UnknownDatasetError(UnknownNameError):
    """Neither a catalog name nor an existing path; the message lists the catalog and the fixes."""

    def __init__(self, name: str, valid: list[str]):
        super().__init__("dataset", name, valid)
        listed = ", ".join(sorted(valid)) or "(catalog is empty)"
        self.args = (f"unknown dataset {name!r}: not a catalog name and no such path. Catalog names: {listed}. "
                     f"Give a path to a dataset directory (img2dataset output, COCO, image folder), register "
                     f"one with `astrea data add NAME PATH --format FORMAT`, or write the sample with "
                     f"`astrea data sample`.",)


# -- catalog --------------------------------------------------------------------------------------
def check_dataset_name(name: str) -> None:
    if not name or not set(name) <= _NAME_CHARS or name[0] in "-_":
        raise DataError(f"dataset name {name!r}: use letters, digits, '_' and '-' (it becomes a store "
                        "directory name), starting with a letter or digit")


def catalog() -> dict[str, dict[str, Any]]:
    """``{name: {"format": ..., "path": ..., ["options": {...}]}}`` from ``$ASTREA_HOME/config.yaml``."""
    from astrea import config

    out = {}
    for name, entry in config.datasets().items():
        if not isinstance(entry, dict) or not entry.get("path"):
            raise DataError(f"{config.config_path()}: datasets.{name} must be a mapping with 'path' "
                            f"(and 'format'), got {entry!r}")
        out[str(name)] = entry
    return out


def catalog_add(name: str, path: str | Path, format: str | None = None, options: dict[str, Any] | None = None,
                *, check: bool = True) -> dict[str, Any]:
    """Register ``name`` -> ``path`` (absolute) in the catalog, replacing an entry of that name.

    The format is detected when None. With ``check`` the source is opened first (shards listed), so a
    wrong path or format is an error now rather than at extraction time.
    """
    from astrea import config

    check_dataset_name(name)
    p = Path(path).expanduser().resolve()
    fmt = format or detect_format(p)
    SOURCE_FORMATS.get(fmt)  # unknown format -> lists the valid ones
    if check:
        src = _build(p, fmt, name, options or {})
        if not src.shards():
            raise DataError(f"{p}: opened as {fmt} but has no shards")
    entry: dict[str, Any] = {"format": fmt, "path": str(p)}
    if options:
        entry["options"] = dict(options)
    config.set_dataset(name, entry)
    return entry


def catalog_remove(name: str) -> None:
    from astrea import config

    if name not in catalog():
        raise UnknownNameError("dataset", name, list(catalog()))
    config.set_dataset(name, None)


# -- formats --------------------------------------------------------------------------------------
def detect_format(path: str | Path) -> str:
    """``webdataset`` for a directory holding ``*.tar`` (or one ``.tar``), ``coco`` for a directory
    with ``annotations/*.json``, else ``folder``."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if p.is_file():
        if p.name.endswith(".tar"):
            return "webdataset"
        raise DataError(f"{p}: a data source is a directory (or one .tar shard), not a file; "
                        f"formats: {', '.join(SOURCE_FORMATS.names())}")
    if any(c.name.endswith(".tar") and c.is_file() for c in p.iterdir()):
        return "webdataset"
    ann = p / "annotations"
    if ann.is_dir() and any(c.suffix == ".json" for c in ann.iterdir()):
        return "coco"
    return "folder"


def _build(path: Path, fmt: str, name: str | None, options: dict[str, Any]) -> Source:
    factory = SOURCE_FORMATS.get(fmt)
    try:
        return factory(path, name=name, **options)
    except TypeError as e:  # an option the format does not take
        raise DataError(f"format {fmt!r} at {path}: {e}") from None


def open_source(name_or_path: str | Path, format: str | None = None, **options: Any) -> Source:
    """A data source by catalog name or path; ``format`` forces a format (detected otherwise).

    ``sample`` that is not in the catalog is written on first use to ``$ASTREA_HOME/sample``
    (``astrea data sample``) and registered. Options go to the format's reader (e.g.
    ``shard_size=`` for folder / coco, ``max_image_bytes=``).
    """
    key = str(name_or_path)
    entries = catalog()
    if key in entries:
        e = entries[key]
        fmt = format or e.get("format") or detect_format(e["path"])
        opts = {**(e.get("options") or {}), **options}
        p = Path(e["path"]).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"dataset {key!r}: its path {p} (from the catalog, "
                                    f"$ASTREA_HOME/config.yaml) does not exist; fix it with "
                                    f"`astrea data add {key} PATH`")
        return _build(p, fmt, key, opts)
    p = Path(key).expanduser()
    if p.exists():
        return _build(p, format or detect_format(p), None, options)
    if key == "sample":
        from astrea.data.sample import ensure_sample

        return _build(ensure_sample(), format or "webdataset", "sample", options)
    raise UnknownDatasetError(key, list(entries))


def __getattr__(name: str) -> Any:
    if name == "FORMATS":  # the old name of SOURCE_FORMATS (astrea.schemas and astrea.shards had their own FORMATS)
        import warnings

        warnings.warn("astrea.data.FORMATS is renamed SOURCE_FORMATS", DeprecationWarning, stacklevel=2)
        return SOURCE_FORMATS
    raise AttributeError(f"module 'astrea.data' has no attribute {name!r}")
