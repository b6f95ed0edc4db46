"""`--workers 2`: the same loop on two Ray Train workers (slow: starts a local Ray cluster)."""

from __future__ import annotations

import pytest

from astrea.train.config import TrainConfig


@pytest.mark.slow
def test_two_ray_workers(toy_store, tmp_path):
    from astrea.train import run

    cfg = TrainConfig.load(None, {
        "store": str(toy_store), "data": "toy", "out": str(tmp_path / "run"), "stages": "caption", "steps": 2,
        "batch_size": 4, "dataset.heldout_fraction": 0.2, "workers": 2, "progress": False,
    })
    summary = run(cfg)
    assert summary["world_size"] == 2
    sums = summary["stages"][0]["extra"]["rank_param_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
