"""User-level settings: where astrea keeps its config and, by default, the feature store.

``$ASTREA_HOME`` (default ``~/.astrea``) holds ``config.yaml``:

    store: /data/astrea_store        # default --store for extract / train / shards
    datasets:                        # the dataset catalog (astrea data add / ls)
      laion: {format: webdataset, path: /data/laion400m}

Both are optional; ``--store`` on the command line always wins.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

DEFAULT_STORE = "./store"


def home() -> Path:
    return Path(os.environ.get("ASTREA_HOME", "~/.astrea")).expanduser()


def config_path() -> Path:
    return home() / "config.yaml"


def load() -> dict[str, Any]:
    p = config_path()
    if not p.exists():
        return {}
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML ({str(e).splitlines()[0]}); fix or delete the file") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def save(data: dict[str, Any]) -> None:
    p = config_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(f".yaml.tmp{os.getpid()}")  # two processes saving at once never share a temp file
    tmp.write_text(yaml.safe_dump(data, sort_keys=True))
    os.replace(tmp, p)


def default_store() -> Path:
    return Path(load().get("store", DEFAULT_STORE)).expanduser()


# -- dataset catalog ------------------------------------------------------------------------------
# config.yaml `datasets:` maps a name to {format, path, options}; astrea.data.catalog reads and edits it.
def datasets() -> dict[str, dict[str, Any]]:
    """The catalog as written in config.yaml (validated by astrea.data.catalog, not here)."""
    entries = load().get("datasets") or {}
    if not isinstance(entries, dict):
        raise ValueError(f"{config_path()}: 'datasets' must be a mapping of name -> {{format, path}}, "
                         f"got {type(entries).__name__}")
    return entries


def set_dataset(name: str, entry: dict[str, Any] | None) -> None:
    """Add or replace (``entry``) or remove (``None``) one catalog entry, keeping the rest of the file.

    Read-modify-write under an exclusive lock, so two commands registering datasets at once (the demo
    and a user's ``astrea data add``) both land. The file is rewritten by PyYAML: comments are lost.
    """
    with _locked():
        data = load()
        entries = dict(data.get("datasets") or {})
        if entry is None:
            entries.pop(name, None)
        else:
            entries[name] = entry
        data["datasets"] = entries
        save(data)


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    lock = config_path().with_name("config.yaml.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks, last writer wins
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
