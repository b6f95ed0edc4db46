"""Answers from a trained run: the visual grid of one image, a prompt, then greedy or sampled decoding.

The image's features come from the store (a key) or from experts run online (astrea.extract.online; the command: astrea.generate); the
stage whose visual path is used is the run's last (the main stage's MoE fusion after instruction tuning).
The prompt is rendered exactly as training rendered a conversation (astrea.train.instructions), so the
model continues where an assistant turn began in training, and stops at EOS / the chat template's end of
turn or after ``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from astrea.train.errors import TrainError
from astrea.train.model import IGNORE

# end-of-turn markers of common chat templates (the tokenizer's own EOS is always a stop token)
TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>")


@dataclass
class GenerateOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise TrainError(f"generate max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise TrainError(f"generate temperature={self.temperature} must be >= 0 (0: greedy)")
        if not 0 < self.top_p <= 1:
            raise TrainError(f"generate top_p={self.top_p} must be in (0, 1]")


def stop_ids(tokenizer: Any) -> set[int]:
    out = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    out |= {vocab[t] for t in TURN_ENDS if t in vocab}
    return out


def feature_batch(features: dict[str, dict[str, Any]], experts: list[str], device: torch.device) -> dict[str, Any]:
    """{expert: {"tokens": [P, D], "pooled": [D]}} -> the batch's ``tokens`` / ``pooled`` for one sample."""
    missing = [e for e in experts if e not in features]
    if missing:
        raise TrainError(f"the image has no features of expert(s) {missing}, which the run's model reads")
    return {
        "tokens": {e: torch.as_tensor(np.asarray(features[e]["tokens"], np.float32))[None].to(device) for e in experts},
        "pooled": {e: torch.as_tensor(np.asarray(features[e]["pooled"], np.float32))[None].to(device) for e in experts},
    }


@torch.no_grad()
def generate(model: Any, stage: Any, features: dict[str, dict[str, Any]], prompt: str, opts: GenerateOptions,
             *, key: str = "", on_text: Callable[[str], None] | None = None) -> str:
    """The model's continuation of ``prompt`` (already rendered) after the image's visual tokens.

    ``on_text`` receives each new piece of decoded text as soon as it is known (streaming)."""
    opts.validate()
    tok = model.tokenizer
    device = next(model.parameters()).device
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    ids = torch.tensor([bos + tok(prompt, add_special_tokens=False).input_ids], device=device)
    batch = {
        "keys": [key], "captions": [None], "input_ids": ids, "attention_mask": torch.ones_like(ids),
        "labels": torch.full_like(ids, IGNORE), **feature_batch(features, stage.required_experts(), device),
    }
    visual = stage.visual_tokens(model, batch)
    emb = model.llm.get_input_embeddings()
    inputs = torch.cat([visual.to(emb.weight.dtype), emb(ids)], dim=1)
    mask = torch.ones(inputs.shape[:2], dtype=torch.long, device=device)
    stops = stop_ids(tok)
    gen = torch.Generator(device="cpu").manual_seed(opts.seed)
    out_ids: list[int] = []
    shown = ""
    out = model.llm(inputs_embeds=inputs, attention_mask=mask, use_cache=True)
    for _ in range(opts.max_new_tokens):
        logits = out.logits[0, -1].float().cpu()
        nxt = _pick(logits, opts, gen)
        if nxt in stops:
            break
        out_ids.append(nxt)
        text = tok.decode(out_ids, skip_special_tokens=True)
        if on_text is not None and len(text) > len(shown) and not text.endswith("\ufffd"):
            on_text(text[len(shown):])
            shown = text
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        step = emb(torch.tensor([[nxt]], device=device))
        out = _step(model.llm, step, mask, out)
    text = tok.decode(out_ids, skip_special_tokens=True)
    if on_text is not None and len(text) > len(shown):
        on_text(text[len(shown):])
    return text


def _step(llm: Any, step: torch.Tensor, mask: torch.Tensor, prev: Any) -> Any:
    """One decoding step on the previous output's KV cache (``cache`` in transformers >= 5.x, else
    ``past_key_values``)."""
    cache = getattr(prev, "cache", None)
    if cache is not None:
        return llm(inputs_embeds=step, attention_mask=mask, cache=cache, use_cache=True)
    return llm(inputs_embeds=step, attention_mask=mask, past_key_values=prev.past_key_values, use_cache=True)


def _pick(logits: torch.Tensor, opts: GenerateOptions, gen: torch.Generator) -> int:
    if opts.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / opts.temperature, dim=-1)
    if opts.top_p < 1:
        sorted_p, idx = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < opts.top_p  # the smallest set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


def answer_stage(stages: list[Any]) -> Any:
    """The stage whose visual path answers: the run's last stage (the main stage after instruction tuning)."""
    if not stages:
        raise TrainError("the run has no stages")
    return stages[-1]


def stored_features(store: str, dataset: str, experts: list[str], key: str,
                    fingerprints: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The stored features of ``key`` for each expert, read with the run's exact fingerprints."""
    from astrea.schemas.unit import STATUS_OK
    from astrea.shards import Store

    st = Store(store)
    out: dict[str, dict[str, Any]] = {}
    for e in experts:
        ref = f"{e}@{fingerprints[e]}" if fingerprints.get(e) else e
        edir = st.resolve(dataset, ref)
        unit = next((u for u in edir.committed_units() if key in set(edir.read_index(u).column("key").to_pylist())), None)
        if unit is None:
            raise TrainError(f"key {key!r} is not in {store}/{dataset} ({e}); list keys with `astrea shards info`")
        rec = next(r for r in edir.iter_unit(unit) if r.key == key)
        if rec.status != STATUS_OK:
            raise TrainError(f"key {key!r} has no {e} features ({rec.status}: {rec.error})")
        out[e] = {"tokens": rec.tokens, "pooled": rec.pooled, "outputs": rec.outputs, "caption": rec.caption}
    return out
