"""The detection-stage expert: Grounding-DINO 1.0 (Swin-T / Swin-B) through transformers.

Built on ``transformers.GroundingDinoForObjectDetection`` + ``GroundingDinoProcessor`` (the measured
choice over the ``groundingdino-py`` package: see docs/decisions.md).

Per image:
- prompt: the image's stored RAM++ tags (``prompts[i]["ram_plus"]["tags"]``, sorted by score) when
  present and non-empty, else the configured ``vocabulary``. Tags become Grounding-DINO's phrase
  prompt ("cat . dog ."). The model reads at most ``max_text_len`` (256) tokens, [CLS]/[SEP] included;
  longer tag lists are truncated at whole tags, keeping the highest-scoring ones, and the number
  dropped is recorded.
- ``tokens``: the deformable encoder's vision output (image features after the text-image feature
  enhancer, d_model wide) at one pyramid level (default level 0, stride 8: the finest map, whose
  tokens already attend to every coarser level), cropped to the image's valid (unpadded) area and
  resampled to ``grid x grid``. Option ``token_level="mean"`` averages all levels on the grid instead.
- ``pooled``: the mean of the ``grid x grid`` tokens (reproducible from the stored tokens).
- ``outputs``: ``{"boxes", "labels", "scores"}`` from the processor's
  ``post_process_grounded_object_detection`` (box and text thresholds configurable), boxes normalised
  xyxy clipped to [0, 1], sorted by score (highest first), at most ``max_detections``; plus
  ``prompt`` (the phrases used), ``prompt_source`` ("ram_plus" | "vocabulary") and
  ``prompt_dropped`` (tags cut by the token limit).

Batching: ``preprocess`` resizes each image as the reference processor does (aspect kept), so
sizes vary; :meth:`GroundingDinoExpert.collate` pads a list to one tensor + ``pixel_mask`` exactly as
the processor pads a batch. ``forward`` then, by default (``batching="by_size"``), runs each group of
equally sized images unpadded, so an image's features never depend on which images shared its batch
(Swin's window attention sees padding pixels otherwise). ``batching="pad"`` runs the padded batch as
the reference processor + model would (faster with mixed sizes; features then depend on the batch).

Random weights (``--weights random``) have no bert-base-uncased tokenizer files offline: a WordPiece
vocabulary is generated in code (see :func:`offline_vocab`), labelled in the spec.
"""

from __future__ import annotations

import hashlib
import math
import string
from dataclasses import dataclass
from typing import Any

import numpy as np

from astrea.extract.experts.base import (
    spec_from_config,
    BadImageError,
    Expert,
    ExpertOutput,
    WeightsUnavailableError,
    state_dict_sha256,
)
from astrea.extract.experts.common import resample_grid, to_rgb
from astrea.extract.experts.registry import ExpertConfig, Variant
from astrea.extract.experts.weights import choose, files_sha256, from_pretrained_strict, seeded, snapshot_dir, weight_files
from astrea.schemas.expert_spec import canonical_json
from astrea.schemas.stages import expert_prerequisites

NAME = "grounding_dino"

# Fallback prompt when no RAM++ tags are stored: frequent COCO / Objects365 things and stuff.
DEFAULT_VOCABULARY: tuple[str, ...] = (
    "person", "man", "woman", "child", "dog", "cat", "bird", "horse", "car", "bus", "truck", "bicycle",
    "motorcycle", "boat", "airplane", "train", "chair", "table", "bed", "couch", "cup", "bottle", "plate",
    "food", "book", "phone", "laptop", "television", "clock", "bag", "tree", "flower", "building", "window",
    "door", "sign", "road", "grass", "water", "sky",
)

# Grounding-DINO's phrase delimiters are hard-wired BERT ids in transformers (SPECIAL_TOKENS =
# [CLS], [SEP], ".", "?"), so the offline vocabulary keeps bert-base-uncased's ids for them.
_BERT_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}
OFFLINE_VOCAB_SIZE = 1030

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_REAL_SIZE = {"shortest_edge": 800, "longest_edge": 1333}


