"""Random residual attention (Eq. 2-4): identity cases, Bernoulli draws, expectation at eval."""

from __future__ import annotations

import math

import pytest
import torch

from astrea.train.residual import RandomResidualAttention


def _inputs(b=3, p=4, h=8, n=2):
    torch.manual_seed(0)
    return torch.randn(b, p, h), [torch.randn(b, p, h) for _ in range(n)]


def _reference(mod, f, ctx, w):
    """Eq. 2-4 written out: Q from gamma * sum_i w_i C_i, K and V from f, one head."""
    mixed = mod.gamma * sum(w[:, i, None, None] * c for i, c in enumerate(ctx))
    q, k, v = mod.q(mixed), mod.k(f), mod.v(f)
    attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(f.shape[-1]), -1) @ v
    return attn


@pytest.mark.parametrize("reading", ["skip", "attn"])
def test_p_zero_is_identity(reading):
    f, ctx = _inputs()
    mod = RandomResidualAttention(8, p=0.0, reading=reading)
    for mode in (mod.train(), mod.eval()):
        assert torch.equal(mode(f, ctx), f)


def test_no_earlier_expert_is_identity():
    f, _ = _inputs()
    assert torch.equal(RandomResidualAttention(8, p=1.0)(f, []), f)


def test_eval_uses_expectation_p():
    f, ctx = _inputs()
    mod = RandomResidualAttention(8, p=0.3, gamma=0.7).eval()
    w = torch.full((3, 2), 0.3)
    expected = f + _reference(mod, f, ctx, w)
    torch.testing.assert_close(mod(f, ctx), expected, rtol=1e-5, atol=1e-6)


def test_attn_reading_replaces_features():
    f, ctx = _inputs()
    mod = RandomResidualAttention(8, p=1.0, reading="attn").eval()
    torch.testing.assert_close(mod(f, ctx), _reference(mod, f, ctx, torch.ones(3, 2)), rtol=1e-5, atol=1e-6)


def test_training_draws_bernoulli_per_sample_and_gates_empty_draws():
    f, ctx = _inputs(b=64)
    mod = RandomResidualAttention(8, p=0.5).train()
    torch.manual_seed(1)
    out = mod(f, ctx)
    torch.manual_seed(1)
    w = mod.draw(64, 2, f.device)
    assert set(w.unique().tolist()) == {0.0, 1.0}
    expected = f + (w.sum(1) > 0).float()[:, None, None] * _reference(mod, f, ctx, w)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    none = w.sum(1) == 0
    assert none.any() and torch.equal(out[none], f[none])  # an all-zero draw leaves f untouched


def test_gradients_reach_gamma_and_projections_not_context():
    f, ctx = _inputs()
    f.requires_grad_(True)
    mod = RandomResidualAttention(8, p=1.0).train()
    mod(f, ctx).sum().backward()
    assert mod.gamma.grad is not None and mod.q.weight.grad.abs().sum() > 0
    assert all(c.grad is None for c in ctx)


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="residual.reading"):
        RandomResidualAttention(8, reading="both")
    with pytest.raises(ValueError, match="residual.heads"):
        RandomResidualAttention(8, heads=3)
