"""Momentum contrastive learning between the fused visual tokens and the caption (paper Eq. 5-8).

How the project reads the equations (see ``docs/train.md``):

* Online heads ``E_v`` (pooled visual -> q_v) and ``E_t`` (pooled text -> q_t) are trained by
  back-propagation; momentum heads ``M_v``, ``M_t`` are copies updated only by
  ``theta_M = m * theta_M + (1 - m) * theta_E`` (Eq. 8), never by gradients.
* Two FIFO queues hold past momentum embeddings: text keys ``k_t`` and visual keys ``k_v``.
* Row direction (Eq. 6, r_i): ``S_r = q_v [k_t; queue_t]^T / tau``; the positive of row i is column i.
* Column direction (c_i): ``S_c = q_t [k_v; queue_v]^T / tau``. If the online and momentum heads were the
  same this is exactly the column softmax of ``S_r`` extended with past queries: ``c_i`` sums
  ``exp(S_ji)`` over all visual embeddings j. Using the online *text* head here is what lets ``E_t`` (and
  through the EMA ``M_t``) learn at all; with a momentum-only text side the text keys would stay at their
  random initialisation forever.
* ``L = -(1/B) sum_i [lambda log r_i + (1 - lambda) log c_i]`` (Eq. 7 with 1/B, as METHOD.md reads it:
  the printed 1/N over a B-term sum is a typo; Eq. 5's ``V V^T`` is degenerate, its diagonal is
  self-similarity).

Better than the reference MoCo implementation: the queue accepts any batch size (the last short batch,
batches larger than the queue, wrap-around at the end of the ring) instead of asserting
``queue_size % batch == 0``; queue entries carry a sample id so that a sample seen again (small datasets,
several epochs) is never used as its own negative; keys are gathered across DDP ranks so every rank's
queue is identical, with uneven per-rank batch sizes padded and trimmed.

The queues, pointer, fill count and momentum heads are registered buffers/modules, so they travel in the
state dict and a resumed run continues with the same negatives.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from astrea.registry import check_choice

__all__ = ["MoCoConfig", "MoCo", "MoCoOutput", "Head", "sample_ids", "moco_loss"]


@dataclass
class MoCoConfig:
    """MoCo heads, queue and loss weight: ``TrainConfig.moco``. The widths (the LLM's) come at ``build``."""

    enabled: bool = True  # false: the Tab. 4 "no MoCo" ablation (--no-moco)
    mu: float = 0.1  # Eq. 11 weight of L_moco in L_total (the paper gives no value)
    embed_dim: int = 256
    head_hidden: int | None = None  # None -> linear head; an int -> Linear-GELU-Linear
    queue_size: int = 4096  # 0 = in-batch negatives only
    momentum: float = 0.995  # m in Eq. 8
    tau: float = 0.07  # temperature
    lam: float = 0.5  # lambda in Eq. 7: weight of the row (visual -> text) direction
    # text side: "llm" = mean of the LLM's last hidden states over the caption (frozen LLM: no grad, one
    # extra text-only forward); "embeddings" = mean input embedding (bag of tokens, cheapest)
    text_encoder: str = "llm"
    max_caption_tokens: int = 64
    mask_same_sample: bool = True  # never use a queued copy of the same sample as a negative

    def validate(self) -> None:
        """Every range of ``moco.*`` (ValueError naming the dotted field)."""
        check_choice("moco.text_encoder", self.text_encoder, ("llm", "embeddings"))
        if self.mu < 0:
            raise ValueError(f"moco.mu={self.mu} must be >= 0")
        if self.embed_dim <= 0:
            raise ValueError(f"moco.embed_dim={self.embed_dim} must be > 0")
        if self.head_hidden is not None and self.head_hidden <= 0:
            raise ValueError(f"moco.head_hidden={self.head_hidden} must be > 0 (or None for a linear head)")
        if self.queue_size < 0:
            raise ValueError(f"moco.queue_size={self.queue_size} must be >= 0 (0 = in-batch negatives only)")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"moco.momentum={self.momentum} must be in [0, 1) (Eq. 8)")
        if self.tau <= 0:
            raise ValueError(f"moco.tau={self.tau} must be > 0")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"moco.lam={self.lam} must be in [0, 1] (Eq. 7)")
        if self.max_caption_tokens < 1:
            raise ValueError(f"moco.max_caption_tokens={self.max_caption_tokens} must be >= 1")

    def build(self, visual_dim: int, text_dim: int) -> MoCo:
        """``visual_dim``/``text_dim``: the widths of the pooled visual and text inputs (the LLM's)."""
        if visual_dim <= 0 or text_dim <= 0:
            raise ValueError(f"MoCo visual_dim={visual_dim} and text_dim={text_dim} must be > 0 (the LLM width)")
        self.validate()
        return MoCo(self, visual_dim=visual_dim, text_dim=text_dim)