def offline_vocab() -> dict[str, int]:
    """A deterministic WordPiece vocabulary for runs without the hub tokenizer (random weights).

    bert-base-uncased ids for the special tokens and the phrase delimiters; ASCII letters, digits and
    punctuation as whole-word and ``##`` continuation pieces (so every lowercase ASCII word tokenizes,
    one piece per character at worst); whole-word entries for :data:`DEFAULT_VOCABULARY`; the rest
    ``[unusedN]`` placeholders (never produced from text: brackets split off as punctuation). Non-ASCII
    characters map to [UNK]. Fixed: independent of the configured vocabulary, so the text embedding size
    never changes with options.
    """
    pieces: list[str] = []
    punct = [c for c in string.punctuation if c not in ".?"]
    chars = list(string.ascii_lowercase + string.digits)
    pieces += punct + chars + ["##" + c for c in chars + punct]
    for w in DEFAULT_VOCABULARY:
        if w not in pieces:
            pieces.append(w)
    vocab = dict(_BERT_IDS)
    free = (i for i in range(OFFLINE_VOCAB_SIZE) if i not in _BERT_IDS.values())
    for piece in pieces:
        vocab[piece] = next(free)
    for n, i in enumerate(free):
        vocab[f"[unused{n}]"] = i
    assert len(vocab) == OFFLINE_VOCAB_SIZE and sorted(vocab.values()) == list(range(OFFLINE_VOCAB_SIZE))
    return vocab


def offline_tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(vocab=offline_vocab(), do_lower_case=True)


# ------------------------------------------------------------------------------------ architectures


@dataclass(frozen=True)
class _Arch:
    hub: str | None
    backbone: dict[str, Any]  # SwinConfig kwargs
    text: dict[str, Any]  # BertConfig kwargs
    model: dict[str, Any]  # GroundingDinoConfig overrides
    size: dict[str, int]  # the image processor's resize rule

    def config(self):
        from transformers import BertConfig, GroundingDinoConfig, SwinConfig

        backbone = SwinConfig(**{"out_indices": [2, 3, 4], **self.backbone})
        return GroundingDinoConfig(
            backbone_config=backbone.to_dict(), text_config=BertConfig(**self.text).to_dict(), **self.model
        )


