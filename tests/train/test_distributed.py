"""Two CPU processes over gloo: gradients averaged, data split disjoint and complete, ranks in sync."""

from __future__ import annotations

import json
import socket

import torch.multiprocessing as mp

from astrea.train.data import is_heldout
from tests.train.dist_worker import worker
from tests.train.fixtures import key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo(toy_store, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    mp.spawn(worker, args=(2, _free_port(), str(toy_store), str(out)), nprocs=2, join=True)
    r0, r1 = (json.loads((out / f"report-{r}.json").read_text()) for r in (0, 1))

    assert r0["grads_differed"] and r0["grads_are_mean"] and r1["grads_are_mean"]

    every = {key(i) for i in range(48)} - {key(i) for i in range(48) if is_heldout(key(i), 0.2)}
    k0, k1 = set(r0["keys"]), set(r1["keys"])
    assert k0 and k1 and not (k0 & k1) and k0 | k1 == every
    assert len(r0["keys"]) == len(k0)  # no key twice within a rank either

    assert r0["world_size"] == r1["world_size"] == 2
    for stage_sums in r0["checksums"]:
        assert len(stage_sums) == 2 and stage_sums[0] == stage_sums[1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and [s["name"] for s in summary["stages"]] == ["caption", "classification"]
