"""MoE fusion (Eq. 9-10): top-k masking, softmax, adapters, statistics, aux loss."""

from __future__ import annotations

import math

import pytest
import torch

from astrea.train.moe import MoEConfig, balance_loss, routing_stats, top_k_mask


def test_top_k_mask_keeps_k_largest():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.5], [3.0, 3.5, 0.0, -2.0]])
    m = top_k_mask(logits, 2)
    assert torch.isinf(m).sum() == 4
    assert m[0].tolist()[1] == 2.0 and m[0].tolist()[3] == 1.5
    assert m[1].tolist()[0] == 3.0 and m[1].tolist()[1] == 3.5
    p = m.softmax(-1)
    assert torch.allclose(p.sum(-1), torch.ones(2))
    # Eq. 9 on the kept logits only
    torch.testing.assert_close(p[0, 1], torch.tensor(math.exp(2.0) / (math.exp(2.0) + math.exp(1.5))))
    assert torch.equal(top_k_mask(logits, 4), logits)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_fused_equals_hand_mixture_with_identity_adapters(k):
    torch.manual_seed(k)
    moe = MoEConfig(top_k=k, router_context="none").build(dim=8, n_experts=4)
    x = torch.randn(2, 4, 5, 8)
    out = moe(x)
    assert out.fused.shape == (2, 5, 8) and out.probs.shape == (2, 5, 4)
    assert ((out.probs > 0).sum(-1) == k).all()
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(2, 5))
    # adapters start as the identity, so f = sum_i P_i f_i exactly
    hand = sum(out.probs[..., i : i + 1] * x[:, i] for i in range(4))
    torch.testing.assert_close(out.fused, hand)
    # the router is one linear map over the concatenated per-position expert tokens
    logits = moe.router(x.permute(0, 2, 1, 3).reshape(2, 5, 32))
    torch.testing.assert_close(out.logits, logits)
    torch.testing.assert_close(out.probs, top_k_mask(logits, k).softmax(-1))


def test_list_input_and_context_change_routing():
    torch.manual_seed(0)
    moe = MoEConfig(top_k=2, router_init_std=0.5).build(dim=6, n_experts=3)
    grids = [torch.randn(2, 4, 6) for _ in range(3)]
    a = moe(grids)
    b = moe(torch.stack(grids, 1))
    torch.testing.assert_close(a.fused, b.fused)
    ctx = torch.randn(2, 6) * 5
    c = moe(grids, context=ctx)
    assert not torch.allclose(a.probs, c.probs)  # the instruction can move the router


def test_adapters_change_output_once_trained_and_gradients_reach_router():
    torch.manual_seed(1)
    moe = MoEConfig(top_k=2, adapter_hidden=3, adapter_init="random").build(dim=4, n_experts=4)
    x = torch.randn(3, 4, 2, 4)
    out = moe(x)
    assert not torch.allclose(out.fused, sum(out.probs[..., i : i + 1] * x[:, i] for i in range(4)))
    out.fused.pow(2).sum().backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    assert all(a.fc1.weight.grad is not None for a in moe.adapters)


def test_balance_loss_and_stats_extremes():
    n = 4
    uniform = torch.full((10, n), 1.0 / n)
    assert balance_loss(uniform, k=n).item() == pytest.approx(1.0)
    one_hot = torch.zeros(10, n)
    one_hot[:, 2] = 1.0
    assert balance_loss(one_hot, k=1).item() == pytest.approx(float(n))
    s = routing_stats(uniform, k=n)
    assert s["mass"] == pytest.approx([0.25] * 4)
    assert s["entropy"] == pytest.approx(math.log(4))
    assert s["load_balance"] == pytest.approx(1.0)
    s = routing_stats(one_hot, k=1)
    assert s["mass"] == pytest.approx([0, 0, 1, 0]) and s["entropy"] == pytest.approx(0.0)
    assert s["load_balance"] == pytest.approx(4.0)


def test_aux_loss_on_by_default_weighted_and_off_at_zero():
    torch.manual_seed(2)
    x = torch.randn(2, 4, 3, 8)
    assert MoEConfig().balance_weight == 0.01  # Switch's weight: keeps top-k experts alive (docs/main_stage.md)
    off = MoEConfig(balance_weight=0.0).build(dim=8)(x)
    assert off.aux_loss.item() == 0.0
    cfg = MoEConfig(balance_weight=0.01)
    moe = cfg.build(dim=8)
    on = moe(x)
    torch.testing.assert_close(on.aux_loss, 0.01 * balance_loss(on.probs, cfg.top_k))
    on.aux_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(top_k=5), "moe.top_k"),
        (dict(top_k=0), "moe.top_k"),
        (dict(adapter_init="zeros"), "moe.adapter_init"),
        (dict(router_context="maybe"), "moe.router_context"),
        (dict(balance_weight=-1.0), "moe.balance_weight"),
        (dict(adapter_hidden=0), "moe.adapter_hidden"),
    ],
)
def test_bad_config_names_field(kw, field):
    with pytest.raises(ValueError, match=field):
        MoEConfig(**kw).build(dim=8, n_experts=4)


@pytest.mark.parametrize(
    "kw,match", [(dict(dim=0), "dim=0"), (dict(dim=8, n_experts=0), "n_experts=0"),
                 (dict(dim=8, expert_names=("a", "b")), "expert_names has 2 names")],
)
def test_bad_sizes_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig().build(**kw)


def test_legacy_router_context_words():
    """Configs written before router_context took words said true / false."""
    for old, new in ((True, "embedding"), ("false", "none")):
        cfg = MoEConfig(router_context=old)
        cfg.validate()
        assert cfg.router_context == new


def test_shape_errors_are_clear():
    moe = MoEConfig().build(dim=8, n_experts=4)
    with pytest.raises(ValueError, match="n_experts=4"):
        moe(torch.randn(2, 3, 5, 8))
    with pytest.raises(ValueError, match="common grid"):
        moe([torch.randn(2, 5, 8), torch.randn(2, 6, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8)])