_ARCHS: dict[str, _Arch] = {
    # Numbers from the published configs (IDEA-Research/grounding-dino-{tiny,base}/config.json).
    "grounding_dino.swin_t": _Arch(
        "IDEA-Research/grounding-dino-tiny",
        {"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7, "image_size": 224},
        {},  # bert-base-uncased
        {},
        _REAL_SIZE,
    ),
    "grounding_dino.swin_b": _Arch(
        "IDEA-Research/grounding-dino-base",
        {"embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32], "window_size": 12, "image_size": 384},
        {},
        {},
        _REAL_SIZE,
    ),
    # Test/demo size: the same classes and code paths, a few layers, a 128 px fixed square input so
    # every preprocessed image has one shape (the extraction job can stack without collate).
    "grounding_dino.tiny": _Arch(
        None,
        {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4], "window_size": 4, "image_size": 128},
        {
            "vocab_size": OFFLINE_VOCAB_SIZE, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 64, "max_position_embeddings": 256,
        },
        {
            "d_model": 64, "encoder_layers": 1, "decoder_layers": 2, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
            "encoder_attention_heads": 4, "decoder_attention_heads": 4, "num_queries": 30,
        },
        {"height": 128, "width": 128},
    ),
}

VARIANTS: dict[str, Variant] = {
    "grounding_dino.swin_t": Variant(
        "grounding_dino.swin_t", 256, 256, 800, "Grounding-DINO 1.0 Swin-T (transformers), shortest edge 800",
        "IDEA-Research/grounding-dino-tiny",
    ),
    "grounding_dino.swin_b": Variant(
        "grounding_dino.swin_b", 256, 256, 800, "Grounding-DINO 1.0 Swin-B (transformers), shortest edge 800",
        "IDEA-Research/grounding-dino-base",
    ),
    "grounding_dino.tiny": Variant(
        "grounding_dino.tiny", 64, 64, 128, "test/demo size Grounding-DINO (tiny Swin + 1-layer BERT), 128 px square",
        None, small=True,
    ),
}
DEFAULT = "grounding_dino.swin_t"
DEFAULT_SMALL = "grounding_dino.tiny"


# ------------------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class GroundingDinoOptions:
    """Expert-specific knobs (``ExpertConfig.options``); all of them go into the spec."""

    vocabulary: tuple[str, ...] = DEFAULT_VOCABULARY  # prompt when no RAM++ tags are stored
    box_threshold: float = 0.35  # Grounding-DINO's demo defaults
    text_threshold: float = 0.25
    max_detections: int | None = 100  # highest-scoring kept; None keeps all above threshold
    token_level: int | str = 0  # encoder pyramid level for tokens, or "mean"
    batching: str = "by_size"  # "by_size" | "pad", see the module docstring
    size: dict[str, int] | None = None  # override the processor's resize rule

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "GroundingDinoOptions":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"grounding_dino: unknown options {unknown}; valid: {sorted(known)}")
        o = dict(options)
        if "vocabulary" in o:
            v = o["vocabulary"]
            if isinstance(v, str):
                v = [t for t in v.replace(",", ".").split(".")]
            o["vocabulary"] = tuple(normalise_tags(v))
        opts = cls(**o)
        opts.validate()
        return opts

    def validate(self) -> None:
        if not self.vocabulary:
            raise ValueError("grounding_dino: options.vocabulary is empty; give at least one class name")
        for k in ("box_threshold", "text_threshold"):
            x = getattr(self, k)
            if not isinstance(x, (int, float)) or not 0.0 <= x < 1.0:
                raise ValueError(f"grounding_dino: options.{k}={x!r} must be a number in [0, 1)")
        if self.max_detections is not None and (not isinstance(self.max_detections, int) or self.max_detections < 1):
            raise ValueError(f"grounding_dino: options.max_detections={self.max_detections!r} must be >= 1 or None")
        if self.token_level != "mean" and (not isinstance(self.token_level, int) or self.token_level < 0):
            raise ValueError(
                f"grounding_dino: options.token_level={self.token_level!r} must be a level index or 'mean'"
            )
        if self.batching not in ("by_size", "pad"):
            raise ValueError(f"grounding_dino: options.batching={self.batching!r}; choose 'by_size' or 'pad'")
        if self.size is not None:
            ok = set(self.size) in ({"shortest_edge", "longest_edge"}, {"height", "width"})
            if not ok or not all(isinstance(x, int) and x >= 32 for x in self.size.values()):
                raise ValueError(
                    f"grounding_dino: options.size={self.size!r}; give {{'shortest_edge': int, 'longest_edge': int}} "
                    f"or {{'height': int, 'width': int}}, each >= 32"
                )

    def to_spec(self) -> dict[str, Any]:
        return {
            "vocabulary": list(self.vocabulary),
            "box_threshold": float(self.box_threshold),
            "text_threshold": float(self.text_threshold),
            "max_detections": self.max_detections,
            "token_level": self.token_level,
            "batching": self.batching,
        }


def normalise_tags(tags: Any) -> list[str]:
    """Tags -> prompt phrases: lowercase, '.' and '?' removed (they would split a phrase in two: they are
    Grounding-DINO's delimiters), whitespace collapsed, empty and repeated tags dropped, order kept."""
    out: list[str] = []
    seen: set[str] = set()
    for t in tags:
        if not isinstance(t, str):
            raise TypeError(f"tag {t!r} is not a string")
        p = " ".join(t.lower().replace(".", " ").replace("?", " ").split())
        if p and p not in seen:
            seen.add(p)
            out.append(p)
    return out


def prompt_text(phrases: list[str]) -> str:
    """Grounding-DINO's prompt format: phrases each closed by ' .'."""
    return " ".join(f"{p} ." for p in phrases)


# ------------------------------------------------------------------------------------------ loading


