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

from dataclasses import dataclass
from typing import Any

from astrea.extract.experts.base import WeightsUnavailableError, spec_from_config, state_dict_sha256
from astrea.extract.experts.common import ensure_rgb
from astrea.extract.experts.registry import ExpertConfig, Variant
from astrea.extract.experts.sam_family import EMBED_DIM, MaskOptions, PromptedMaskExpert, variants
from astrea.extract.experts.weights import choose, files_sha256, from_pretrained_strict, seeded, snapshot_dir, weight_files
from astrea.schemas.stages import expert_prerequisites

NAME = "sam"
MASK_THRESHOLD = 0.0  # post_process_masks' default: logits > 0 are foreground
PREREQUISITES = expert_prerequisites(NAME)  # the stage table's (detection's boxes prompt segmentation)


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
    return (f"SAM ViT {v['hidden_size']}w x {v['num_hidden_layers']} at {a.image_size}px, "
            f"embedding {a.image_size // 16}^2")


VARIANTS: dict[str, Variant] = variants(_ARCHS, _describe)
DEFAULT = "sam.vit_h"
DEFAULT_SMALL = "sam.tiny"


def mask_options(options: dict[str, Any], image_size: int) -> MaskOptions:
    """sam2's option set (same names, same meaning), with errors naming this expert."""
    try:
        return MaskOptions.from_options(dict(options), image_size)
    except (TypeError, ValueError) as e:
        raise ValueError(str(e).replace("sam2:", "sam:", 1)) from None


# ------------------------------------------------------------------------------------------ loading


def _processor(image_size: int):
    from transformers import SamImageProcessor, SamProcessor

    s = image_size
    return SamProcessor(SamImageProcessor(
        size={"longest_edge": s}, pad_size={"height": s, "width": s},
        mask_size={"longest_edge": s // 4}, mask_pad_size={"height": s // 4, "width": s // 4},
    ))


def _load(arch_name: str, arch: _Arch, cfg: ExpertConfig):
    """-> (SamModel, SamProcessor, checkpoint files' sha256): random (seeded), a transformers snapshot
    dir, or a hub id."""
    from transformers import SamModel, SamProcessor

    w = choose(cfg.weights, seed=cfg.seed, expert=NAME)
    if w.random:
        with seeded(w.seed):
            model = SamModel(arch.config())
        return model, _processor(arch.image_size), ""
    p = snapshot_dir(w, expert=NAME, arch_name=arch_name, has_hub=arch.hub is not None,
                     real_archs=(n for n, v in VARIANTS.items() if not v.small),
                     hub_hint=arch.hub or VARIANTS[DEFAULT].default_weights,
                     holds="config.json, model.safetensors and preprocessor_config.json")
    if not (p / "config.json").exists():
        raise WeightsUnavailableError(
            f"sam: {p} lacks config.json; it must be a transformers snapshot "
            f"(`huggingface-cli download {arch.hub or VARIANTS[DEFAULT].default_weights} --local-dir DIR`)"
        )
    try:
        model = from_pretrained_strict(SamModel, p, expert=NAME)
        has_pp = any((p / n).exists() for n in ("preprocessor_config.json", "processor_config.json"))
        processor = SamProcessor.from_pretrained(str(p)) if has_pp else _processor(arch.image_size)
    except (OSError, ValueError) as e:
        raise WeightsUnavailableError(f"sam: could not load a snapshot from {p}: {e}") from None
    _check_arch(arch_name, arch, model.config, w.given)
    return model, processor, files_sha256(weight_files(p))


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


class SamExpert(PromptedMaskExpert):
    name = NAME
    prerequisites = PREREQUISITES

    def __init__(self, cfg: ExpertConfig, arch_name: str, model: Any, processor: Any,
                 prerequisites: dict[str, str], *, weights_file_sha256: str = "") -> None:
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
            weights_file_sha256=weights_file_sha256, preprocessing=self.pp, token_dim=EMBED_DIM, pooled_dim=EMBED_DIM,
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

    # -- the prompts (sam_family.PromptedMaskExpert runs the per-image loop)

    def _embed(self, pixels):
        embed = self.image_embeddings(pixels)
        return embed, [(embed[i : i + 1], self.valid_size(pixels[i])) for i in range(len(embed))]

    def _decode_boxes(self, boxes, embed, valid: tuple[int, int]):
        import torch

        h, w = valid
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        inp = (torch.tensor(boxes, dtype=torch.float32) * scale)[None].to(embed.device)
        low, iou = self.decode(embed, boxes=inp, multimask=False)
        return self.post_process(low, valid)[:, 0].numpy(), iou[:, 0].float().cpu().numpy()

    def _decode_points(self, points, embed, valid: tuple[int, int]):
        import torch

        h, w = valid
        pts = torch.from_numpy(points.reshape(1, -1, 1, 2)) * torch.tensor([w, h], dtype=torch.float32)
        pts = pts.to(embed.device)
        labels = torch.ones(pts.shape[:3], dtype=torch.int64, device=embed.device)
        low, iou = self.decode(embed, points=pts, labels=labels, multimask=True)
        iou = iou.float().cpu()
        best = iou.argmax(dim=1)
        idx = torch.arange(len(best))
        masks = self.post_process(low.cpu()[idx, best][:, None], valid)[:, 0].numpy()
        return masks, iou[idx, best].numpy()


def build(cfg: ExpertConfig, prerequisites: dict[str, str] | None = None) -> SamExpert:
    arch_name = cfg.resolved_arch()
    if arch_name not in _ARCHS:
        raise ValueError(f"sam: unknown arch {arch_name!r}; choose one of {sorted(_ARCHS)}")
    arch = _ARCHS[arch_name]
    unknown = sorted(set(prerequisites or {}) - set(PREREQUISITES))
    if unknown:
        raise ValueError(f"sam: unknown prerequisites {unknown}; sam reads only {list(PREREQUISITES)}")
    mask_options(cfg.options, arch.image_size)  # fail before the (slow) build
    model, processor, file_sha = _load(arch_name, arch, cfg)
    expert = SamExpert(cfg, arch_name, model, processor, dict(prerequisites or {}), weights_file_sha256=file_sha)
    if cfg.device != "cpu":
        expert.to(cfg.device)
    return expert


__all__ = ["DEFAULT", "DEFAULT_SMALL", "PREREQUISITES", "VARIANTS", "SamExpert", "build"]
