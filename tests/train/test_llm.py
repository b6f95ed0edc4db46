"""The run's saved LLM (``RUN/llm``): resume and eval rebuild exactly the LLM the run trained with."""

from __future__ import annotations

import pytest
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


def test_fitted_tokenizer_is_deterministic_reversible_and_shorter_than_bytes():
    from astrea.train.tokenizer import SPECIALS, byte_level_tokenizer, fitted_tokenizer

    texts = [f"a {c} {s} on a {b} background" for c in ("red", "blue", "green") for s in ("circle", "square")
             for b in ("white", "black")] * 3
    a, b = fitted_tokenizer(texts, 300), fitted_tokenizer(texts, 300)
    assert a.get_vocab() == b.get_vocab() and len(a) <= 300
    assert [a.convert_ids_to_tokens(i) for i in range(4)] == list(SPECIALS)
    s = "a red circle on a black background"
    ids = a(s, add_special_tokens=False).input_ids
    assert a.decode(ids) == s and len(ids) < len(byte_level_tokenizer()(s, add_special_tokens=False).input_ids) / 2
    odd = "Zürich, 日本: never seen \t 123"  # bytes the fit never saw still encode and decode exactly
    assert a.decode(a(odd, add_special_tokens=False).input_ids) == odd
    with pytest.raises(ValueError, match="vocab_size"):
        fitted_tokenizer(texts, 100)