def _load(arch_name: str, arch: _Arch, cfg: ExpertConfig, opts: GroundingDinoOptions):
    """-> (model, processor, tokenizer spec, checkpoint files' sha256)."""
    from transformers import AutoTokenizer, GroundingDinoForObjectDetection, GroundingDinoImageProcessor
    from transformers import GroundingDinoProcessor

    w = choose(cfg.weights, seed=cfg.seed, expert=NAME)
    size = dict(opts.size or arch.size)
    if w.random:
        with seeded(w.seed):
            model = GroundingDinoForObjectDetection(arch.config())
        image_processor = GroundingDinoImageProcessor(size=size)
        tokenizer = offline_tokenizer()
        return model, GroundingDinoProcessor(image_processor, tokenizer), _tokenizer_spec(tokenizer), ""

    p = snapshot_dir(w, expert=NAME, arch_name=arch_name, has_hub=arch.hub is not None,
                     real_archs=(n for n, v in VARIANTS.items() if not v.small),
                     hub_hint=arch.hub or VARIANTS[DEFAULT].default_weights,
                     holds="config.json, model.safetensors, preprocessor_config.json and the tokenizer files")
    # Hub snapshots keep the image processor in preprocessor_config.json; transformers 5's
    # save_pretrained writes processor_config.json. Either is a complete snapshot.
    missing = [n for n in ("config.json",) if not (p / n).exists()]
    if not any((p / n).exists() for n in ("preprocessor_config.json", "processor_config.json")):
        missing.append("preprocessor_config.json")
    if missing:
        raise WeightsUnavailableError(
            f"grounding_dino: {p} lacks {missing}; it must be a full transformers snapshot "
            f"(`huggingface-cli download {arch.hub or VARIANTS[DEFAULT].default_weights} --local-dir DIR`)"
        )
    try:
        model = from_pretrained_strict(GroundingDinoForObjectDetection, p, expert=NAME)
        ip_kwargs = {"size": size} if opts.size else {}
        image_processor = GroundingDinoImageProcessor.from_pretrained(str(p), **ip_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(p))
    except (OSError, ValueError) as e:
        raise WeightsUnavailableError(f"grounding_dino: could not load a snapshot from {p}: {e}") from None
    _check_arch(arch_name, arch, model.config, w.given)
    return (model, GroundingDinoProcessor(image_processor, tokenizer), _tokenizer_spec(tokenizer),
            files_sha256(weight_files(p)))


def _tokenizer_spec(tokenizer: Any) -> dict[str, Any]:
    """What the tokenizer contributes to the fingerprint: its class, casing and vocabulary hash (not
    where it was loaded from, so a copied snapshot keeps its fingerprint)."""
    vocab = tokenizer.get_vocab()
    return {
        "class": type(tokenizer).__name__,
        "lowercase": bool(getattr(tokenizer, "do_lower_case", True)),
        "vocab_size": len(vocab),
        "vocab_sha256": hashlib.sha256(canonical_json(vocab).encode()).hexdigest(),
    }


def _check_arch(arch_name: str, arch: _Arch, config: Any, weights: str) -> None:
    bb = config.backbone_config
    got = {"embed_dim": bb.embed_dim, "depths": list(bb.depths), "d_model": config.d_model}
    want = {
        "embed_dim": arch.backbone["embed_dim"],
        "depths": list(arch.backbone["depths"]),
        "d_model": arch.model.get("d_model", 256),
    }
    if got != want:
        fits = [n for n, a in _ARCHS.items() if a.backbone.get("embed_dim") == got["embed_dim"]
                and list(a.backbone.get("depths", [])) == got["depths"]]
        raise WeightsUnavailableError(
            f"grounding_dino: weights {weights!r} are {got}, but arch {arch_name!r} is {want}; "
            f"pass the arch these weights belong to (--arch {fits[0] if fits else '...'})"
        )


# ------------------------------------------------------------------------------------- the expert


def _conv_out(n: int) -> int:
    return (n + 1) // 2


def encoder_level_shapes(h: int, w: int, num_levels: int = 4) -> list[tuple[int, int]]:
    """Encoder map sizes for an h x w input: Swin pads to its patch (4) and halves per stage (ceil);
    levels are strides 8, 16, 32 and an extra 3x3 stride-2 conv (padding 1) on the last."""
    hh, ww = math.ceil(h / 4), math.ceil(w / 4)
    shapes = []
    for _ in range(3):
        hh, ww = _conv_out(hh), _conv_out(ww)
        shapes.append((hh, ww))
    while len(shapes) < num_levels:
        hh, ww = _conv_out(hh), _conv_out(ww)
        shapes.append((hh, ww))
    return shapes[:num_levels]


