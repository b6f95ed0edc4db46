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
    mod = RandomResidualAttention(8, p=0.3, gamma=0.7, at_eval="expectation").eval()
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


def test_eval_average_is_the_exact_mean_over_the_draws():
    f, ctx = _inputs()
    mod = RandomResidualAttention(8, p=0.3, gamma=0.7, at_eval="average").eval()
    expected = torch.zeros_like(f)
    for w0 in (0.0, 1.0):
        for w1 in (0.0, 1.0):
            prob = (0.3 if w0 else 0.7) * (0.3 if w1 else 0.7)
            w = torch.tensor([[w0, w1]]).expand(3, 2)
            gate = 1.0 if (w0 or w1) else 0.0
            expected += prob * (f + gate * _reference(mod, f, ctx, w))
    torch.testing.assert_close(mod(f, ctx), expected, rtol=1e-5, atol=1e-6)
    # one earlier expert: stochastic depth's test rule, f + p * attn(Q = F_q(gamma C))
    one = mod(f, ctx[:1])
    torch.testing.assert_close(one, f + 0.3 * _reference(mod, f, ctx[:1], torch.ones(3, 1)), rtol=1e-5, atol=1e-6)


def test_eval_all_draws_every_earlier_expert():
    f, ctx = _inputs()
    mod = RandomResidualAttention(8, p=0.3).eval()  # the default
    torch.testing.assert_close(mod(f, ctx), f + _reference(mod, f, ctx, torch.ones(3, 2)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("at_eval", ["expectation", "average", "all"])
def test_training_is_the_same_whatever_happens_at_eval(at_eval):
    f, ctx = _inputs(b=16)
    ref = RandomResidualAttention(8, p=0.5).train()
    mod = RandomResidualAttention(8, p=0.5, at_eval=at_eval).train()
    mod.load_state_dict(ref.state_dict())
    torch.manual_seed(3)
    a = ref(f, ctx)
    torch.manual_seed(3)
    torch.testing.assert_close(mod(f, ctx), a)


def test_attention_entropy_uniform_and_focused():
    f, ctx = _inputs(b=2, p=4, h=8, n=1)
    mod = RandomResidualAttention(8, p=1.0, at_eval="expectation").eval()
    with torch.no_grad():
        mod.q.weight.zero_()
        mod.q.bias.zero_()  # Q = 0: every row uniform
    torch.testing.assert_close(mod.attention_entropy(f, ctx), torch.full((2,), math.log(4)))
    with torch.no_grad():
        mod.q.weight.copy_(torch.eye(8) * 100)
        mod.k.weight.copy_(torch.eye(8))
        mod.k.bias.zero_()
    assert (mod.attention_entropy(f, [f.clone()]) < 0.5).all()  # Q ~ K: each row on one token
    mod.p = 0.0  # nothing drawn: the attention is unused, NaN
    assert mod.attention_entropy(f, ctx).isnan().all()


def test_at_eval_is_validated():
    with pytest.raises(ValueError, match="residual.at_eval"):
        RandomResidualAttention(8, at_eval="mean")