class Head(nn.Module):
    def __init__(self, d_in: int, d_out: int, hidden: int | None):
        super().__init__()
        if hidden is None:
            self.net: nn.Module = nn.Linear(d_in, d_out)
        else:
            self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x.float()), dim=-1)


def sample_ids(keys: Sequence[str]) -> torch.Tensor:
    """Stable int64 ids for sample keys (blake2b, not Python's salted hash): the same key -> the same id
    in every process and across resumes. -1 is reserved for "no id"."""
    out = []
    for k in keys:
        v = int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little", signed=True)
        out.append(v if v != -1 else 0)
    return torch.tensor(out, dtype=torch.long)


def moco_loss(
    q_v: torch.Tensor,
    q_t: torch.Tensor,
    keys_t: torch.Tensor,
    keys_v: torch.Tensor,
    tau: float,
    lam: float,
    neg_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Two-way InfoNCE. ``keys_*`` are [B + N, E] with the current batch's keys first (positives on the
    diagonal); ``neg_mask`` [B, B + N] is True where a column must be ignored (same sample queued)."""
    b = q_v.shape[0]
    s_r = q_v @ keys_t.t() / tau
    s_c = q_t @ keys_v.t() / tau
    if neg_mask is not None:
        s_r = s_r.masked_fill(neg_mask, float("-inf"))
        s_c = s_c.masked_fill(neg_mask, float("-inf"))
    diag = torch.arange(b, device=q_v.device)
    log_r = s_r.log_softmax(dim=1)[diag, diag]
    log_c = s_c.log_softmax(dim=1)[diag, diag]
    return -(lam * log_r + (1.0 - lam) * log_c).mean()


@dataclass
class MoCoOutput:
    loss: torch.Tensor
    q_v: torch.Tensor  # [B, E] online visual embedding (retrieval uses q_v . q_t)
    q_t: torch.Tensor  # [B, E] online text embedding
    negatives: int  # queue entries used this step


def _gather(x: torch.Tensor) -> torch.Tensor:
    """all_gather along dim 0 with uneven sizes (pad to the max, trim). No-op outside DDP."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    ws = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(ws)]
    dist.all_gather(sizes, n)
    m = int(max(s.item() for s in sizes))
    pad = x.new_zeros((m - x.shape[0], *x.shape[1:]))
    parts = [x.new_zeros((m, *x.shape[1:])) for _ in range(ws)]
    dist.all_gather(parts, torch.cat([x, pad]))
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


