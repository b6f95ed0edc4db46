"""Offline tokenizers for the tiny random LLM; no download, every text encodable.

- ``byte_level_tokenizer``: 256 byte tokens + 4 specials, no merges. Used when there are no texts to fit on
  (``llm.text_warmup_steps: 0``, the tests of mechanics).
- ``fitted_tokenizer``: a byte-level BPE trained on the run's training-split texts (the same texts the
  text-only warm-up reads, never the held-out split). The paper's LLM has a subword tokenizer (Vicuna's
  32K SentencePiece BPE); a byte per token spreads what an image tells about its caption over ~5x more
  tokens than a subword tokenizer would and makes every sequence ~5x longer. The byte alphabet stays in
  the vocabulary, so text the fit never saw still encodes (as bytes).

Both are built with the `tokenizers` library (ByteLevel pre-tokenizer and decoder, a BPE model) and
wrapped as a ``PreTrainedTokenizerFast``; the specials take ids 0-3 in both.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


def _wrap(tok) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.padding_side = "right"
    return fast


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return _wrap(tok)


def fitted_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with at most ``vocab_size`` entries (specials + 256 bytes + merges) fitted on ``texts``.

    Deterministic for the same texts in the same order (the trainer breaks ties by pair order)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < len(SPECIALS) + 256:
        raise ValueError(f"vocab_size={vocab_size}: must be >= {len(SPECIALS) + 256} (specials + the 256 bytes)")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # GPT-2's split (words with their leading space, digits, punctuation): merges stay inside words
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return _wrap(tok)
