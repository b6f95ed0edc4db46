"""User-level settings: where astrea keeps its config and, by default, the feature store.

``$ASTREA_HOME`` (default ``~/.astrea``) holds ``config.yaml``:

    store: /data/astrea_store        # default --store for extract / train / shards
    datasets:                        # the dataset catalog (astrea data add / ls)
      laion: {format: webdataset, path: /data/laion400m}

Both are optional; ``--store`` on the command line always wins.
"""

from __future__ import annotations

import os
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
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def save(data: dict[str, Any]) -> None:
    p = config_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=True))
    os.replace(tmp, p)


def default_store() -> Path:
    return Path(load().get("store", DEFAULT_STORE)).expanduser()
