"""One rank of the 2-process CPU (gloo) test; spawned by test_distributed.py."""

from __future__ import annotations

import json
import os
from pathlib import Path


def worker(rank: int, world: int, port: int, store: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from astrea.train.config import TrainConfig
    from astrea.train.data import is_heldout, store_opener
    from astrea.train.distributed import average_gradients
    from astrea.train.projector import ProjectorSpec
    from astrea.train.runner import run_local

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    report: dict = {"rank": rank}

    # 1. gradients: each rank computes on its own input; after averaging every rank holds the mean
    torch.manual_seed(0)
    proj = ProjectorSpec(6, 4).build()
    x = torch.full((2, 3, 6), float(rank + 1))
    proj(x).pow(2).sum().backward()
    local = [p.grad.clone() for p in proj.parameters()]
    gathered = [[torch.empty_like(g) for _ in range(world)] for g in local]
    for g, bucket in zip(local, gathered, strict=True):
        dist.all_gather(bucket, g)
    average_gradients(list(proj.parameters()), world)
    report["grads_are_mean"] = all(
        torch.allclose(p.grad, torch.stack(bucket).mean(0)) for p, bucket in zip(proj.parameters(), gathered, strict=True)
    )
    report["grads_differed"] = any(not torch.equal(b[0], b[1]) for b in gathered)

    # 2. data: one epoch of this rank's stream (the reader splits shards by rank)
    opener = store_opener(store, "toy", ["siglip"], seed=0, rank=rank, world_size=world)
    report["keys"] = [r["key"] for r in opener(0, True) if not is_heldout(r["key"], 0.2)]

    # 3. the real trainer on the existing process group
    cfg = TrainConfig.load(None, {
        "store": store, "data": "toy", "out": out, "stages": "caption,classification", "steps": 2,
        "batch_size": 4, "optim.lr": 3e-3, "dataset.heldout_fraction": 0.2, "save_every": 1, "progress": False,
    })
    summary = run_local(cfg)
    report["world_size"] = summary["world_size"]
    report["checksums"] = [s["extra"]["rank_param_checksums"] for s in summary["stages"]]
    Path(out, f"report-{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()
