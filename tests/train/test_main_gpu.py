"""The main stage on a CUDA device under bf16 autocast, as the trainer runs it on GPU."""

from __future__ import annotations

import pytest
import torch

from tests.train.test_main_stage import records, setup, trainable

pytestmark = pytest.mark.gpu


def test_bf16_autocast_steps_are_finite_and_match_fp32_cpu():
    cfg, model, main, collate = setup()
    batch = collate(records(8))
    # fp32 reference on the CPU, eval mode (no Bernoulli draws, no queue writes)
    model.eval()
    with torch.no_grad():
        v_cpu = main.visual_tokens(model, batch)
        reg_cpu, _ = model.lm_loss(v_cpu, batch["input_ids"], batch["attention_mask"], batch["labels"])

    dev = torch.device("cuda")
    model.to(dev)
    b = {**batch, **{k: batch[k].to(dev) for k in ("input_ids", "attention_mask", "labels")}}
    b["tokens"] = {e: t.to(dev).float() for e, t in batch["tokens"].items()}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        v_gpu = main.visual_tokens(model, b)
        reg_gpu, _ = model.lm_loss(v_gpu, b["input_ids"], b["attention_mask"], b["labels"])
    assert abs(float(reg_gpu) - float(reg_cpu)) < 0.05 * float(reg_cpu)
    torch.testing.assert_close(main.last_output.probs.float().sum(-1), torch.ones(8, v_gpu.shape[1], device=dev), atol=2e-2, rtol=0)

    params = trainable(model, main)
    model.train()
    model.llm.eval()
    opt = torch.optim.AdamW(params, lr=1e-3)
    moco = model.extras["moco"]
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            visual = main.visual_tokens(model, b)
            reg, _ = model.lm_loss(visual, b["input_ids"], b["attention_mask"], b["labels"])
            extras = main.extra_losses(model, b, visual)
        loss = reg + sum(extras.values())
        assert torch.isfinite(loss)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        main.after_step(model)
    assert moco.queue_t.dtype == torch.float32 and int(moco.queue_filled) == min(24, moco.cfg.queue_size)
    assert torch.isfinite(moco.queue_t).all()
    # queued keys are unit vectors (l2-normalised momentum embeddings), even when computed in bf16
    norms = moco.queue_t[: int(moco.queue_filled)].norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-2, rtol=0)
