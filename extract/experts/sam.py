"""SAM (v1, ViT-B/L/H): the paper's Tab. 5 alternative to SAM2 for the segmentation stage.

Built on transformers' ``SamModel`` + ``SamProcessor`` (hub ``facebook/sam-vit-base|large|huge``).
Same outputs and options as the sam2 expert (:mod:`astrea.extract.experts.sam2`), so the trainer reads
either one. Per image:

- preprocessing: ``SamImageProcessor`` itself (longest side resized to S, aspect kept, rescale,
  ImageNet normalisation, zero padding bottom/right to S x S).
- ``tokens``: the image embedding ``SamModel.get_image_embeddings`` returns, [256, S/16, S/16]
  (64x64 at 1024 px), resampled to ``grid x grid`` (area mean). The padded strip is part of the
  embedding, as in SAM itself (the mask decoder reads the whole map).
- ``pooled``: the spatial mean of that embedding, [256].
- ``outputs``: ``{"masks": [...], "prompt": "boxes" | "points"}``. With stored grounding_dino outputs
  in ``prompts[i]["grounding_dino"]``, one mask per detected box (``multimask_output=False``, label =
  the detector's label); otherwise a ``points_per_side``^2 grid of single positive points over the
  image, best of SAM's three masks per point, kept above ``score_threshold``, greedy NMS by mask IoU,
  at most ``max_masks``. Masks are ``SamImageProcessor.post_process_masks`` (upscale to S, crop the
  padding, resize, logits > 0) with the image's aspect ratio and longest side ``mask_size``
  (default S/4, the decoder's native resolution): resize a decoded mask to (H, W) to lay it on the
  original image. Boxes are the masks' tight boxes, normalised xyxy.

The unpadded size of each image is read back from the pixels: SAM pads with exact zeros after
normalisation, and no real pixel normalises to 0.0 in all three channels (the ImageNet means times
255 are not integers), so the valid area is the span of columns/rows holding any non-zero value.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from astrea.extract.experts.base import (
    Expert,
    ExpertOutput,
    WeightsUnavailableError,
    spec_from_config,
    state_dict_sha256,
)
from astrea.extract.experts.common import ensure_rgb, map_features
from astrea.extract.experts.registry import ExpertConfig, Variant
from astrea.extract.experts.sam2 import MaskOptions, Sam2Expert, greedy_mask_nms, _mask_record
from astrea.extract.experts.weights import is_random, resolve_file

NAME = "sam"
EMBED_DIM = 256
MASK_THRESHOLD = 0.0  # post_process_masks' default: logits > 0 are foreground
PREREQUISITES = ("grounding_dino",)  # read by extract.run: extract detector boxes first


@dataclass(frozen=True)
class _Arch:
    image_size: int
    vision: dict[str, Any]  # SamVisionConfig fields that differ between sizes
    hub: str | None

    def config(self):
        from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

        s = self.image_size
        return SamConfig(
            # initializer_range: transformers' SamVisionConfig default is 1e-10 (a placeholder, real
            # weights overwrite it), which makes random-weight embeddings ~1e-20: they underflow to 0
            # in float16 storage and make every parity check vacuous. 0.02 as the rest of SAM uses.
            vision_config=SamVisionConfig(
                image_size=s, output_channels=EMBED_DIM, initializer_range=0.02, **self.vision
            ).to_dict(),
            prompt_encoder_config=SamPromptEncoderConfig(image_size=s, hidden_size=EMBED_DIM).to_dict(),
            mask_decoder_config=SamMaskDecoderConfig(hidden_size=EMBED_DIM).to_dict(),
        )


def _vit(width: int, depth: int, heads: int, global_attn: tuple[int, ...], window: int = 14) -> dict[str, Any]:
    return {"hidden_size": width, "num_hidden_layers": depth, "num_attention_heads": heads,
            "global_attn_indexes": list(global_attn), "window_size": window, "mlp_dim": 4 * width}


_ARCHS: dict[str, _Arch] = {
    # The three released SAM image encoders (segment_anything build_sam_vit_{b,l,h}).
    "sam.vit_b": _Arch(1024, _vit(768, 12, 12, (2, 5, 8, 11)), "facebook/sam-vit-base"),
    "sam.vit_l": _Arch(1024, _vit(1024, 24, 16, (5, 11, 17, 23)), "facebook/sam-vit-large"),
    "sam.vit_h": _Arch(1024, _vit(1280, 32, 16, (7, 15, 23, 31)), "facebook/sam-vit-huge"),
    # Test/demo size: a 2-block ViT (one windowed, one global) at 256 px, embedding 16x16; the
    # prompt encoder and mask decoder are full size (they are small). Random weights only.
    "sam.tiny": _Arch(256, _vit(64, 2, 2, (1,), window=4), None),
}


def _describe(name: str, a: _Arch) -> str:
    v = a.vision
    text = (f"SAM ViT {v['hidden_size']}w x {v['num_hidden_layers']} at {a.image_size}px, "
            f"embedding {a.image_size // 16}^2")
    return text + ("; test/demo size, random weights" if a.hub is None else "")


VARIANTS: dict[str, Variant] = {
    name: Variant(name, EMBED_DIM, EMBED_DIM, a.image_size, _describe(name, a), a.hub, small=a.hub is None)
    for name, a in _ARCHS.items()
}
DEFAULT = "sam.vit_h"
DEFAULT_SMALL = "sam.tiny"


def mask_options(options: dict[str, Any], image_size: int) -> MaskOptions:
    """sam2's option set (same names, same meaning), with errors naming this expert."""
    try:
        return MaskOptions.from_options(dict(options), image_size)
    except (TypeError, ValueError) as e:
        raise ValueError(str(e).replace("sam2:", "sam:", 1)) from None


