"""Per-expert FFN projector: expert token width D_e -> LLM hidden size (paper Sec. 3.1.1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ProjectorSpec:
    in_dim: int
    out_dim: int
    layers: int = 2  # 1: a single Linear; 2: LLaVA-1.5 "mlp2x_gelu"

    def build(self) -> "Projector":
        return Projector(self)


class Projector(nn.Module):
    def __init__(self, spec: ProjectorSpec):
        super().__init__()
        if spec.layers < 1:
            raise ValueError(f"projector.layers={spec.layers} must be >= 1")
        mods: list[nn.Module] = [nn.Linear(spec.in_dim, spec.out_dim)]
        for _ in range(spec.layers - 1):
            mods += [nn.GELU(), nn.Linear(spec.out_dim, spec.out_dim)]
        self.net = nn.Sequential(*mods)
        self.in_dim, self.out_dim = spec.in_dim, spec.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D_e] -> [B, T, H]
        return self.net(x)
