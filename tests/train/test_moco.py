"""MoCo (Eq. 5-8) against a plain reference written here with explicit loops."""

from __future__ import annotations

import math

import pytest
import torch

from astrea.train.moco import MoCo, MoCoConfig, sample_ids


def _cfg(**kw) -> MoCoConfig:
    base = dict(embed_dim=4, queue_size=8, momentum=0.9, tau=0.1, lam=0.3)
    base.update(kw)
    return MoCoConfig(**base)


def reference_loss(q_v, q_t, k_t_all, k_v_all, tau, lam, skip=None):
    """Eq. 6-7 term by term: r_i = e^{S_ii} / sum_j e^{S_ij}, c_i likewise for the column direction."""
    b = q_v.shape[0]
    total = 0.0
    for i in range(b):
        num_r = torch.exp(q_v[i] @ k_t_all[i] / tau)
        den_r = sum(
            torch.exp(q_v[i] @ k_t_all[j] / tau) for j in range(k_t_all.shape[0]) if not (skip and (i, j) in skip)
        )
        num_c = torch.exp(q_t[i] @ k_v_all[i] / tau)
        den_c = sum(
            torch.exp(q_t[i] @ k_v_all[j] / tau) for j in range(k_v_all.shape[0]) if not (skip and (i, j) in skip)
        )
        total = total + lam * torch.log(num_r / den_r) + (1 - lam) * torch.log(num_c / den_c)
    return -total / b


def _norm(x):
    return x / x.norm(dim=-1, keepdim=True)