def _resample_name(resample: Any) -> str:
    """PIL resampling as a name: configs hold it as an int (2) or an enum, both mean 'bilinear'."""
    from transformers.image_utils import PILImageResampling

    try:
        return PILImageResampling(int(resample)).name.lower()
    except (TypeError, ValueError):
        return str(getattr(resample, "name", resample)).lower()


class GroundingDinoPreprocessor:
    """``preprocess`` on its own: the reference image processor plus the size check, no weights."""

    def __init__(self, image_processor: Any, num_levels: int, num_queries: int) -> None:
        self.image_processor = image_processor
        self.num_levels = num_levels
        self.num_queries = num_queries

    def __call__(self, image: Any):
        try:
            image = to_rgb(image)
            w, h = image.size
        except Exception as e:
            raise BadImageError(f"not an image: {type(e).__name__}: {str(e)[:120]}") from None
        if min(w, h) < 1:
            raise BadImageError(f"too small: {w}x{h}")
        x = self.image_processor(images=image, do_pad=False, return_tensors="pt")["pixel_values"][0]
        # Two-stage Grounding-DINO picks num_queries proposals among the encoder tokens: an input with
        # fewer tokens (a sliver-thin image) cannot run; refuse it here, per key, not in the batch.
        n = sum(a * b for a, b in encoder_level_shapes(*x.shape[-2:], self.num_levels))
        if n < self.num_queries:
            raise BadImageError(
                f"too small for detection: {w}x{h} resizes to {x.shape[-1]}x{x.shape[-2]}, {n} encoder tokens "
                f"< {self.num_queries} queries"
            )
        return x.float().contiguous()


def _preprocessing_spec(ip: Any) -> dict[str, Any]:
    """The spec's ``preprocessing``: what the reference image processor ``ip`` does (part of the fingerprint)."""
    return {
        "input": "RGB PIL image (grayscale/CMYK/alpha/16-bit converted by astrea.extract.experts.common)",
        "processor": "transformers GroundingDinoImageProcessor (TorchvisionBackend)",
        "size": {k: int(x) for k, x in dict(ip.size).items() if x is not None},
        "resample": _resample_name(ip.resample),
        "rescale_factor": float(ip.rescale_factor),
        "mean": [float(x) for x in ip.image_mean],
        "std": [float(x) for x in ip.image_std],
        "padding": "bottom/right zeros to the batch max + pixel_mask (collate), as the processor pads",
    }


def _spec_config(
    cfg: ExpertConfig, mc: Any, opts: GroundingDinoOptions, tokenizer_desc: dict[str, Any]
) -> dict[str, Any]:
    """The spec's ``config``: options, prompt and token rules, the model's shape (``mc``: its config) and
    the compute dtype (part of the fingerprint)."""
    return {
        **opts.to_spec(),
        "prompt": "ram_plus tags (score order) else vocabulary; 'a . b .'; whole tags truncated to max_text_len",
        "max_text_len": int(mc.max_text_len),
        "tokenizer": tokenizer_desc,
        "tokens": f"encoder vision output, level {opts.token_level} (0 = stride 8), valid area, resampled",
        "pooled": "mean of the grid tokens",
        "model_config": {
            "backbone": {
                k: mc.backbone_config.to_dict()[k] for k in ("embed_dim", "depths", "num_heads", "window_size")
            },
            "text_hidden_size": int(mc.text_config.hidden_size),
            "text_layers": int(mc.text_config.num_hidden_layers),
            "d_model": int(mc.d_model),
            "encoder_layers": int(mc.encoder_layers),
            "decoder_layers": int(mc.decoder_layers),
            "num_queries": int(mc.num_queries),
            "num_feature_levels": int(mc.num_feature_levels),
        },
        "compute_dtype": cfg.compute_dtype,
    }


