"""MoE fusion of the aligned expert token grids (paper Eq. 9-10).

Per visual token position p, a linear router reads the n experts' aligned tokens at p (and, optionally, a
pooled embedding of the instruction, see below) and predicts n logits. The k largest are kept, the rest set
to -inf, and a softmax turns them into routing probabilities P_i; the fused token is
``f = sum_i P_i * A_i(f_i)`` with A_i a per-expert MLP adapter.

Why the router reads the instruction: the paper's Fig. 2 shows routing mass that differs *per task*
("the caption task corresponds to ViT"). A router that sees only the visual tokens gives the same mixture
for the same image whatever is asked, so it could not show that picture. With a context vector ``c`` (the
main stage passes the instruction as the LLM sees it, see :attr:`MoEConfig.router_context`) the logits are ``W [f_1..f_n] + U norm(c)``: still one linear layer, over the
tokens and the instruction together. ``norm`` is a LayerNorm without parameters: LLM hidden states have
scales that differ by model and layer by orders of magnitude, and the router's init and learning rate
should not depend on that. ``router_context="none"`` is the purely visual router; ``router="uniform"``
replaces the router by equal weights 1/n (the "no routing" control).

Adapters start as the identity (residual MLP whose output layer is zero-initialised): the main stage begins
from the pre-alignment run's projectors, and an identity adapter means step 0 of the main stage feeds the LLM
exactly the mixture of those aligned tokens instead of a random re-mapping of them. The projectors map D_e to
the LLM width and the adapters map the LLM width to itself, so the adapters cannot be copied from the
projectors; identity is the initialisation that preserves what pre-alignment learned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from astrea.registry import check_choice

__all__ = [
    "MoEConfig", "ROUTERS", "ROUTER_CONTEXTS", "MoEFusion", "MoEOutput", "Adapter", "RoutingStats", "routing_stats",
    "top_k_mask",
]


@dataclass
class MoEConfig:
    """MoE router + adapters: ``TrainConfig.moe``. The sizes (LLM width, experts) come from the run at ``build``."""

    top_k: int = 3  # Tab. 3: top-3 is the paper's default
    adapter_hidden: int | None = None  # None -> the LLM hidden size
    adapter_init: str = "identity"  # identity | random
    # What the router knows of the task (Fig. 2): "instruction" = the LLM's last-layer hidden state at the
    # instruction's last token (a text-only forward of the prompt, no gradient); "embedding" = the mean
    # input embedding of the prompt tokens (weak: prompts that differ in one word barely differ);
    # "none" = the purely visual router of Eq. 9 read literally.
    router_context: str = "instruction"
    router: str = "learned"  # learned | uniform (control: every expert weighs 1/n, no top-k)
    router_init_std: float = 0.02  # small random init: all-equal logits would make top-k ties arbitrary
    # Switch-Transformer load-balancing aux loss. The paper names none; without it a top-k router can drop
    # an expert for good in the first steps (masked logits get no gradient: measured in docs/main_stage.md)
    balance_weight: float = 0.01

    def validate(self, experts: Sequence[str] | int | None = None) -> None:
        """Every range of ``moe.*``; ``experts`` (names or a count), when known, bounds ``top_k``."""
        # configs written before router_context took words said true / false
        legacy = {"true": "embedding", "false": "none"}
        self.router_context = legacy.get(str(self.router_context).lower(), self.router_context)
        check_choice("moe.router_context", self.router_context, ROUTER_CONTEXTS)
        check_choice("moe.adapter_init", self.adapter_init, ("identity", "random"))
        check_choice("moe.router", self.router, ROUTERS)
        n = experts if isinstance(experts, int) or experts is None else len(experts)
        if self.top_k < 1 or (n is not None and self.top_k > n):
            names = f": {', '.join(experts)}" if experts is not None and not isinstance(experts, int) else ""
            bound = f"the number of experts ({n}{names})" if n is not None else "the number of experts"
            raise ValueError(f"moe.top_k={self.top_k} must be between 1 and {bound} (Tab. 3 ablates 1..4)")
        if self.adapter_hidden is not None and self.adapter_hidden < 1:
            raise ValueError(f"moe.adapter_hidden={self.adapter_hidden} must be >= 1 (or None for the LLM width)")
        if self.balance_weight < 0:
            raise ValueError(f"moe.balance_weight={self.balance_weight} must be >= 0")

    def build(self, dim: int, n_experts: int = 4, expert_names: Sequence[str] = ()) -> MoEFusion:
        """``dim``: the LLM hidden size; ``expert_names`` (for statistics) must count ``n_experts``."""
        if dim <= 0:
            raise ValueError(f"MoE dim={dim} must be the LLM hidden size (> 0)")
        if n_experts < 1:
            raise ValueError(f"MoE n_experts={n_experts} must be >= 1")
        if expert_names and len(expert_names) != n_experts:
            raise ValueError(f"MoE expert_names has {len(expert_names)} names for n_experts={n_experts}")
        self.validate(tuple(expert_names) or n_experts)
        return MoEFusion(self, dim=dim, n_experts=n_experts, expert_names=tuple(expert_names))


class Adapter(nn.Module):
    """A_i: ``x + W2 gelu(W1 x)``. With ``init='identity'`` W2 is zero, so A_i starts as the identity."""

    def __init__(self, dim: int, hidden: int, init: str = "identity"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        if init == "identity":
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(x)))


ROUTERS = ("learned", "uniform")
ROUTER_CONTEXTS = ("instruction", "embedding", "none")


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits along the last dim, set the others to -inf (Eq. 9's "smallest n-k")."""
    n = logits.shape[-1]
    if k >= n:
        return logits
    idx = logits.topk(k, dim=-1).indices
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, idx, True)
    return logits.masked_fill(~keep, float("-inf"))