def test_loss_and_gradients_match_reference():
    torch.manual_seed(0)
    cfg = _cfg()
    moco = cfg.build(visual_dim=6, text_dim=5)
    # fill part of the queue so negatives come from both the batch and the queue
    moco.enqueue(_norm(torch.randn(3, 4)), _norm(torch.randn(3, 4)))
    v = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 5)
    out = moco(v, t, update_queue=False)
    out.loss.backward()
    grads = [p.grad.clone() for p in moco.online_parameters()]
    g_v = v.grad.clone()

    # reference: the same heads applied by hand
    ref = MoCo(cfg, visual_dim=6, text_dim=5)
    ref.load_state_dict(moco.state_dict())
    v2 = v.detach().clone().requires_grad_(True)
    wv, bv = ref.online_v.net.weight, ref.online_v.net.bias
    wt, bt = ref.online_t.net.weight, ref.online_t.net.bias
    q_v = _norm(v2 @ wv.t() + bv)
    q_t = _norm(t @ wt.t() + bt)
    with torch.no_grad():
        k_v = _norm(v2 @ ref.momentum_v.net.weight.t() + ref.momentum_v.net.bias)
        k_t = _norm(t @ ref.momentum_t.net.weight.t() + ref.momentum_t.net.bias)
    k_t_all = torch.cat([k_t, ref.queue_t[:3]])
    k_v_all = torch.cat([k_v, ref.queue_v[:3]])
    loss = reference_loss(q_v, q_t, k_t_all, k_v_all, cfg.tau, cfg.lam)
    loss.backward()
    assert out.negatives == 3
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v2.grad, g_v, rtol=1e-4, atol=1e-6)
    for g, p in zip(grads, ref.online_parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
    # no gradient ever reaches the momentum heads
    assert all(p.grad is None for p in (*moco.momentum_v.parameters(), *moco.momentum_t.parameters()))


def test_lambda_extremes_select_one_direction():
    torch.manual_seed(1)
    v, t = torch.randn(3, 6), torch.randn(3, 5)
    base = _cfg(queue_size=0)
    m = base.build(visual_dim=6, text_dim=5)
    sd = m.state_dict()
    losses = {}
    for lam in (0.0, 1.0, 0.25):
        mm = _cfg(queue_size=0, lam=lam).build(visual_dim=6, text_dim=5)
        mm.load_state_dict(sd)
        losses[lam] = mm(v, t).loss
    # Eq. 7 is linear in lambda
    torch.testing.assert_close(losses[0.25], 0.25 * losses[1.0] + 0.75 * losses[0.0])
    assert not torch.isclose(losses[0.0], losses[1.0])


def test_queue_short_batches_and_wraparound():
    cfg = _cfg(queue_size=5)
    moco = cfg.build(visual_dim=6, text_dim=5)
    seen = []
    for b in (2, 2, 3, 1):  # 8 keys through a ring of 5, the last batch short and not a divisor of 5
        k = torch.arange(len(seen), len(seen) + b, dtype=torch.float32)[:, None].repeat(1, 4)
        seen += list(range(len(seen), len(seen) + b))
        moco.enqueue(k, -k)
    qt, qv, _ = moco.queued()
    assert int(moco.queue_filled) == 5 and int(moco.queue_ptr) == 8 % 5
    assert sorted(qt[:, 0].tolist()) == [3.0, 4.0, 5.0, 6.0, 7.0]  # the 5 newest, FIFO
    torch.testing.assert_close(qv, -qt)
    # a batch bigger than the whole queue keeps its newest entries
    moco.enqueue(torch.arange(7, dtype=torch.float32)[:, None].repeat(1, 4), torch.zeros(7, 4))
    assert sorted(moco.queued()[0][:, 0].tolist()) == [2.0, 3.0, 4.0, 5.0, 6.0]


def test_partial_queue_uses_only_filled_entries():
    moco = _cfg(queue_size=10).build(visual_dim=6, text_dim=5)
    moco.enqueue(torch.ones(2, 4), torch.ones(2, 4))
    assert moco.queued()[0].shape == (2, 4)
    out = moco(torch.randn(3, 6), torch.randn(3, 5))  # training mode: enqueues 3 more
    assert out.negatives == 2 and int(moco.queue_filled) == 5
    moco.eval()
    moco(torch.randn(3, 6), torch.randn(3, 5))
    assert int(moco.queue_filled) == 5  # eval never touches the queue


def test_momentum_update_is_exact():
    torch.manual_seed(2)
    moco = _cfg(head_hidden=3, momentum=0.75).build(visual_dim=6, text_dim=5)
    with torch.no_grad():
        for p in moco.online_parameters():
            p.add_(torch.randn_like(p))
    before_m = [p.clone() for p in (*moco.momentum_v.parameters(), *moco.momentum_t.parameters())]
    online = [p.clone() for p in (*moco.online_v.parameters(), *moco.online_t.parameters())]
    moco.momentum_update()
    after = list((*moco.momentum_v.parameters(), *moco.momentum_t.parameters()))
    assert len(after) == len(online) == 8
    for pm0, pe, pm in zip(before_m, online, after):
        torch.testing.assert_close(pm, 0.75 * pm0 + 0.25 * pe, rtol=0, atol=1e-7)
    # online parameters untouched by the update
    for pe, p in zip(online, (*moco.online_v.parameters(), *moco.online_t.parameters())):
        assert torch.equal(pe, p)


def test_same_sample_in_queue_is_not_a_negative():
    torch.manual_seed(3)
    cfg = _cfg(queue_size=4, lam=0.5)
    moco = cfg.build(visual_dim=6, text_dim=5)
    v, t = torch.randn(2, 6), torch.randn(2, 5)
    ids = sample_ids(["a", "b"])
    moco(v, t, ids=ids)  # queues a and b
    moco.eval()
    masked = moco(v, t, ids=ids).loss
    unmasked = moco(v, t).loss
    # reference with the two queued copies of a/b skipped for their own rows
    with torch.no_grad():
        q_v, q_t = moco.embed(v, t)
        k_t_all = torch.cat([moco.momentum_t(t), moco.queue_t[:2]])
        k_v_all = torch.cat([moco.momentum_v(v), moco.queue_v[:2]])
        ref = reference_loss(q_v, q_t, k_t_all, k_v_all, cfg.tau, cfg.lam, skip={(0, 2), (1, 3)})
        ref_unmasked = reference_loss(q_v, q_t, k_t_all, k_v_all, cfg.tau, cfg.lam)
    torch.testing.assert_close(masked, ref)
    torch.testing.assert_close(unmasked, ref_unmasked)
    assert masked < unmasked  # a queued duplicate of the positive is a hard negative


def test_queue_and_momentum_state_round_trip_through_state_dict(tmp_path):
    from safetensors.torch import load_file, save_file

    moco = _cfg().build(visual_dim=6, text_dim=5)
    moco(torch.randn(3, 6), torch.randn(3, 5), ids=sample_ids(["x", "y", "z"]))
    moco.momentum_update()
    sd = {k: v.contiguous() for k, v in moco.state_dict().items()}
    assert {"queue_t", "queue_v", "queue_ids", "queue_ptr", "queue_filled"} <= set(sd)
    assert any(k.startswith("momentum_v.") for k in sd)
    save_file(sd, str(tmp_path / "m.safetensors"))
    fresh = _cfg().build(visual_dim=6, text_dim=5)
    fresh.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    for k, v in moco.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k


def test_sample_ids_stable_and_distinct():
    a = sample_ids(["000001", "000002", "000001"])
    assert a[0] == a[2] and a[0] != a[1] and a.dtype == torch.long
    assert torch.equal(a, sample_ids(["000001", "000002", "000001"]))


@pytest.mark.parametrize(
    "field,value", [("momentum", 1.0), ("tau", 0.0), ("lam", 1.5), ("queue_size", -1), ("embed_dim", 0),
                    ("mu", -0.1), ("max_caption_tokens", 0), ("text_encoder", "bert")]
)
def test_bad_config_names_field(field, value):
    with pytest.raises(ValueError, match=f"moco.{field}"):
        _cfg(**{field: value}).build(visual_dim=6, text_dim=5)


def test_perfect_alignment_gives_low_loss():
    # identical heads and text == visual features: the loss is far below the chance value log(B + N)
    cfg = MoCoConfig(embed_dim=8, queue_size=0, tau=0.05)
    m = cfg.build(visual_dim=8, text_dim=8)
    m.online_t.load_state_dict(m.online_v.state_dict())
    m.momentum_t.load_state_dict(m.online_v.state_dict())
    m.momentum_v.load_state_dict(m.online_v.state_dict())
    x = torch.eye(8)
    with torch.no_grad():
        assert float(m(x, x).loss) < 0.1 * math.log(8)
