"""The causal LLM: a transformers model by hub id / local path, or "tiny-random" for tests and demos.

The LLM is frozen by default; ``lora=True`` wraps it with peft LoRA adapters, which are
then the only trainable LLM weights. "tiny-random" is a small Llama built from a ``LlamaConfig`` with
random weights and the offline byte-level tokenizer: its outputs mean nothing, and every run made
with it says so (``random_weights`` in the run summary and saved config).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from astrea.train.config import LLMConfig
from astrea.train.errors import TrainError

TINY = "tiny-random"


@dataclass
class LoadedLLM:
    model: nn.Module  # a transformers causal LM (possibly peft-wrapped)
    tokenizer: Any
    hidden_size: int
    random_weights: bool
    source: str  # what was loaded: "tiny-random", a hub id, or a path
    text_warmup: dict[str, Any] | None = None  # what the text-only warm-up did (tiny-random), see text_warmup.py
    tokenizer_info: dict[str, Any] | None = None  # tiny-random: which tokenizer it was built with


def build_llm(
    cfg: LLMConfig,
    *,
    from_dir: str | Path | None = None,
    warmup: Any = None,
) -> LoadedLLM:
    """Build (tiny-random) or load the LLM; ``from_dir`` reloads a run's saved copy (resume, eval).

    ``warmup(model, tokenizer)`` runs on a freshly built tiny-random LLM before it is frozen or wrapped
    with LoRA (the text-only warm-up); with ``llm.tokenizer: fitted``, ``warmup.texts()`` first gives the
    texts the tokenizer is fitted on. A reloaded or hub LLM is never warmed up again."""
    if from_dir is not None and Path(from_dir).is_dir():
        loaded = _load_pretrained(str(from_dir), local_only=True)
        loaded.random_weights = cfg.name == TINY
        loaded.source = cfg.name
        if cfg.name == TINY:  # a saved tiny LLM: the byte tokenizer has exactly specials + 256 entries
            n = len(loaded.tokenizer)
            loaded.tokenizer_info = {"kind": "bytes" if n == 260 else "fitted", "vocab": n}
    elif cfg.name == TINY:
        warm = warmup is not None and cfg.text_warmup_steps > 0
        loaded = _tiny_random(cfg, warmup.texts() if warm and cfg.tokenizer == "fitted" else None)
        if warm:
            loaded.text_warmup = warmup(loaded.model, loaded.tokenizer)
    else:
        loaded = _load_pretrained(cfg.name, local_only=_offline())
    model = loaded.model
    for p in model.parameters():
        p.requires_grad_(not cfg.freeze)
    if cfg.lora:
        model = _with_lora(model, cfg)
    loaded.model = model
    return loaded


def save_llm(loaded: LoadedLLM, out_dir: str | Path) -> None:
    """Save the base weights + tokenizer (safetensors) so resume and eval rebuild the same LLM."""
    base = loaded.model
    if hasattr(base, "get_base_model"):  # peft: save the frozen base, LoRA weights live in checkpoints
        base = base.get_base_model()
    # peft wraps the adapted layers in place (q_proj.weight becomes q_proj.base_layer.weight, beside
    # lora_A/lora_B): save the base under its plain names, or a reload re-initialises those layers.
    sd = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k}
    base.save_pretrained(out_dir, state_dict=sd, safe_serialization=True)
    loaded.tokenizer.save_pretrained(out_dir)


def _tiny_random(cfg: LLMConfig, texts: list[str] | None = None) -> LoadedLLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    from astrea.train.tokenizer import byte_level_tokenizer, fitted_tokenizer

    if texts:
        tok = fitted_tokenizer(texts, cfg.tokenizer_vocab)
        info = {"kind": "fitted", "vocab": len(tok), "fitted_on_texts": len(texts),
                "what": "byte-level BPE fitted by astrea on the training split's prompts and targets"}
    else:
        tok = byte_level_tokenizer()
        info = {"kind": "bytes", "vocab": len(tok)}
    conf = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.max_positions,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    # A fixed seed so the same config always gives the same random LLM (its weights are also
    # saved in RUN/llm, which is what resume and eval read).
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(conf)
    model.eval()
    return LoadedLLM(model, tok, cfg.hidden_size, random_weights=True, source=TINY, tokenizer_info=info)


def _load_pretrained(name: str, *, local_only: bool) -> LoadedLLM:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    is_path = Path(name).expanduser().exists()
    if not is_path and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise TrainError(f"llm.name={name!r}: no such directory")
    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(name, local_files_only=local_only)
    except Exception as e:  # noqa: BLE001 - a damaged file in a local directory raises whatever its parser raises
        if not isinstance(e, OSError) and not is_path:
            raise
        first = str(e).splitlines()[0][:200] if str(e) else ""
        what = first if isinstance(e, OSError) else f"{type(e).__name__}: {first}"
        raise TrainError(
            f"llm.name={name!r} could not be loaded ({what}). Give a local directory "
            "with a saved causal LM, download it first (huggingface-cli download), or use --llm tiny-random "
            "for a random-weight test model"
        ) from None
    if tok.pad_token is None:
        # Padding positions are masked out of attention and loss; any id will do.
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model.eval()
    hidden = int(model.get_input_embeddings().weight.shape[1])
    return LoadedLLM(model, tok, hidden, random_weights=False, source=name)


def _with_lora(model: nn.Module, cfg: LLMConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    conf = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, conf)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get(
        "TRANSFORMERS_OFFLINE", "0"
    ) not in ("0", "")
