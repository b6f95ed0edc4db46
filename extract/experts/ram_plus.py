"""The classification-stage expert: RAM++ (Swin-L@384, 4585 English tags), astrea's own implementation.

The network lives in :mod:`astrea.extract.experts.ram_plus_model`; its ``state_dict()`` has the keys
and shapes of the official model, so the released ``ram_plus_swin_large_14m.pth`` (hub
``xinyu1205/recognize-anything-plus-model``) loads strictly. This module adds what the store needs:
variants, weight loading, the tag vocabulary and thresholds, the exact preprocessing, and outputs.

Per image:
- ``tokens``: the final-stage Swin tokens after ``image_proj`` (512-d, 12x12 at 384 px), i.e. exactly
  the memory the tagging head attends to and the space the tag-description embeddings live in,
  resampled to ``grid x grid``.
- ``pooled``: ``image_proj`` of the mean final token (512-d, unnormalised), the embedding RAM++
  distils from CLIP and matches against tag descriptions.
- ``outputs``: ``{"tags": [...], "scores": [...]}``: tags whose sigmoid score is strictly above their
  per-class threshold, by score descending (ties by tag order).

Tag list and thresholds (the official files are not redistributed with astrea):
- real weights: ``options={"tag_list": PATH, "thresholds": PATH}``, or ``ram_tag_list.txt`` /
  ``ram_tag_list_threshold.txt`` next to the checkpoint (the files in the official repo's
  ``ram/data/``). Without a thresholds file every tag uses ``threshold`` (0.68, the official default).
- random weights: a generated English vocabulary (:mod:`.ram_plus_vocab`) of ``num_classes`` tags,
  or a user tag list; thresholds default to 0.68.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from astrea.extract.experts.base import (
    spec_from_config,
    Expert,
    ExpertOutput,
    WeightsUnavailableError,
    state_dict_sha256,
)
from astrea.extract.experts.common import ensure_rgb, resample_grid
from astrea.extract.experts.ram_plus_model import IMAGENET_MEAN, IMAGENET_STD, RamPlus, RamPlusArch
from astrea.extract.experts.ram_plus_vocab import vocabulary
from astrea.extract.experts.registry import ExpertConfig, Variant
from astrea.extract.experts.weights import check_keys, choose, files_sha256, resolve_file, seeded

log = logging.getLogger(__name__)

NAME = "ram_plus"
HUB_ID = "xinyu1205/recognize-anything-plus-model"
CHECKPOINT = "ram_plus_swin_large_14m.pth"
TAG_LIST_FILE = "ram_tag_list.txt"
THRESHOLDS_FILE = "ram_tag_list_threshold.txt"
DEFAULT_THRESHOLD = 0.68  # the official ``RAM_plus(threshold=0.68)`` for tags without a file value

ARCHS: dict[str, RamPlusArch] = {
    "ram_plus.swin_l_384": RamPlusArch(),
    # Same code paths at test size: shifted windows in three stages, an unshifted last stage, 2-layer
    # head, 3 descriptions per tag; 64 tags by default (``num_classes`` option changes it).
    "ram_plus.tiny": RamPlusArch(
        image_size=128, swin_embed_dim=32, swin_depths=(2, 2, 2, 2), swin_heads=(1, 2, 4, 8), window_size=4,
        embed_dim=64, head_hidden=96, head_layers=2, head_heads=4, head_intermediate=192, num_classes=64,
        descriptions_per_class=3,
    ),
}

VARIANTS: dict[str, Variant] = {
    "ram_plus.swin_l_384": Variant(
        "ram_plus.swin_l_384", 512, 512, 384,
        "RAM++ Swin-L@384, 4585 tags x 51 descriptions; tokens = image_proj'd 12x12 final stage", HUB_ID,
    ),
    "ram_plus.tiny": Variant(
        "ram_plus.tiny", 64, 64, 128, "test/demo size RAM++ (Swin 4 stages, 4x4 final map, 64 tags)", None,
        small=True,
    ),
}
DEFAULT = "ram_plus.swin_l_384"
DEFAULT_SMALL = "ram_plus.tiny"


class CheckpointLayoutError(WeightsUnavailableError):
    """A checkpoint whose tensors do not fit the RAM++ layout (missing/unexpected keys, wrong shapes)."""


# ------------------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class RamPlusOptions:
    """``ExpertConfig.options`` for ram_plus (unknown keys are refused, naming the valid ones)."""

    tag_list: str | None = None  # one English tag per line, in the model's class order
    thresholds: str | None = None  # one float per line, same order (the official threshold file)
    threshold: float | None = None  # one threshold for every tag, overriding the per-class file
    max_tags: int | None = None  # keep at most this many tags per image (highest scores)
    num_classes: int | None = None  # random weights only: vocabulary size (default: the arch's)
    filename: str = CHECKPOINT  # checkpoint file inside a hub repo or a directory
    strict: bool = True  # refuse checkpoints with keys RAM++ does not have (beyond the known unused ones)

    @classmethod
    def parse(cls, options: dict[str, Any]) -> "RamPlusOptions":
        valid = {f.name: f for f in fields(cls)}
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"ram_plus: unknown options {unknown}; valid options: {sorted(valid)}")
        kinds = {"tag_list": str, "thresholds": str, "filename": str, "threshold": float, "max_tags": int,
                 "num_classes": int, "strict": bool}
        values: dict[str, Any] = {}
        for k, v in options.items():
            want = kinds[k]
            if v is None and k not in ("filename", "strict"):
                values[k] = None
                continue
            # Options arrive JSON-parsed from the CLI (0.5 -> float, true -> bool, paths -> str).
            ok = isinstance(v, want) and not (want is not bool and isinstance(v, bool))
            if want is float and isinstance(v, int) and not isinstance(v, bool):
                v, ok = float(v), True
            if not ok:
                raise ValueError(f"ram_plus: options.{k}={v!r} must be {want.__name__}")
            values[k] = v
        o = cls(**values)
        if o.threshold is not None and not 0.0 <= o.threshold <= 1.0:
            raise ValueError(f"ram_plus: options.threshold={o.threshold} must be in [0, 1]")
        if o.max_tags is not None and o.max_tags < 1:
            raise ValueError(f"ram_plus: options.max_tags={o.max_tags} must be >= 1")
        if o.num_classes is not None and o.num_classes < 1:
            raise ValueError(f"ram_plus: options.num_classes={o.num_classes} must be >= 1")
        return o


# -------------------------------------------------------------------------------- tags, thresholds


def read_tag_list(path: str | Path) -> list[str]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsUnavailableError(f"ram_plus: tag list {str(p)!r} does not exist (options.tag_list)")
    tags = p.read_text(encoding="utf-8").splitlines()
    while tags and not tags[-1].strip():
        tags.pop()  # a trailing newline is not a tag
    for i, t in enumerate(tags):
        if not t.strip():
            raise WeightsUnavailableError(f"ram_plus: tag list {p}: line {i + 1} is empty; one tag per line")
    if not tags:
        raise WeightsUnavailableError(f"ram_plus: tag list {p} is empty")
    return tags


def read_thresholds(path: str | Path, n: int) -> list[float]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsUnavailableError(f"ram_plus: thresholds file {str(p)!r} does not exist (options.thresholds)")
    lines = p.read_text(encoding="utf-8").split()
    out: list[float] = []
    for i, s in enumerate(lines):
        try:
            v = float(s)
        except ValueError:
            raise WeightsUnavailableError(f"ram_plus: thresholds {p}: entry {i + 1} {s!r} is not a number") from None
        if not 0.0 <= v <= 1.0:
            raise WeightsUnavailableError(f"ram_plus: thresholds {p}: entry {i + 1} = {v} is outside [0, 1]")
        out.append(v)
    if len(out) != n:
        raise WeightsUnavailableError(
            f"ram_plus: thresholds {p} has {len(out)} values but the tag list has {n} tags; they must pair line by line"
        )
    return out


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------ weights


# Tensors in the released checkpoint that the RAM++ inference model does not have: ``logit_scale`` is a
# CLIP-distillation leftover (the official loader drops it with strict=False).
KNOWN_UNUSED_KEYS = frozenset({"logit_scale"})


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a RAM++ checkpoint -> flat state dict.

    The official file stores the model under ``"model"``; a bare state dict is accepted too. Older
    checkpoints name the tagging head ``vision_multi`` (the official loader renames it; so do we).
    """
    import torch

    p = Path(path)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses arbitrary Python objects; the message names the refused global.
        raise WeightsUnavailableError(
            f"ram_plus: {p} holds Python objects that torch.load(weights_only=True) refuses to unpickle "
            f"({str(e).splitlines()[0]}). astrea never unpickles code from files. Fix: in a trusted "
            f"environment, re-save only the tensors: `sd = torch.load(path, weights_only=False)['model']; "
            f"torch.save({{'model': sd}}, 'ram_plus_clean.pth')` and pass that file"
        ) from None
    except Exception as e:
        raise WeightsUnavailableError(f"ram_plus: cannot read checkpoint {p}: {type(e).__name__}: {e}") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointLayoutError(
            f"ram_plus: {p} is not a RAM++ checkpoint: expected a state dict (or {{'model': state_dict}}) of tensors"
        )
    return {k.replace("vision_multi", "tagging_head", 1) if k.startswith("vision_multi") else k: v
            for k, v in obj.items()}


