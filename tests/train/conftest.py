"""Trainer test fixtures: one small real feature store per session (written with the store's writer)."""

from __future__ import annotations

import pytest
import torch

from tests.train.fixtures import make_store


@pytest.fixture(scope="session")
def toy_store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store"))


@pytest.fixture(autouse=True)
def _one_thread():
    # The CI box is 2 shared cores: one intra-op thread is faster and gives the same numbers every run.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
