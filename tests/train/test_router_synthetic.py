"""The claim of the paper's Fig. 2, on synthetic experts where the right answer is known.

Four fake experts emit token grids for each image; expert i's tokens encode the answer to task i and are
noise for every other task. The router sees the task (as the main stage gives it the pooled instruction
embedding). After a short CPU training of the MoE and a tiny linear readout, the router must put most of
its mass on the informative expert for each task. The same check is run with the router replaced by
uniform weights and must fail there, so it measures routing rather than passing by construction.
"""

from __future__ import annotations

import torch
from torch import nn

from astrea.train.moe import MoEConfig, MoEFusion, RoutingStats

N_EXPERTS, N_CLASSES, DIM, TOKENS = 4, 6, 16, 4


class UniformRouter(MoEFusion):
    """The ablation: every expert weighted 1/n whatever the input."""

    def route(self, x, context=None):
        b, n, p, _ = x.shape
        probs = torch.full((b, p, n), 1.0 / n, dtype=x.dtype)
        return probs.log(), probs


def make_batch(gen: torch.Generator, codes: torch.Tensor, task_ctx: torch.Tensor, b: int):
    labels = torch.randint(0, N_CLASSES, (b, N_EXPERTS), generator=gen)  # one answer per task and image
    task = torch.randint(0, N_EXPERTS, (b,), generator=gen)
    tokens = codes[labels].unsqueeze(2).expand(b, N_EXPERTS, TOKENS, DIM)  # expert i encodes labels[:, i]
    tokens = tokens + 0.3 * torch.randn(b, N_EXPERTS, TOKENS, DIM, generator=gen)
    return tokens, task_ctx[task], task, labels[torch.arange(b), task]


def train_and_measure(moe_cls: type[MoEFusion], steps: int = 250, seed: int = 0):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randn(N_CLASSES, DIM, generator=gen)
    task_ctx = torch.randn(N_EXPERTS, DIM, generator=gen)  # stand-in for the pooled instruction embedding
    moe = moe_cls(MoEConfig(top_k=3, adapter_hidden=16), dim=DIM, n_experts=N_EXPERTS)
    readout = nn.Linear(DIM, N_CLASSES)
    opt = torch.optim.Adam([*moe.parameters(), *readout.parameters()], lr=1e-2)
    for _ in range(steps):
        tokens, ctx, _, y = make_batch(gen, codes, task_ctx, 64)
        out = moe(tokens, context=ctx)
        loss = nn.functional.cross_entropy(readout(out.fused.mean(1)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # held-out: routing mass per task and readout accuracy
    stats = {t: RoutingStats(N_EXPERTS, k=3) for t in range(N_EXPERTS)}
    correct = total = 0
    with torch.no_grad():
        tokens, ctx, task, y = make_batch(torch.Generator().manual_seed(999), codes, task_ctx, 512)
        out = moe(tokens, context=ctx)
        correct += int((readout(out.fused.mean(1)).argmax(-1) == y).sum())
        total += len(y)
        for t in range(N_EXPERTS):
            stats[t].add(out.probs[task == t])
    mass = torch.tensor([stats[t].summary()["mass"] for t in range(N_EXPERTS)])  # [task, expert]
    return mass, correct / total


def router_picks_informative_expert(mass: torch.Tensor) -> bool:
    """For every task, the informative expert has the largest mass, and a clear majority of it."""
    return all(int(mass[t].argmax()) == t and float(mass[t, t]) > 0.5 for t in range(N_EXPERTS))


def test_router_routes_each_task_to_its_informative_expert():
    mass, acc = train_and_measure(MoEFusion)
    assert router_picks_informative_expert(mass), f"routing mass per task (rows) and expert (cols):\n{mass}"
    # the routing is what makes the task solvable
    u_mass, u_acc = train_and_measure(UniformRouter)
    assert not router_picks_informative_expert(u_mass), u_mass
    assert acc > 0.9, acc
    assert u_acc < acc - 0.3, (u_acc, acc)