def num_classes_in(state: dict[str, Any], arch: RamPlusArch) -> int:
    rows = state.get("label_embed")
    if rows is None:
        raise CheckpointLayoutError("ram_plus: checkpoint has no 'label_embed' (the tag description embeddings)")
    n, d = rows.shape[0], arch.descriptions_per_class
    if n % d:
        raise CheckpointLayoutError(
            f"ram_plus: checkpoint label_embed has {n} rows, not a multiple of {d} descriptions per tag"
        )
    return n // d


def load_state(model: RamPlus, state: dict[str, Any], *, strict: bool = True, source: str = "checkpoint") -> dict:
    """Load ``state`` into ``model`` (possibly on the meta device) with strict key and shape checks.

    The architecture-derived buffers (``relative_position_index``, ``attn_mask``) are recomputed rather
    than read, as the official loader does. Returns a report: ignored keys and the file's dtypes.
    """
    import torch

    derived = model.derived_buffers()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    learned = {k for k in expected if k not in derived}
    given = {k for k in state if k not in derived and not k.endswith((".relative_position_index", ".attn_mask"))}
    missing = sorted(learned - given)
    unexpected = sorted(given - learned)
    ignored = [k for k in unexpected if k in KNOWN_UNUSED_KEYS or not strict]
    unexpected = [k for k in unexpected if k not in ignored]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {expected[k]}"
             for k in sorted(learned & given) if tuple(state[k].shape) != expected[k]]
    check_keys(NAME, source, missing=missing, unexpected=unexpected, mismatched=wrong, error=CheckpointLayoutError,
               hint="Check --arch (the released checkpoint is ram_plus.swin_l_384) and the tag list length; "
                    "options.strict=False ignores unexpected keys")
    dtypes = sorted({str(state[k].dtype).removeprefix("torch.") for k in learned})
    merged = {k: state[k].to(torch.float32) if state[k].is_floating_point() else state[k] for k in learned}
    merged.update(derived)
    model.load_state_dict(merged, strict=True, assign=True)
    return {"ignored_keys": sorted(ignored), "file_dtypes": dtypes}


