"""Shared fixtures. Every test gets its own ASTREA_HOME so no test reads or writes the user's config."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def pytest_collection_modifyitems(config, items):
    """Skip `slow` tests unless selected with -m, and `gpu` tests without a CUDA device."""
    markexpr = config.getoption("-m") or ""
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    for item in items:
        if "slow" in item.keywords and "slow" not in markexpr:
            item.add_marker(pytest.mark.skip(reason="slow: run with -m slow"))
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(autouse=True)
def astrea_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("astrea_home")
    monkeypatch.setenv("ASTREA_HOME", str(home))
    return home
