"""The run's saved LLM (``RUN/llm``): resume and eval rebuild exactly the LLM the run trained with."""

from __future__ import annotations

import torch

from astrea.train.config import TrainConfig
from astrea.train.llm import build_llm, save_llm


def _cfg(lora: bool):
    cfg = TrainConfig()
    cfg.llm.hidden_size, cfg.llm.layers, cfg.llm.heads, cfg.llm.intermediate_size = 16, 1, 2, 32
    cfg.llm.lora = lora
    return cfg.llm


def _base_weights(model) -> dict[str, torch.Tensor]:
    """The base model's weights under their plain transformers names (LoRA adapters left out)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k}


def test_a_saved_llm_reloads_with_every_base_weight_it_had(tmp_path):
    for lora in (False, True):
        torch.manual_seed(0)
        cfg = _cfg(lora)
        first = build_llm(cfg)
        save_llm(first, tmp_path / f"llm-{lora}")
        torch.manual_seed(123)  # a reload must not depend on the RNG: nothing may be initialised anew
        again = build_llm(cfg, from_dir=tmp_path / f"llm-{lora}")
        want, got = _base_weights(first.model), _base_weights(again.model)
        assert set(got) == set(want), lora
        for k in want:
            assert torch.equal(got[k], want[k]), (lora, k)
