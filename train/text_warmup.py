"""Text-only warm-up of the tiny LLM: give ``tiny-random`` the text side before it meets any image.

The paper aligns experts to a *pretrained* LLM (Vicuna-7B): it already knows the language of the targets,
so the visual path only has to supply what the text cannot know, the image. A tiny random LLM knows
nothing; measured (issue 13), pre-alignment against it learns no image dependence at all (held-out L_reg
~5.4 = ln of the byte vocabulary with true and with permuted images alike), frozen or with LoRA.

The warm-up gives the embedded default the paper's shape: before the first stage, the tiny LLM is trained
(all its weights, next-token loss on the target tokens, as Eq. 1 without visual tokens) on the prompts and
targets that the run's stages render from the **training split** (held-out keys are never read), then
handed to pre-alignment like a pretrained LLM. It learns what can be said without looking (the words,
the formats, how often each caption occurs); what remains is exactly what the image must supply, so the
held-out gap between true and permuted images measures the visual path.

Only for ``llm.name: tiny-random``; a hub/local LLM is used as it is. The warmed weights are saved in
``RUN/llm`` (resume and eval reload them) and ``run.json`` says ``text_warmup`` with its numbers: a
random-init LLM warmed on this dataset's texts, not a pretrained model, and every report says so.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from astrea.train.model import IGNORE

Pair = tuple[str, str]  # (prompt, target)


def collect_rendered(records: Iterable[dict[str, Any]], renders: list[Callable[[dict[str, Any]], Any]],
                     limit: int) -> list[Any]:
    """Renderings (objects with ``.prompt`` and ``.target``) that ``renders`` make from ``records``, one per
    distinct (prompt, target), at most ``limit``."""
    seen: dict[Pair, Any] = {}
    for rec in records:
        for render in renders:
            r = render(rec)
            if r is not None:
                seen.setdefault((r.prompt, r.target), r)
        if len(seen) >= limit:
            break
    return list(seen.values())


def collect_texts(records: Iterable[dict[str, Any]], renders: list[Callable[[dict[str, Any]], Any]],
                  limit: int) -> list[Pair]:
    """Distinct (prompt, target) pairs that the given render functions make from ``records``."""
    return [(r.prompt, r.target) for r in collect_rendered(records, renders, limit)]


def warm_up(model: nn.Module, tokenizer: Any, texts: list[Pair], *, steps: int, batch_size: int, lr: float,
            max_len: int, seed: int) -> dict[str, Any]:
    """Train every weight of ``model`` on ``texts`` (loss on target tokens); returns what it did."""
    if not texts:
        raise ValueError("no training texts to warm the LLM up on")
    rng = random.Random(seed)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows: list[tuple[list[int], int]] = []  # (ids, prompt length)
    for prompt, target in texts:
        p = bos + tokenizer(prompt, add_special_tokens=False).input_ids
        t = tokenizer(target, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append(((p + t)[:max_len], len(p)))
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))
    )
    device = next(model.parameters()).device
    model.train()
    losses = []
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            more = list(range(len(rows)))
            rng.shuffle(more)
            order += more
        batch = [rows[order.pop()] for _ in range(min(batch_size, len(rows)))]
        n = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), n), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, (x, plen) in enumerate(batch):
            ids[i, : len(x)] = torch.tensor(x)
            labels[i, plen : len(x)] = torch.tensor(x[plen:])
            mask[i, : len(x)] = 1
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return {
        "steps": steps, "texts": len(texts), "batch_size": batch_size, "lr": lr,
        "loss_first": losses[0], "loss_last": sum(tail) / len(tail),
        "what": "tiny-random LLM trained by astrea on this dataset's training-split target texts, no images",
    }
