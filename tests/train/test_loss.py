"""Eq. 1: next-token loss on target tokens only, checked against a hand computation."""

from __future__ import annotations

import math

import torch

from astrea.train.config import TrainConfig
from astrea.train.llm import build_llm
from astrea.train.model import IGNORE, AstreaModel


def _model() -> AstreaModel:
    cfg = TrainConfig()
    cfg.llm.hidden_size, cfg.llm.layers, cfg.llm.heads, cfg.llm.intermediate_size = 16, 1, 2, 32
    return AstreaModel(build_llm(cfg.llm), {"siglip": 8}, cfg)


def test_loss_equals_hand_computation_on_target_tokens_only():
    torch.manual_seed(0)
    m = _model().eval()
    visual = torch.randn(2, 3, m.hidden_size)  # P = 3 visual tokens
    ids = torch.tensor([[1, 40, 41, 42, 43, 2], [1, 50, 51, 52, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    # prompt = first 3 text tokens (bos + 2), padding ignored
    labels = torch.tensor([[IGNORE, IGNORE, IGNORE, 42, 43, 2], [IGNORE, IGNORE, IGNORE, 52, IGNORE, IGNORE]])
    loss, n = m.lm_loss(visual, ids, mask, labels)

    # By hand: run the LLM on [visual; text], and for each labelled text position i take
    # -log p(token_i | everything before), read at sequence position P + i - 1.
    with torch.no_grad():
        emb = m.llm.get_input_embeddings()(ids)
        full_mask = torch.cat([torch.ones(2, 3, dtype=torch.long), mask], 1)
        logits = m.llm(inputs_embeds=torch.cat([visual, emb], 1), attention_mask=full_mask).logits
    terms = []
    for b in range(2):
        for i in range(ids.shape[1]):
            if labels[b, i] == IGNORE:
                continue
            logp = torch.log_softmax(logits[b, 3 + i - 1].double(), -1)
            terms.append(-float(logp[labels[b, i]]))
    assert int(n) == len(terms) == 4
    assert math.isclose(float(loss), sum(terms) / len(terms), rel_tol=1e-5)


def test_loss_ignores_what_the_prompt_says():
    """Changing prompt tokens changes the context but a fully masked sequence carries no loss."""
    torch.manual_seed(0)
    m = _model().eval()
    visual = torch.randn(1, 2, m.hidden_size)
    ids = torch.tensor([[1, 40, 41]])
    labels = torch.full_like(ids, IGNORE)
    loss, n = m.lm_loss(visual, ids, torch.ones_like(ids), labels)
    assert int(n) == 0 and float(loss) == 0.0


def test_gradient_reaches_visual_tokens_not_frozen_llm():
    torch.manual_seed(0)
    m = _model()
    m.llm.requires_grad_(False)
    visual = torch.randn(1, 2, m.hidden_size, requires_grad=True)
    ids = torch.tensor([[1, 40, 41, 2]])
    labels = torch.tensor([[IGNORE, IGNORE, 41, 2]])
    loss, _ = m.lm_loss(visual, ids, torch.ones_like(ids), labels)
    loss.backward()
    assert visual.grad is not None and visual.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.llm.parameters())