class GroundingDinoExpert(Expert):
    name = NAME
    prerequisites = expert_prerequisites(NAME)  # the stage table: classification's tags prompt detection

    def __init__(
        self, cfg: ExpertConfig, arch_name: str, model: Any, processor: Any, tokenizer_desc: dict[str, Any],
        opts: GroundingDinoOptions, prerequisites: dict[str, str], *, weights_file_sha256: str = "",
    ) -> None:
        import torch

        self.cfg = cfg
        self.arch_name = arch_name
        self.opts = opts
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.model = model.eval().requires_grad_(False)
        self.compute_dtype = getattr(torch, cfg.compute_dtype)
        self.device = "cpu"
        mc = self.model.config
        self.num_levels = int(mc.num_feature_levels)
        self.max_text_len = int(mc.max_text_len)
        self.num_queries = int(mc.num_queries)
        if opts.token_level != "mean" and opts.token_level >= self.num_levels:
            raise ValueError(
                f"grounding_dino: options.token_level={opts.token_level} but the model has {self.num_levels} levels"
            )
        self._preprocessor = GroundingDinoPreprocessor(processor.image_processor, self.num_levels, self.num_queries)
        self._tag_len: dict[str, int] = {}
        self._captured: dict[str, Any] = {}
        if not self.prompt_for(None)["phrases"]:
            raise ValueError(
                f"grounding_dino: options.vocabulary: its first phrase alone exceeds the model's "
                f"{self.max_text_len}-token text limit; use short class names"
            )
        # The encoder's inputs carry the level shapes and the padding mask the model derived; a
        # pre-hook reads them instead of re-deriving them (one source of truth).
        self.model.model.encoder.register_forward_pre_hook(self._capture, with_kwargs=True)
        weights_sha = state_dict_sha256(self.model)  # hashed in fp32, before any compute-dtype cast
        self.model.to(self.compute_dtype)
        d_model = int(mc.d_model)
        v = VARIANTS[arch_name]
        if d_model != v.token_dim:
            raise WeightsUnavailableError(
                f"grounding_dino: weights {cfg.weights!r} have d_model={d_model}, arch {arch_name!r} expects "
                f"{v.token_dim}; pass the arch these weights belong to (--arch)"
            )
        self.preprocessing = _preprocessing_spec(processor.image_processor)
        config = _spec_config(cfg, mc, opts, tokenizer_desc)
        self.spec = spec_from_config(
            cfg, expert=NAME, arch=arch_name, weights_sha256=weights_sha,
            weights_file_sha256=weights_file_sha256, preprocessing=self.preprocessing, token_dim=d_model, pooled_dim=d_model,
            config=config,
            prerequisites=dict(prerequisites),
        )

    # ------------------------------------------------------------------------------ preprocessing

    def preprocess(self, image: Any):
        """PIL image -> float32 [3, H, W], the reference image processor's own output (unpadded)."""
        return self._preprocessor(image)

    def preprocessor(self) -> "GroundingDinoPreprocessor":
        """A picklable ``preprocess`` without the model, for CPU decode workers."""
        return self._preprocessor

    def collate(self, tensors: list[Any]) -> tuple[Any, dict[str, Any]]:
        """[3, h_i, w_i] tensors -> (pixels [B, 3, H, W], {"pixel_mask": [B, H, W]}): zero padding at the
        bottom/right and a 1 = valid mask, exactly the processor's batch padding."""
        import torch

        if not tensors:
            raise ValueError("grounding_dino: collate got no tensors")
        H = max(int(t.shape[-2]) for t in tensors)
        W = max(int(t.shape[-1]) for t in tensors)
        pixels = torch.zeros((len(tensors), 3, H, W), dtype=torch.float32)
        mask = torch.zeros((len(tensors), H, W), dtype=torch.int64)
        for i, t in enumerate(tensors):
            h, w = t.shape[-2:]
            pixels[i, :, :h, :w] = t
            mask[i, :h, :w] = 1
        return pixels, {"pixel_mask": mask}

    # ------------------------------------------------------------------------------------ prompts

    def _n_tokens(self, phrase: str) -> int:
        n = self._tag_len.get(phrase)
        if n is None:
            n = len(self.tokenizer(phrase, add_special_tokens=False)["input_ids"])
            if len(self._tag_len) < 100_000:
                self._tag_len[phrase] = n
        return n

    def prompt_for(self, prompt: dict | None) -> dict[str, Any]:
        """-> {"phrases", "source", "dropped"[, "note"]} for one image's prerequisite outputs."""
        source, note, tags = "vocabulary", None, None
        if prompt is not None and not isinstance(prompt, dict):
            note, prompt = f"prompt is a {type(prompt).__name__}, not a dict; used vocabulary", None
        rp = (prompt or {}).get("ram_plus")
        if rp is not None:
            try:
                if isinstance(rp["tags"], str):  # a bare string would iterate as characters
                    raise TypeError("tags is a string, not a list")
                tags = normalise_tags(rp["tags"])
            except (TypeError, KeyError) as e:
                note = f"ram_plus outputs unusable ({type(e).__name__}: {e}); used vocabulary"
                tags = None
            if tags == []:
                note = "ram_plus stored no tags; used vocabulary"
        if tags:
            source = "ram_plus"
        else:
            tags = list(self.opts.vocabulary)
        budget = self.max_text_len - 2  # [CLS] ... [SEP]
        kept: list[str] = []
        for t in tags:
            need = self._n_tokens(t) + 1  # the phrase and its " ."
            if need > budget:
                break
            kept.append(t)
            budget -= need
        out = {"phrases": kept, "source": source, "dropped": len(tags) - len(kept)}
        if note:
            out["note"] = note
        return out

    # ------------------------------------------------------------------------------------ forward

    def _capture(self, module: Any, args: tuple, kwargs: dict) -> None:
        self._captured = {
            "shapes": list(kwargs["spatial_shapes_list"]),
            "padded": kwargs["vision_attention_mask"],  # True = padding
        }

    def forward(self, pixels: Any, prompts: list[dict] | None = None, pixel_mask: Any = None) -> list[ExpertOutput]:
        """``pixels`` [B, 3, H, W] from :meth:`preprocess` (stacked) or :meth:`collate` (padded, with its
        ``pixel_mask``, 1 = valid, valid area at the top left); ``prompts[i]`` the image's stored
        prerequisite outputs (``{"ram_plus": {...}}``), ``{}`` or ``None`` for the vocabulary."""
        import torch

        b = int(pixels.shape[0])
        if prompts is not None and len(prompts) != b:
            raise ValueError(f"grounding_dino: {len(prompts)} prompts for {b} images")
        if pixel_mask is None:
            pixel_mask = torch.ones((b, *pixels.shape[-2:]), dtype=torch.int64)
        pixel_mask = pixel_mask.to("cpu")
        plans = [self.prompt_for(prompts[i] if prompts else None) for i in range(b)]
        results: list[ExpertOutput | None] = [None] * b
        if self.opts.batching == "pad":
            groups = [(list(range(b)), None)]
        else:
            sizes: dict[tuple[int, int], list[int]] = {}
            for i in range(b):
                m = pixel_mask[i].bool()
                h, w = int(m.any(1).sum()), int(m.any(0).sum())
                sizes.setdefault((h, w), []).append(i)
            groups = [(idx, hw) for hw, idx in sizes.items()]
        with torch.inference_mode():
            for idx, hw in groups:
                if hw is None:
                    px, pm = pixels, pixel_mask
                else:
                    px = pixels[idx, :, : hw[0], : hw[1]]
                    pm = torch.ones((len(idx), *hw), dtype=torch.int64)
                for j, out in zip(idx, self._run(px, pm, [plans[i] for i in idx])):
                    results[j] = out
        return results  # type: ignore[return-value]

    def _run(self, pixels: Any, pixel_mask: Any, plans: list[dict]) -> list[ExpertOutput]:
        import torch

        text = self.tokenizer([prompt_text(p["phrases"]) for p in plans], padding="longest", return_tensors="pt")
        dev = self.device
        out = self.model(
            pixel_values=pixels.to(dev, self.compute_dtype),
            pixel_mask=pixel_mask.to(dev),
            input_ids=text["input_ids"].to(dev),
            attention_mask=text["attention_mask"].to(dev),
            token_type_ids=text["token_type_ids"].to(dev),
        )
        tokens = self._tokens(out.encoder_last_hidden_state_vision.float())
        dets = self.processor.post_process_grounded_object_detection(
            self._top_queries(out.logits, out.pred_boxes),
            # Python ints, not a tensor: identical phrases, but decoding 0-d tensors one by one is
            # the slowest step of the whole forward when many tokens pass the text threshold.
            input_ids=text["input_ids"].tolist(),
            threshold=float(self.opts.box_threshold),
            text_threshold=float(self.opts.text_threshold),
        )
        results = []
        for i, plan in enumerate(plans):
            d = dets[i]
            scores = d["scores"]
            order = torch.argsort(scores, descending=True, stable=True)
            if self.opts.max_detections is not None:
                order = order[: self.opts.max_detections]
            boxes = d["boxes"][order].clamp(0.0, 1.0)
            labels = [d["text_labels"][k] for k in order.tolist()]
            outputs = {
                "boxes": [[float(c) for c in bx] for bx in boxes.tolist()],
                "labels": labels,
                "scores": [float(s) for s in scores[order].tolist()],
                "prompt": plan["phrases"],
                "prompt_source": plan["source"],
                "prompt_dropped": plan["dropped"],
            }
            if "note" in plan:
                outputs["prompt_note"] = plan["note"]
            t = tokens[i]
            results.append(ExpertOutput(tokens=t.numpy(), pooled=t.mean(0).numpy(), outputs=outputs))
        return results

    def _top_queries(self, logits: Any, boxes: Any) -> Any:
        """The queries the post-processing has to look at, on CPU in float32.

        The reference post-processing decodes a phrase for every query above the box threshold, one
        GPU sync each (all 900 with saturated random weights: it then costs more than the model).
        Only the ``max_detections`` highest-scoring queries can be kept, so the others are dropped
        first; the survivors stay in query order and ties break by query index, so the result is
        exactly reference-then-sort-then-cap.
        """
        import types

        import torch

        logits, boxes = logits.float().cpu(), boxes.float().cpu()
        k = self.opts.max_detections
        if k is not None and k < logits.shape[1]:
            scores = logits.sigmoid().max(-1).values
            keep = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k].sort(dim=1).values
            logits = logits.gather(1, keep[..., None].expand(-1, -1, logits.shape[-1]))
            boxes = boxes.gather(1, keep[..., None].expand(-1, -1, boxes.shape[-1]))
        # post_process_grounded_object_detection reads only .logits and .pred_boxes when given input_ids.
        return types.SimpleNamespace(logits=logits, pred_boxes=boxes)

    def _tokens(self, enc: Any) -> Any:
        """Encoder vision output [B, sum h_l*w_l, D] -> [B, grid*grid, D] float32 CPU, each image's valid
        area only (padding rows/cols cropped before resampling)."""
        import torch

        shapes = self._captured["shapes"]
        valid = ~self._captured["padded"].to("cpu")
        levels = range(self.num_levels) if self.opts.token_level == "mean" else [int(self.opts.token_level)]
        starts = np.cumsum([0] + [h * w for h, w in shapes])
        g = self.cfg.grid
        out = []
        for i in range(enc.shape[0]):
            acc = None
            for lv in levels:
                h, w = shapes[lv]
                s = int(starts[lv])
                m = valid[i, s : s + h * w].view(h, w)
                vh, vw = int(m.any(1).sum()), int(m.any(0).sum())
                x = enc[i, s : s + h * w].view(h, w, -1)[:vh, :vw].reshape(1, vh * vw, -1).cpu()
                r = resample_grid(x, vh, vw, g)[0]
                acc = r if acc is None else acc + r
            out.append((acc / len(levels)).to(torch.float32).contiguous())
        return out

    def to(self, device: str) -> "GroundingDinoExpert":
        self.model.to(device)
        self.device = device
        return self


def build(cfg: ExpertConfig, prerequisites: dict[str, str] | None = None) -> GroundingDinoExpert:
    arch_name = cfg.resolved_arch()
    arch = _ARCHS[arch_name]
    opts = GroundingDinoOptions.from_options(cfg.options)
    model, processor, tok_desc, file_sha = _load(arch_name, arch, cfg, opts)
    expert = GroundingDinoExpert(cfg, arch_name, model, processor, tok_desc, opts, dict(prerequisites or {}),
                                 weights_file_sha256=file_sha)
    if cfg.device != "cpu":
        expert.to(cfg.device)
    return expert