@dataclass
class MoEOutput:
    fused: torch.Tensor  # [B, P, D]
    probs: torch.Tensor  # [B, P, n] routing probabilities after top-k masking (zeros outside the top-k)
    logits: torch.Tensor  # [B, P, n] raw router logits
    aux_loss: torch.Tensor  # scalar; already multiplied by balance_weight (0 when off)


class MoEFusion(nn.Module):
    def __init__(self, cfg: MoEConfig, *, dim: int, n_experts: int, expert_names: tuple[str, ...] = ()):
        super().__init__()
        self.cfg = cfg
        self.dim, self.n_experts, self.expert_names = dim, n_experts, expert_names
        n, d = n_experts, dim
        hidden = cfg.adapter_hidden or d
        # One linear map over the concatenated per-position expert tokens: the router can see which expert
        # carries what at this position, not only their average.
        self.router = nn.Linear(n * d, n)
        nn.init.normal_(self.router.weight, std=cfg.router_init_std / math.sqrt(n))
        nn.init.zeros_(self.router.bias)
        self.context_router: nn.Linear | None = None
        if cfg.router_context != "none":
            self.context_router = nn.Linear(d, n, bias=False)
            nn.init.normal_(self.context_router.weight, std=cfg.router_init_std)
        self.adapters = nn.ModuleList(Adapter(d, hidden, cfg.adapter_init) for _ in range(n))

    @staticmethod
    def stack(experts: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Accept ``[B, n, P, D]`` or a list of n ``[B, P, D]`` grids; return ``[B, n, P, D]``."""
        if isinstance(experts, torch.Tensor):
            if experts.dim() != 4:
                raise ValueError(f"expert tokens must be [B, n, P, D], got shape {tuple(experts.shape)}")
            return experts
        shapes = {tuple(t.shape) for t in experts}
        if len(shapes) != 1:
            raise ValueError(
                f"all experts must share one token grid [B, P, D] (resample to the common grid); got {sorted(shapes)}"
            )
        return torch.stack(list(experts), dim=1)

    def route(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits and top-k probabilities for ``x`` of shape [B, n, P, D]."""
        b, n, p, d = x.shape
        logits = self.router(x.permute(0, 2, 1, 3).reshape(b, p, n * d))  # [B, P, n]
        if self.context_router is not None and context is not None:
            if context.shape != (b, d):
                raise ValueError(f"router context must be [B, D] = {(b, d)}, got {tuple(context.shape)}")
            c = F.layer_norm(context.float(), (d,)).to(x.dtype)
            logits = logits + self.context_router(c).unsqueeze(1)
        if self.cfg.router == "uniform":
            return logits, torch.full_like(logits, 1.0 / n)
        probs = top_k_mask(logits.float(), self.cfg.top_k).softmax(dim=-1).to(x.dtype)
        return logits, probs

    def forward(
        self, experts: torch.Tensor | Sequence[torch.Tensor], context: torch.Tensor | None = None
    ) -> MoEOutput:
        x = self.stack(experts)
        if x.shape[1] != self.n_experts or x.shape[-1] != self.dim:
            raise ValueError(
                f"MoE built for n_experts={self.n_experts}, dim={self.dim}; got tokens of shape "
                f"{tuple(x.shape)} ([B, n, P, D])"
            )
        logits, probs = self.route(x, context)
        adapted = torch.stack([a(x[:, i]) for i, a in enumerate(self.adapters)], dim=1)  # [B, n, P, D]
        fused = torch.einsum("bpn,bnpd->bpd", probs, adapted)
        aux = x.new_zeros((), dtype=torch.float32)
        if self.cfg.balance_weight > 0:
            aux = self.cfg.balance_weight * balance_loss(probs, self.cfg.top_k)
        return MoEOutput(fused=fused, probs=probs, logits=logits, aux_loss=aux)


def balance_loss(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Switch-Transformer-style load balance: ``n * sum_i frac_i * mean_P_i``.

    ``frac_i`` is the share of (token, slot) assignments that go to expert i (not differentiable, as in
    Switch); ``mean_P_i`` the mean routing probability (differentiable). Equals 1 when routing is uniform and
    n when every token goes to one expert.
    """
    n = probs.shape[-1]
    flat = probs.reshape(-1, n).float()
    frac = (flat > 0).float().sum(0) / (flat.shape[0] * k)
    return n * (frac.detach() * flat.mean(0)).sum()


def routing_stats(probs: torch.Tensor, k: int | None = None) -> dict[str, object]:
    """Per-expert routing mass, mean router entropy (nats) and load balance for ``probs`` [..., n]."""
    acc = RoutingStats(probs.shape[-1], k)
    acc.add(probs)
    return acc.summary()


class RoutingStats:
    """Accumulates routing statistics over batches (and, in eval, per task type)."""

    def __init__(self, n: int, k: int | None = None):
        self.n, self.k = n, k
        self.tokens = 0
        self.mass = torch.zeros(n, dtype=torch.float64)
        self.selected = torch.zeros(n, dtype=torch.float64)
        self.entropy = 0.0

    @torch.no_grad()
    def add(self, probs: torch.Tensor) -> None:
        flat = probs.detach().reshape(-1, self.n).double().cpu()
        self.tokens += flat.shape[0]
        self.mass += flat.sum(0)
        self.selected += (flat > 0).double().sum(0)
        # 0 * log 0 = 0 for the experts masked out by top-k
        self.entropy += float(-(flat * flat.clamp_min(1e-30).log()).sum())

    def summary(self) -> dict[str, object]:
        if self.tokens == 0:
            return {"tokens": 0, "mass": [0.0] * self.n, "entropy": float("nan"), "load_balance": float("nan")}
        mass = self.mass / self.tokens
        k = self.k or max(1.0, float(self.selected.sum()) / self.tokens)
        frac = self.selected / (self.tokens * k)
        return {
            "tokens": self.tokens,
            "mass": [float(m) for m in mass],
            "entropy": self.entropy / self.tokens,
            "max_entropy": math.log(min(self.n, int(k))) if k else math.log(self.n),
            # 1.0 = perfectly balanced, n = everything on one expert (same quantity as the aux loss)
            "load_balance": float(self.n * (frac * mass).sum()),
        }