# ------------------------------------------------------------------------------------ preprocessing


def preprocessing_spec(image_size: int) -> dict[str, Any]:
    """The official ``ram.transform.get_transform``: Resize((S, S)) + ToTensor + ImageNet Normalize."""
    return {
        "input": "RGB PIL image (grayscale/CMYK/alpha/16-bit converted by astrea.extract.experts.common)",
        "size": [image_size, image_size],
        "resize_mode": "squash",  # both sides to S, aspect ratio not kept
        "interpolation": "bilinear",
        "antialias": True,
        "resize_backend": "torchvision.transforms.functional.resize on PIL (PIL resampling)",
        "scale": "1/255",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }


def apply_preprocessing(image: Any, image_size: int):
    """PIL RGB image -> float32 [3, S, S], the same torchvision ops on PIL as the official transform."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    image = TF.resize(image, [image_size, image_size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.normalize(TF.to_tensor(image), list(IMAGENET_MEAN), list(IMAGENET_STD))


# ------------------------------------------------------------------------------------------- expert


class RamPlusExpert(Expert):
    name = NAME
    prerequisites = ()

    def __init__(
        self,
        cfg: ExpertConfig,
        model: RamPlus,
        tags: list[str],
        thresholds: list[float],
        config: dict[str, Any],
        max_tags: int | None = None,
        load_report: dict[str, Any] | None = None,
        weights_file_sha256: str = "",
    ) -> None:
        import torch

        a = model.arch
        if len(tags) != a.num_classes or len(thresholds) != a.num_classes:
            raise ValueError(f"ram_plus: {len(tags)} tags / {len(thresholds)} thresholds for {a.num_classes} classes")
        self.cfg = cfg
        self.arch_name = cfg.resolved_arch()
        self.model = model.eval().requires_grad_(False)
        self.tags = list(tags)
        self.thresholds = torch.tensor(thresholds, dtype=torch.float32)
        self.max_tags = max_tags
        self.load_report = dict(load_report or {})
        self.image_size = a.image_size
        self.feature_side = a.feature_side
        self.compute_dtype = getattr(torch, cfg.compute_dtype)
        self.device = "cpu"
        weights_sha = state_dict_sha256(self.model)  # fp32, before any compute-dtype cast
        self.model.to(self.compute_dtype)
        self.pp = preprocessing_spec(a.image_size)
        self.spec = spec_from_config(
            cfg, expert=NAME, arch=self.arch_name, weights_sha256=weights_sha,
            weights_file_sha256=weights_file_sha256, preprocessing=self.pp, token_dim=a.embed_dim, pooled_dim=a.embed_dim,
            config={
                "implementation": "astrea.extract.experts.ram_plus_model (official RAM_plus state-dict layout)",
                "arch": a.to_dict(),
                "feature_map": [a.feature_side, a.feature_side],
                "tokens": "image_proj(final-stage Swin tokens), resampled (area mean / bilinear)",
                "pooled": "image_proj(mean final-stage token), unnormalised",
                "compute_dtype": cfg.compute_dtype,
                "max_tags": max_tags,
                **config,
            },
            prerequisites={},
        )

    def preprocess(self, image: Any):
        image = ensure_rgb(image)
        return apply_preprocessing(image, self.image_size)

    def forward(self, pixels: Any, prompts: list[dict] | None = None) -> list[ExpertOutput]:
        import torch

        s = self.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ValueError(f"ram_plus: expected pixels [B, 3, {s}, {s}], got {tuple(pixels.shape)}")
        with torch.inference_mode():
            embeds, logits = self.model(pixels.to(self.device, self.compute_dtype))
            scores = torch.sigmoid(logits.float()).cpu()
            f = self.feature_side
            tokens = resample_grid(embeds[:, 1:].float(), f, f, self.cfg.grid).cpu().numpy()
            pooled = embeds[:, 0].float().cpu().numpy()
        # Selection and ordering in numpy: with thousands of tags per batch a per-element Python loop
        # over tensors cost more than the whole bf16 forward on an H100.
        scores = scores.numpy()
        keep = scores > self.thresholds.numpy()[None]
        out = []
        for i in range(len(scores)):
            idx = np.flatnonzero(keep[i])
            # Stable sort on -score: equal scores keep tag-list order, so outputs are deterministic.
            idx = idx[np.argsort(-scores[i, idx], kind="stable")]
            if self.max_tags is not None:
                idx = idx[: self.max_tags]
            outputs = {
                "tags": [self.tags[j] for j in idx.tolist()],
                "scores": np.round(scores[i, idx].astype(np.float64), 6).tolist(),
            }
            out.append(ExpertOutput(tokens=tokens[i].astype(np.float32, copy=False),
                                    pooled=pooled[i].astype(np.float32, copy=False), outputs=outputs))
        return out

    def tag_scores(self, pixels: Any):
        """All tag probabilities [B, num_classes] (float32, CPU), for analysis and tests."""
        import torch

        with torch.inference_mode():
            _, logits = self.model(pixels.to(self.device, self.compute_dtype))
            return torch.sigmoid(logits.float()).cpu()

    def to(self, device: str) -> "RamPlusExpert":
        self.model.to(device)
        self.device = device
        return self


# -------------------------------------------------------------------------------------------- build


def _tags_for_random(arch: RamPlusArch, o: RamPlusOptions) -> tuple[list[str], str]:
    if o.tag_list:
        tags = read_tag_list(o.tag_list)
        if o.num_classes is not None and o.num_classes != len(tags):
            raise ValueError(
                f"ram_plus: options.num_classes={o.num_classes} but tag list {o.tag_list} has {len(tags)} tags"
            )
        return tags, f"file {Path(o.tag_list).name}"
    n = int(o.num_classes) if o.num_classes is not None else arch.num_classes
    return vocabulary(n), f"astrea generated English vocabulary ({n} tags, random weights)"


def _side_file(option: str | None, ckpt: Path, name: str) -> Path | None:
    if option:
        return Path(option).expanduser()
    near = ckpt.parent / name
    return near if near.is_file() else None


def build(cfg: ExpertConfig, prerequisites: dict[str, str] | None = None) -> RamPlusExpert:
    import dataclasses

    import torch

    arch_name = cfg.resolved_arch()
    if arch_name not in ARCHS:
        raise ValueError(f"ram_plus: unknown arch {arch_name!r}; choose one of {sorted(ARCHS)}")
    o = RamPlusOptions.parse(cfg.options)
    arch = ARCHS[arch_name]
    report: dict[str, Any] = {}
    w = choose(cfg.weights, seed=cfg.seed, expert=NAME)
    file_sha = ""
    if w.random:
        tags, vocab_source = _tags_for_random(arch, o)
        arch = dataclasses.replace(arch, num_classes=len(tags))
        with seeded(w.seed):
            model = arch.build()
        thr_path = Path(o.thresholds).expanduser() if o.thresholds else None
    else:
        if VARIANTS[arch_name].small:
            w.refuse_hub_for_small(NAME, arch_name, [f"ram_plus.swin_l_384 ({HUB_ID})"])
        ckpt = resolve_file(str(w.path) if w.path else w.hub_id, o.filename, expert=NAME)
        tag_path = _side_file(o.tag_list, ckpt, TAG_LIST_FILE)
        if tag_path is None:
            raise WeightsUnavailableError(
                f"ram_plus: real weights need their English tag list ({arch.num_classes} lines for the released "
                f"model): pass options tag_list=PATH (ram/data/{TAG_LIST_FILE} in github.com/xinyu1205/"
                f"recognize-anything) or put {TAG_LIST_FILE} next to {ckpt}"
            )
        tags = read_tag_list(tag_path)
        vocab_source = f"file {tag_path.name}"
        state = read_checkpoint(ckpt)
        file_sha = files_sha256([ckpt])
        n = num_classes_in(state, arch)
        if n != len(tags):
            raise CheckpointLayoutError(
                f"ram_plus: checkpoint {ckpt.name} has {n} tags but tag list {tag_path} has {len(tags)}; "
                f"use the tag list that belongs to these weights"
            )
        if o.num_classes is not None and o.num_classes != n:
            raise CheckpointLayoutError(f"ram_plus: options.num_classes={o.num_classes} but {ckpt.name} has {n} tags")
        arch = dataclasses.replace(arch, num_classes=n)
        with torch.device("meta"):
            model = arch.build()  # shapes only; load_state assigns the file's tensors
        report = load_state(model, state, strict=o.strict, source=str(ckpt))
        del state
        if report["ignored_keys"]:
            log.info("ram_plus: ignored checkpoint keys not used at inference: %s", report["ignored_keys"])
        thr_path = _side_file(o.thresholds, ckpt, THRESHOLDS_FILE)
    if o.threshold is not None:
        thresholds = [o.threshold] * len(tags)
        thr_source = f"uniform {o.threshold} (options.threshold)"
    elif thr_path is not None:
        thresholds = read_thresholds(thr_path, len(tags))
        thr_source = f"file {thr_path.name}"
    else:
        thresholds = [DEFAULT_THRESHOLD] * len(tags)
        thr_source = f"uniform {DEFAULT_THRESHOLD} (no thresholds file)"
        if not w.random:
            log.warning("ram_plus: no per-class thresholds file; every tag uses %s", DEFAULT_THRESHOLD)
    config = {
        "num_tags": len(tags),
        "vocabulary": vocab_source,
        "tags_sha256": _sha("\n".join(tags)),
        "thresholds": thr_source,
        "thresholds_sha256": _sha(",".join(repr(t) for t in thresholds)),
    }
    expert = RamPlusExpert(cfg, model, tags, thresholds, config, max_tags=o.max_tags, load_report=report,
                           weights_file_sha256=file_sha)
    if cfg.device != "cpu":
        expert.to(cfg.device)
    return expert