class MoCo(nn.Module):
    def __init__(self, cfg: MoCoConfig, *, visual_dim: int, text_dim: int):
        super().__init__()
        self.cfg = cfg
        self.visual_dim, self.text_dim = visual_dim, text_dim
        self.online_v = Head(visual_dim, cfg.embed_dim, cfg.head_hidden)
        self.online_t = Head(text_dim, cfg.embed_dim, cfg.head_hidden)
        self.momentum_v = copy.deepcopy(self.online_v)
        self.momentum_t = copy.deepcopy(self.online_t)
        for p in (*self.momentum_v.parameters(), *self.momentum_t.parameters()):
            p.requires_grad_(False)
        n, e = cfg.queue_size, cfg.embed_dim
        self.register_buffer("queue_t", torch.zeros(n, e))
        self.register_buffer("queue_v", torch.zeros(n, e))
        self.register_buffer("queue_ids", torch.full((n,), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))

    def online_parameters(self) -> list[nn.Parameter]:
        return [*self.online_v.parameters(), *self.online_t.parameters()]

    @torch.no_grad()
    def momentum_update(self) -> None:
        """Eq. 8. Call once per optimizer step (after ``optimizer.step()``), not per forward: with gradient
        accumulation a per-forward update would apply m several times against the same theta_E."""
        m = self.cfg.momentum
        for online, mom in ((self.online_v, self.momentum_v), (self.online_t, self.momentum_t)):
            for pe, pm in zip(online.parameters(), mom.parameters()):
                pm.mul_(m).add_(pe.detach(), alpha=1.0 - m)

    def queued(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The valid queue entries (text keys, visual keys, ids); order is irrelevant to the loss."""
        n = int(self.queue_filled)
        return self.queue_t[:n], self.queue_v[:n], self.queue_ids[:n]

    @torch.no_grad()
    def enqueue(self, k_t: torch.Tensor, k_v: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """FIFO write of any number of keys, wrapping around the ring; keeps the newest when b > size."""
        size = self.cfg.queue_size
        if size == 0:
            return
        if ids is None:
            ids = torch.full((k_t.shape[0],), -1, dtype=torch.long, device=k_t.device)
        k_t, k_v, ids = _gather(k_t.float()), _gather(k_v.float()), _gather(ids)
        b = k_t.shape[0]
        if b > size:
            k_t, k_v, ids, b = k_t[-size:], k_v[-size:], ids[-size:], size
        ptr = int(self.queue_ptr)
        idx = (torch.arange(b, device=self.queue_t.device) + ptr) % size
        self.queue_t[idx] = k_t.to(self.queue_t)
        self.queue_v[idx] = k_v.to(self.queue_v)
        self.queue_ids[idx] = ids.to(self.queue_ids)
        self.queue_ptr.fill_((ptr + b) % size)
        self.queue_filled.fill_(min(size, int(self.queue_filled) + b))

    def embed(self, visual: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.online_v(visual), self.online_t(text)

    def forward(
        self,
        visual: torch.Tensor,
        text: torch.Tensor,
        ids: torch.Tensor | None = None,
        update_queue: bool | None = None,
    ) -> MoCoOutput:
        """Loss for pooled ``visual`` [B, Dv] and ``text`` [B, Dt]. In training mode the batch's momentum
        keys are enqueued after the loss is formed (``update_queue`` overrides). Held-out evaluation runs in
        eval mode and leaves the queue untouched."""
        if visual.shape[0] != text.shape[0]:
            raise ValueError(f"MoCo got {visual.shape[0]} visual and {text.shape[0]} text rows")
        q_v, q_t = self.embed(visual, text)
        with torch.no_grad():
            k_v, k_t = self.momentum_v(visual), self.momentum_t(text)
        qt, qv, qids = self.queued()
        # clone: the buffers are written in place by enqueue() before backward() reads them
        keys_t = torch.cat([k_t, qt.clone()])
        keys_v = torch.cat([k_v, qv.clone()])
        neg_mask = None
        b = visual.shape[0]
        if ids is not None:
            ids = ids.to(visual.device)
            # a positive that appears twice in one batch (duplicate keys) or again in the queue must not be a
            # negative of itself; the diagonal (the true positive) stays
            all_ids = torch.cat([ids, qids.clone()])
            same = (ids[:, None] == all_ids[None, :]) & (ids[:, None] != -1)
            same[torch.arange(b), torch.arange(b)] = False
            if self.cfg.mask_same_sample and bool(same.any()):
                neg_mask = same
        loss = moco_loss(q_v, q_t, keys_t, keys_v, self.cfg.tau, self.cfg.lam, neg_mask)
        if self.training if update_queue is None else update_queue:
            self.enqueue(k_t, k_v, ids)
        return MoCoOutput(loss=loss, q_v=q_v, q_t=q_t, negatives=int(qt.shape[0]))