# ------------------------------------------------------------------------------------------ loading


@contextlib.contextmanager
def _seeded(seed: int):
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _processor(image_size: int):
    from transformers import SamImageProcessor, SamProcessor

    s = image_size
    return SamProcessor(SamImageProcessor(
        size={"longest_edge": s}, pad_size={"height": s, "width": s},
        mask_size={"longest_edge": s // 4}, mask_pad_size={"height": s // 4, "width": s // 4},
    ))


def _looks_like_path(weights: str) -> bool:
    return weights.startswith((".", "/", "~")) or weights.endswith((".pt", ".pth", ".bin", ".safetensors"))


def _load(arch_name: str, arch: _Arch, cfg: ExpertConfig):
    """-> (SamModel, SamProcessor): random (seeded), a transformers snapshot dir, or a hub id."""
    from transformers import SamModel, SamProcessor

    w = cfg.weights
    if is_random(w):
        with _seeded(cfg.seed):
            model = SamModel(arch.config())
        return model, _processor(arch.image_size)
    p = Path(w).expanduser()
    if p.is_file():
        raise WeightsUnavailableError(
            f"sam: weights {w!r} is a file; pass a transformers snapshot directory holding config.json, "
            f"model.safetensors and preprocessor_config.json "
            f"(`huggingface-cli download {arch.hub or VARIANTS[DEFAULT].default_weights} --local-dir DIR`)"
        )
    if not p.is_dir():
        if _looks_like_path(w):
            raise WeightsUnavailableError(f"sam: weights path {w!r} does not exist")
        if arch.hub is None:
            real = ", ".join(n for n, v in VARIANTS.items() if not v.small)
            raise WeightsUnavailableError(
                f"sam: arch {arch_name!r} is a test-size model: weights must be 'random' or a local snapshot "
                f"directory, not the hub id {w!r}; for hub weights pick a real arch ({real})"
            )
        p = resolve_file(w, None, expert=NAME)  # snapshot_download; offline -> one clear error
    if not (p / "config.json").exists():
        raise WeightsUnavailableError(
            f"sam: {p} lacks config.json; it must be a transformers snapshot "
            f"(`huggingface-cli download {arch.hub or VARIANTS[DEFAULT].default_weights} --local-dir DIR`)"
        )
    try:
        model = SamModel.from_pretrained(str(p))
        has_pp = any((p / n).exists() for n in ("preprocessor_config.json", "processor_config.json"))
        processor = SamProcessor.from_pretrained(str(p)) if has_pp else _processor(arch.image_size)
    except (OSError, ValueError) as e:
        raise WeightsUnavailableError(f"sam: could not load a snapshot from {p}: {e}") from None
    _check_arch(arch_name, arch, model.config, w)
    return model, processor


def _check_arch(arch_name: str, arch: _Arch, config: Any, weights: str) -> None:
    v = config.vision_config
    keys = ("hidden_size", "num_hidden_layers")
    got = {k: getattr(v, k) for k in keys} | {"image_size": v.image_size}
    want = {k: arch.vision[k] for k in keys} | {"image_size": arch.image_size}
    if got != want:
        fits = [n for n, a in _ARCHS.items() if all(a.vision[k] == got[k] for k in keys)]
        raise WeightsUnavailableError(
            f"sam: weights {weights!r} are {got}, but arch {arch_name!r} is {want}; "
            f"pass the arch these weights belong to (--arch {fits[0] if fits else '...'})"
        )


# ------------------------------------------------------------------------------------------- expert


class SamExpert(Expert):
    name = NAME
    prerequisites = PREREQUISITES

    def __init__(self, cfg: ExpertConfig, arch_name: str, model: Any, processor: Any,
                 prerequisites: dict[str, str]) -> None:
        import torch

        self.cfg = cfg
        self.arch_name = arch_name
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.device = "cpu"
        self.compute_dtype = getattr(torch, cfg.compute_dtype)
        self.image_size = int(model.config.vision_config.image_size)
        self.opts = mask_options(cfg.options, self.image_size)
        ip = processor.image_processor
        self.pp = {
            "input": "RGB PIL image (grayscale/CMYK/alpha/16-bit converted by astrea.extract.experts.common)",
            "library": f"transformers.{type(ip).__name__}",
            "resize_mode": "longest_edge",
            "size": dict(ip.size),
            "pad_size": dict(ip.pad_size),
            "padding": "zeros, bottom/right",
            "interpolation": "bilinear",
            "scale": float(ip.rescale_factor),
            "mean": [float(m) for m in ip.image_mean],
            "std": [float(s) for s in ip.image_std],
        }
        if ip.size.get("longest_edge") != self.image_size or dict(ip.pad_size) != {
            "height": self.image_size, "width": self.image_size}:
            raise WeightsUnavailableError(
                f"sam: processor resizes to {dict(ip.size)} / pads to {dict(ip.pad_size)} but the model reads "
                f"{self.image_size}px; the snapshot's preprocessor_config.json does not fit its config.json"
            )
        self.spec = spec_from_config(
            cfg, expert=NAME, arch=arch_name, weights_sha256=state_dict_sha256(self.model),
            preprocessing=self.pp, token_dim=EMBED_DIM, pooled_dim=EMBED_DIM,
            config={
                "library": "transformers SamModel",
                "image_size": self.image_size,
                "vision": {k: model.config.vision_config.to_dict()[k] for k in
                           ("hidden_size", "num_hidden_layers", "num_attention_heads", "window_size",
                            "global_attn_indexes")},
                "tokens": "SamModel.get_image_embeddings, area-mean resampled",
                "pooled": "spatial mean of the image embedding",
                "compute_dtype": cfg.compute_dtype,
                "mask_threshold": MASK_THRESHOLD,
                "mask_frame": "post_process_masks: crop padding, longest side mask_size, aspect kept",
                "box_prompts": "grounding_dino boxes, multimask_output=False",
                "point_prompts": "single positive point per grid cell centre of the image, best of 3 masks",
                **{k: getattr(self.opts, k) for k in self.opts.__dataclass_fields__},
            },
            prerequisites=dict(prerequisites),
        )

    # -- pieces

    def preprocess(self, image: Any):
        image = ensure_rgb(image)
        return self.processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0].float()

    @staticmethod
    def valid_size(pixels) -> tuple[int, int]:
        """Unpadded (h, w) of one preprocessed image [3, S, S] (see the module docstring)."""
        nz = (pixels != 0).any(dim=0)
        rows = nz.any(dim=1).nonzero()
        cols = nz.any(dim=0).nonzero()
        if len(rows) == 0:
            return int(pixels.shape[-2]), int(pixels.shape[-1])
        return int(rows[-1]) + 1, int(cols[-1]) + 1

    def mask_frame(self, h: int, w: int) -> tuple[int, int]:
        """The stored masks' (h, w): longest side ``mask_size``, the image's aspect ratio."""
        s = self.opts.mask_size
        scale = s / max(h, w)
        return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))

    def image_embeddings(self, pixels):
        import torch

        with self._autocast():
            return self.model.get_image_embeddings(pixels.to(self.device, torch.float32))

    def decode(self, embed, *, points=None, labels=None, boxes=None, multimask: bool):
        """SamModel's prompt encoder + mask decoder for one image embedding [1, 256, h, w] ->
        (low-res logits [N, C, S/4, S/4], predicted IoU [N, C]); prompts in input pixels."""
        with self._autocast():
            out = self.model(image_embeddings=embed, input_points=points, input_labels=labels,
                             input_boxes=boxes, multimask_output=multimask)
        return out.pred_masks[0], out.iou_scores[0]

    def post_process(self, low, valid: tuple[int, int]):
        """Low-res logits [N, C, h, w] -> bool masks [N, C, mh, mw], as ``post_process_masks``."""
        frame = self.mask_frame(*valid)
        s = self.image_size
        return self.processor.image_processor.post_process_masks(
            [low.float().cpu()], [frame], [valid], mask_threshold=MASK_THRESHOLD,
            pad_size={"height": s, "width": s},
        )[0]

    def _autocast(self):
        import torch

        if self.cfg.compute_dtype == "float32":
            return contextlib.nullcontext()
        # Reduced precision through autocast: the prompt encoder builds float32 coordinate features,
        # which a weight cast would break; the weights stay float32 (and their sha256 with them).
        device_type = "cuda" if str(self.device).startswith("cuda") else "cpu"
        return torch.autocast(device_type=device_type, dtype=self.compute_dtype)

    # -- prompts

    def _box_masks(self, embed, valid: tuple[int, int], det: Any) -> dict[str, Any]:
        import torch

        boxes, labels, skipped = Sam2Expert._read_boxes(det, self.opts.max_boxes)
        out: dict[str, Any] = {"masks": [], "prompt": "boxes"}
        if skipped:
            out["skipped_boxes"] = skipped
        if not boxes:
            return out
        h, w = valid
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        inp = (torch.tensor(boxes, dtype=torch.float32) * scale)[None].to(embed.device)
        low, iou = self.decode(embed, boxes=inp, multimask=False)
        masks = self.post_process(low, valid)[:, 0].numpy()
        scores = iou[:, 0].float().cpu().numpy()
        for j in range(len(boxes)):
            m = _mask_record(masks[j], float(scores[j]), labels[j])
            if m["area"] >= self.opts.min_area:
                out["masks"].append(m)
        return out

    def _grid_masks(self, embed, valid: tuple[int, int]) -> dict[str, Any]:
        import torch

        o = self.opts
        n = o.points_per_side
        h, w = valid
        c = (np.arange(n, dtype=np.float32) + 0.5) / n
        pts = np.stack(np.meshgrid(c, c, indexing="xy"), axis=-1).reshape(1, -1, 1, 2)  # row-major
        points = (torch.from_numpy(pts) * torch.tensor([w, h], dtype=torch.float32)).to(embed.device)
        labels = torch.ones(points.shape[:3], dtype=torch.int64, device=embed.device)
        low, iou = self.decode(embed, points=points, labels=labels, multimask=True)
        iou = iou.float().cpu()
        best = iou.argmax(dim=1)
        idx = torch.arange(len(best))
        masks = self.post_process(low.cpu()[idx, best][:, None], valid)[:, 0].numpy()
        scores = iou[idx, best].numpy()
        kept = greedy_mask_nms(masks, scores, o)
        return {"masks": [_mask_record(masks[j], float(scores[j]), None) for j in kept], "prompt": "points"}

    # -- contract

    def forward(self, pixels: Any, prompts: list[dict] | None = None) -> list[ExpertOutput]:
        import torch

        s = self.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ValueError(f"sam: expected pixels [B, 3, {s}, {s}], got {tuple(pixels.shape)}")
        if prompts is not None and len(prompts) != pixels.shape[0]:
            raise ValueError(f"sam: {len(prompts)} prompts for a batch of {pixels.shape[0]} images")
        results = []
        with torch.inference_mode():
            embed = self.image_embeddings(pixels)
            tokens, pooled = map_features(embed, self.cfg.grid)
            b = len(tokens)
            for i in range(b):
                valid = self.valid_size(pixels[i])
                p = (prompts[i] or {}) if prompts is not None else {}
                if "grounding_dino" in p:
                    outputs = self._box_masks(embed[i : i + 1], valid, p["grounding_dino"])
                else:
                    outputs = self._grid_masks(embed[i : i + 1], valid)
                results.append(ExpertOutput(tokens=tokens[i], pooled=pooled[i], outputs=outputs))
        return results

    def to(self, device: str) -> "SamExpert":
        self.model.to(device)
        self.device = device
        return self


def build(cfg: ExpertConfig, prerequisites: dict[str, str] | None = None) -> SamExpert:
    arch_name = cfg.resolved_arch()
    if arch_name not in _ARCHS:
        raise ValueError(f"sam: unknown arch {arch_name!r}; choose one of {sorted(_ARCHS)}")
    arch = _ARCHS[arch_name]
    unknown = sorted(set(prerequisites or {}) - set(PREREQUISITES))
    if unknown:
        raise ValueError(f"sam: unknown prerequisites {unknown}; sam reads only {list(PREREQUISITES)}")
    mask_options(cfg.options, arch.image_size)  # fail before the (slow) build
    model, processor = _load(arch_name, arch, cfg)
    expert = SamExpert(cfg, arch_name, model, processor, dict(prerequisites or {}))
    if cfg.device != "cpu":
        expert.to(cfg.device)
    return expert


__all__ = ["DEFAULT", "DEFAULT_SMALL", "PREREQUISITES", "VARIANTS", "SamExpert", "build"]
