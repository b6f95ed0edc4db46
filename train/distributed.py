"""Data-parallel training: torchrun-style env (or an already initialised process group, as Ray Train
sets up) and the gradient all-reduce.

Gradients are averaged with one flattened all-reduce per optimizer step, after gradient accumulation:
the same arithmetic as DDP with ``no_sync`` on the accumulation micro-batches, but independent of which
parameters a stage unfreezes (DDP would have to be rebuilt at every stage boundary, and the main stage
adds modules). Every rank runs the same number of steps: the data stream is endless (see data.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the process group (so we destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun (RANK/WORLD_SIZE/MASTER_ADDR env) or Ray Train describes."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), owns_group=True)


def average_gradients(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Replace each parameter's gradient by its mean over ranks (params with no grad anywhere stay None)."""
    if world_size <= 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        if p.grad is not None:
            p.grad.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def all_sum(values: list[float], device: torch.device, world_size: int) -> list[float]:
    """Sum a few floats over ranks (held-out loss sums and token counts, logged losses)."""
    if world_size <= 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_floats(values: list[float], device: torch.device, world_size: int) -> list[list[float]]:
    """Every rank's small float vector, rank order."""
    return _all_gather(values, torch.float64, device, world_size)


def all_gather_ints(values: list[int], device: torch.device, world_size: int) -> list[list[int]]:
    """Every rank's small int vector (stream positions), rank order."""
    return _all_gather(values, torch.long, device, world_size)


def _all_gather(values: list, dtype: torch.dtype, device: torch.device, world_size: int) -> list[list]:
    if world_size <= 1:
        return [list(values)]
    t = torch.tensor(values, dtype=dtype, device=device)
    out = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]
