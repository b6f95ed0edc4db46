"""Random residual attention (paper Eq. 2-4, METHOD.md).

For image j at stage k, with ``f = f_kj`` the current expert's projected tokens [B, P, H] and
``C_i`` the frozen aligned tokens of each earlier expert i < k:

    Q = F_q(gamma * sum_i w_i C_i),  K = F_k(f),  V = F_v(f),  attn = softmax(Q K^T / sqrt(d)) V

``w_i ~ Bernoulli(p)`` per sample while training (the paper's ``p_i in {0, 1}``). The paper says nothing of
eval; there the draw is replaced according to ``at_eval`` (config ``residual.at_eval``):
- ``"all"`` (default): every earlier expert drawn, ``w_i = 1`` (0 if ``p = 0``): every residual connection
  added, exactly the training computation of the draw with all context present;
- ``"expectation"`` (METHOD.md's reading before issue 13.4): ``w_i = p``, i.e.
  ``Q = F_q(p * gamma * sum_i C_i)``, a query scale training never produced; measured to blur the attention
  (docs/train.md "Residual attention: what it is for, measured");
- ``"average"``: the expected output over the draws, ``E_w[f'(w)] = sum_w P(w) f'(w)``, computed exactly over
  the ``2^n`` draws (with one earlier expert: ``f + p * attn(Q = F_q(gamma C))``, stochastic depth's
  test-time rule).

Two readings, selected by ``reading``:
- ``"skip"`` (default, METHOD.md): ``f' = f + g * attn``;
- ``"attn"`` (the paper's printed Eq. 2): ``f' = g * attn + (1 - g) * f``,
where ``g`` is 1 for a sample with at least one residual drawn (sum_i w_i > 0) and 0 otherwise. Without
the gate an all-zero draw would give Q = F_q(0) = bias: uniform attention, the mean of V, i.e. the
tokens' positions lost; the gate makes "no residual" mean "the stage's own tokens", in both readings.
With no earlier expert (the first stage) the module is the identity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

READINGS = ("skip", "attn")
AT_EVAL = ("expectation", "average", "all")


class RandomResidualAttention(nn.Module):
    def __init__(self, dim: int, *, p: float = 0.5, gamma: float = 1.0, reading: str = "skip", heads: int = 1,
                 at_eval: str = "all"):
        super().__init__()
        if reading not in READINGS:
            raise ValueError(f"residual.reading={reading!r} is not valid; choose one of {list(READINGS)}")
        if at_eval not in AT_EVAL:
            raise ValueError(f"residual.at_eval={at_eval!r} is not valid; choose one of {list(AT_EVAL)}")
        if dim % heads:
            raise ValueError(f"residual.heads={heads} must divide the LLM hidden size {dim}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"residual.p={p} must be in [0, 1]")
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.gamma = nn.Parameter(torch.tensor(float(gamma)))
        self.p, self.reading, self.heads, self.at_eval = p, reading, heads, at_eval

    def draw(self, batch: int, n_prev: int, device: torch.device) -> torch.Tensor:
        """Per-sample residual weights w [B, n_prev]: Bernoulli draws in training, p in eval mode (forward at
        eval uses :meth:`eval_draws`)."""
        probs = torch.full((batch, n_prev), self.p, device=device)
        return torch.bernoulli(probs) if self.training else probs

    def eval_draws(self, n_prev: int, device: torch.device) -> list[tuple[torch.Tensor, float]]:
        """What eval uses in place of the random draw, per ``at_eval``: (weights [n_prev], probability) pairs
        whose outputs are averaged with those probabilities."""
        if self.at_eval == "expectation":
            return [(torch.full((n_prev,), self.p, device=device), 1.0)]
        if self.at_eval == "all":  # a connection that is never drawn (p = 0) is not added either
            return [(torch.full((n_prev,), float(self.p > 0), device=device), 1.0)]
        out = []
        for code in range(2**n_prev):
            w = torch.tensor([(code >> i) & 1 for i in range(n_prev)], dtype=torch.float32, device=device)
            prob = float(self.p ** w.sum() * (1 - self.p) ** (n_prev - w.sum()))
            if prob > 0:
                out.append((w, prob))
        return out

    def forward(
        self, f: torch.Tensor, context: list[torch.Tensor], weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not context:
            return f
        c = torch.stack(context, dim=1).to(f.dtype)  # [B, n, P, H]
        if c.shape[2] != f.shape[1]:
            raise ValueError(
                f"residual attention needs equal token counts: earlier experts have {c.shape[2]}, "
                f"the current one {f.shape[1]}; extract every expert on the same grid"
            )
        if weights is None and not self.training:  # eval: the draws of at_eval, averaged
            draws = self.eval_draws(c.shape[1], f.device)
            return sum(prob * self._mixed(f, c, w.expand(f.shape[0], -1)) for w, prob in draws)
        w = self.draw(f.shape[0], c.shape[1], f.device) if weights is None else weights
        return self._mixed(f, c, w)

    def _mixed(self, f: torch.Tensor, c: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """f'(w) for given per-sample weights w [B, n] (Eq. 2-4 with the gate of the module doc)."""
        w = w.to(f.dtype)
        mixed = self.gamma * (w[:, :, None, None] * c).sum(dim=1)
        attn = self._attend(self.q(mixed), self.k(f), self.v(f))
        gate = (w.sum(dim=1) > 0).to(f.dtype)[:, None, None]
        if self.reading == "skip":
            return f + gate * attn
        return gate * attn + (1 - gate) * f

    @torch.no_grad()
    def attention_entropy(self, f: torch.Tensor, context: list[torch.Tensor], weights: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample mean entropy (nats) of the attention rows, [B]; log P means uniform attention.

        Samples with no residual drawn get NaN (their attention is gated off, it is not used). At eval
        with no ``weights``: the draws of ``at_eval``, averaged with their probabilities over the draws
        that use the attention (at least one expert drawn)."""
        c = torch.stack(context, dim=1).to(f.dtype)
        if weights is None and not self.training:
            draws = [(w, prob) for w, prob in self.eval_draws(c.shape[1], f.device) if w.sum() > 0]
            if not draws:
                return torch.full((f.shape[0],), float("nan"), device=f.device)
            total = sum(prob for _, prob in draws)
            return sum(prob / total * self._entropy(f, c, w.expand(f.shape[0], -1)) for w, prob in draws)
        w = self.draw(f.shape[0], c.shape[1], f.device) if weights is None else weights
        return self._entropy(f, c, w)

    def _entropy(self, f: torch.Tensor, c: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        w = w.to(f.dtype)
        q = self.q(self.gamma * (w[:, :, None, None] * c).sum(dim=1))
        k = self.k(f)
        b, p, h = q.shape
        d = h // self.heads
        qs, ks = (x.view(b, -1, self.heads, d).transpose(1, 2) for x in (q, k))
        a = (qs @ ks.transpose(-1, -2) / math.sqrt(d)).float().softmax(-1)  # [B, heads, P, P]
        ent = -(a * a.clamp_min(1e-30).log()).sum(-1).mean(dim=(1, 2))
        return ent.masked_fill(w.sum(1) == 0, float("nan"))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, p, h = q.shape
        d = h // self.heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, -1, self.heads, d).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v), scale=1.0 / math.sqrt(d))
        return out.transpose(1, 2).reshape(b, p, h)
