"""The segmentation-stage expert: SAM2.1 (hiera tiny .. large) through the ``sam2`` package.

The model is built from sam2's own hydra configs (``configs/sam2.1/sam2.1_hiera_*.yaml``) with the
same post-processing overrides as ``sam2.build_sam.build_sam2`` (dynamic multimask fallback), so it
is the model ``SAM2ImagePredictor`` runs. Per image:

- ``tokens``: the image embedding the mask decoder reads (``SAM2ImagePredictor.get_image_embedding``,
  i.e. the top FPN level plus ``no_mem_embed``), [256, S/16, S/16] (64x64 at 1024 px), resampled
  to ``grid x grid`` (area mean).
- ``pooled``: the spatial mean of that embedding, [256].
- ``outputs``: ``{"masks": [...], "prompt": "boxes" | "points"}``. With stored grounding_dino
  outputs in ``prompts[i]["grounding_dino"]``, one mask per detected box (box prompt,
  ``multimask_output=False``, label = the detector's label); otherwise a ``points_per_side``^2 grid
  of single positive points, best of SAM2's three masks per point, kept above ``score_threshold``,
  greedy NMS by mask IoU, at most ``max_masks``. Masks are COCO RLE at ``mask_size`` x ``mask_size``
  in the model's (squashed, normalised) image frame: resize a decoded mask to (H, W) to lay it on the
  original image. Boxes are the masks' tight boxes, normalised xyxy.

Note: this module is ``astrea.extract.experts.sam2``; ``import sam2`` below is absolute and gets
the sam2 package (``from __future__ import annotations`` does not change import resolution).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from astrea.extract.experts.base import WeightsUnavailableError, spec_from_config, state_dict_sha256
from astrea.extract.experts.common import ensure_rgb
from astrea.extract.experts.registry import ExpertConfig, Variant
from astrea.extract.experts.sam_family import EMBED_DIM, MaskOptions, PromptedMaskExpert, variants
from astrea.extract.experts.weights import Weights, choose, files_sha256, load_state_dict_strict, resolve_file, seeded
from astrea.schemas.stages import expert_prerequisites

NAME = "sam2"
_MEAN = [0.485, 0.456, 0.406]  # sam2.utils.transforms.SAM2Transforms
_STD = [0.229, 0.224, 0.225]
MASK_THRESHOLD = 0.0  # SAM2ImagePredictor's default: logits > 0 are foreground


@dataclass(frozen=True)
class _Arch:
    config_file: str  # inside the sam2 package's hydra config module
    image_size: int
    checkpoint: str  # file name in the hub repo
    hub: str | None


_HUB = "facebook/sam2.1-hiera-"
_ARCHS: dict[str, _Arch] = {
    "sam2.hiera_tiny": _Arch("configs/sam2.1/sam2.1_hiera_t.yaml", 1024, "sam2.1_hiera_tiny.pt", _HUB + "tiny"),
    "sam2.hiera_small": _Arch("configs/sam2.1/sam2.1_hiera_s.yaml", 1024, "sam2.1_hiera_small.pt", _HUB + "small"),
    "sam2.hiera_base_plus": _Arch(
        "configs/sam2.1/sam2.1_hiera_b+.yaml", 1024, "sam2.1_hiera_base_plus.pt", _HUB + "base-plus"
    ),
    "sam2.hiera_large": _Arch("configs/sam2.1/sam2.1_hiera_l.yaml", 1024, "sam2.1_hiera_large.pt", _HUB + "large"),
    # The real hiera-tiny architecture at 256 px (embedding 16x16): SAM2Base takes image_size as a
    # config value and every module sizes itself from it. ~15x fewer FLOPs than 1024 px.
    "sam2.hiera_tiny_256": _Arch("configs/sam2.1/sam2.1_hiera_t.yaml", 256, "sam2.1_hiera_tiny.pt", None),
}


def _describe(name: str, a: _Arch) -> str:
    size = name.split(".", 1)[1].replace("_256", "")
    return f"SAM2.1 {size} ({a.config_file.rsplit('/', 1)[1]}) at {a.image_size}px, embedding {a.image_size // 16}^2"


VARIANTS: dict[str, Variant] = variants(_ARCHS, _describe)
DEFAULT = "sam2.hiera_large"
DEFAULT_SMALL = "sam2.hiera_tiny_256"


# ------------------------------------------------------------------------------------------ loading


def _build_model(arch: _Arch, seed: int):
    """SAM2Base exactly as ``sam2.build_sam.build_sam2`` builds it (random init, seeded)."""
    from sam2.build_sam import build_sam2  # absolute: the sam2 package, not this module

    overrides = [] if arch.image_size == 1024 else [f"++model.image_size={arch.image_size}"]
    with seeded(seed):
        return build_sam2(arch.config_file, ckpt_path=None, device="cpu", mode="eval", hydra_overrides_extra=overrides)


def _checkpoint_path(arch_name: str, arch: _Arch, w: Weights) -> Path:
    if w.kind == "directory":
        return resolve_file(str(w.path), arch.checkpoint, expert=NAME)
    if w.kind == "file":
        return w.path
    if arch.hub is None:
        w.refuse_hub_for_small(NAME, arch_name, (n for n, v in VARIANTS.items() if not v.small))
    hub = w.hub_id
    from sam2.build_sam import HF_MODEL_ID_TO_FILENAMES

    filename = arch.checkpoint
    if hub in HF_MODEL_ID_TO_FILENAMES:
        config, filename = HF_MODEL_ID_TO_FILENAMES[hub]
        if config != arch.config_file:
            match = [n for n, a in _ARCHS.items() if a.config_file == config and a.hub]
            raise WeightsUnavailableError(
                f"sam2: hub weights {hub!r} are for {config}, not arch {arch_name!r} ({arch.config_file}); "
                f"pass arch {match[0] if match else '(none: SAM2.0 checkpoints are not supported)'}"
            )
    return resolve_file(hub, filename, expert=NAME)


def _load_checkpoint(model: Any, path: Path, arch_name: str) -> None:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsUnavailableError(
            f"sam2: cannot read checkpoint {path} with torch.load(weights_only=True): {type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''}"
        ) from None
    sd = obj["model"] if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict) else obj
    if not isinstance(sd, dict):
        raise WeightsUnavailableError(f"sam2: checkpoint {path} holds no state dict (expected {{'model': state_dict}})")
    load_state_dict_strict(model, sd, expert=NAME, source=path,
                           hint=f"Arch {arch_name!r}: pass the arch it was trained as")


# ------------------------------------------------------------------------------------ preprocessing


def preprocessing_spec(image_size: int) -> dict[str, Any]:
    return {
        "input": "RGB PIL image (grayscale/CMYK/alpha/16-bit converted by astrea.extract.experts.common)",
        "size": [image_size, image_size],
        "resize_mode": "squash",  # SAM2Transforms: Resize((S, S)), aspect ratio not kept
        "interpolation": "bilinear",
        "antialias": True,
        "resize_backend": "torchvision.transforms.functional.resize on the float tensor (as SAM2Transforms)",
        "scale": "1/255",
        "mean": list(_MEAN),
        "std": list(_STD),
    }


STRIP_ABOVE_PIXELS = 4_000_000  # larger images are converted and resized in strips (same output, less memory)
STRIP_BYTES = 64 << 20


def apply_preprocessing(image: Any, image_size: int):
    """PIL RGB -> float32 [3, S, S], the same ops in the same order as ``SAM2Transforms``
    (to_tensor, then tensor Resize((S, S)) bilinear with antialias, then Normalize)."""
    import torch
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    mode = InterpolationMode.BILINEAR
    w, h = image.size
    if w * h <= STRIP_ABOVE_PIXELS:
        x = TF.to_tensor(image)
        x = TF.resize(x, [image_size, image_size], interpolation=mode, antialias=True)
        return TF.normalize(x, _MEAN, _STD)
    # A large image as a float tensor is 12 bytes a pixel (768 MB at 64M pixels), and resize makes more.
    # The antialiased resize is separable (width pass, then height pass, each per row or column), so
    # resizing the width strip by strip and then the height gives the same bits (tests/extract/test_sam2.py)
    # with the float temporaries of one strip plus the [3, H, S] intermediate.
    rows = max(1, STRIP_BYTES // (w * 3 * 4))
    parts = []
    for top in range(0, h, rows):
        strip = TF.to_tensor(image.crop((0, top, w, min(h, top + rows))))
        parts.append(TF.resize(strip, [strip.shape[1], image_size], interpolation=mode, antialias=True))
    x = TF.resize(torch.cat(parts, 1), [image_size, image_size], interpolation=mode, antialias=True)
    return TF.normalize(x, _MEAN, _STD)


# ------------------------------------------------------------------------------------------- expert


class Sam2Expert(PromptedMaskExpert):
    name = NAME
    prerequisites = expert_prerequisites(NAME)  # the stage table: detection's boxes prompt segmentation

    def __init__(self, cfg: ExpertConfig, arch_name: str, model: Any, prerequisites: dict[str, str], *,
                 weights_file_sha256: str = "") -> None:
        import torch

        self.cfg = cfg
        self.arch_name = arch_name
        self.arch = _ARCHS[arch_name]
        self.model = model.eval().requires_grad_(False)
        self.device = "cpu"
        self.compute_dtype = getattr(torch, cfg.compute_dtype)
        self.opts = MaskOptions.from_options(dict(cfg.options), self.arch.image_size)
        self.image_size = int(model.image_size)
        self.pp = preprocessing_spec(self.image_size)
        self.spec = spec_from_config(
            cfg, expert=NAME, arch=arch_name, weights_sha256=state_dict_sha256(self.model),
            weights_file_sha256=weights_file_sha256,
            preprocessing=self.pp, token_dim=EMBED_DIM, pooled_dim=EMBED_DIM,
            config={
                "library": "sam2",
                "config_file": self.arch.config_file,
                "image_size": self.image_size,
                "build": "sam2.build_sam.build_sam2 overrides (dynamic multimask via stability 0.05/0.98)",
                "tokens": "image embedding (top FPN level + no_mem_embed), area-mean resampled",
                "pooled": "spatial mean of the image embedding",
                "compute_dtype": cfg.compute_dtype,
                "autocast": cfg.compute_dtype != "float32",
                "mask_threshold": MASK_THRESHOLD,
                "box_prompts": "grounding_dino boxes, multimask_output=False",
                "point_prompts": "single positive point per grid cell centre, best of 3 masks",
                **{k: getattr(self.opts, k) for k in self.opts.__dataclass_fields__},
            },
            prerequisites=dict(prerequisites),
        )

    # -- pieces

    def preprocess(self, image: Any):
        image = ensure_rgb(image)
        return apply_preprocessing(image, self.image_size)

    def image_features(self, pixels):
        """-> (image_embed [B, 256, h, w], high_res_feats [[B, 32, 4h, 4w], [B, 64, 2h, 2w]]), as
        ``SAM2ImagePredictor.set_image_batch`` computes them."""
        m = self.model
        backbone_out = m.forward_image(pixels)
        _, vision_feats, _, feat_sizes = m._prepare_backbone_features(backbone_out)
        if m.directly_add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + m.no_mem_embed
        b = pixels.shape[0]
        feats = [f.permute(1, 2, 0).reshape(b, -1, h, w) for f, (h, w) in zip(vision_feats, feat_sizes)]
        return feats[-1], feats[:-1]

    def decode(self, embed, high_res, coords, labels, multimask: bool):
        """Prompt encoder + mask decoder for one image and N prompts -> (low-res logits [N, C, h, w],
        scores [N, C]); coords [N, K, 2] in input pixels, labels [N, K] (SAM: 1 fg, 0 bg, 2/3 box)."""
        m = self.model
        sparse, dense = m.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        low, iou, _, _ = m.sam_mask_decoder(
            image_embeddings=embed,
            image_pe=m.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            repeat_image=coords.shape[0] > 1,
            high_res_features=high_res,
        )
        return low, iou

    def _to_masks(self, low):
        import torch.nn.functional as F

        s = self.opts.mask_size
        return F.interpolate(low.float(), (s, s), mode="bilinear", align_corners=False) > MASK_THRESHOLD

    # -- the prompts (sam_family.PromptedMaskExpert runs the per-image loop)

    def _forward_context(self):
        return self._autocast()  # SAM2 runs whole under autocast, as its own demos do

    def _embed(self, pixels):
        import torch

        embed, high_res = self.image_features(pixels.to(self.device, torch.float32))
        return embed, [(embed[i : i + 1], [f[i : i + 1] for f in high_res]) for i in range(len(embed))]

    def _decode_boxes(self, boxes, embed, high_res):
        import torch

        coords = torch.tensor(boxes, dtype=torch.float32, device=embed.device).reshape(-1, 2, 2) * self.image_size
        lab = torch.tensor([[2, 3]], dtype=torch.int, device=embed.device).repeat(len(boxes), 1)
        low, iou = self.decode(embed, high_res, coords, lab, multimask=False)
        return self._to_masks(low)[:, 0].cpu().numpy(), iou[:, 0].float().cpu().numpy()

    def _decode_points(self, points, embed, high_res):
        import torch

        coords = torch.from_numpy(points.reshape(-1, 1, 2)).to(embed.device) * self.image_size
        lab = torch.ones(coords.shape[:2], dtype=torch.int, device=embed.device)
        low, iou = self.decode(embed, high_res, coords, lab, multimask=True)
        best = iou.float().argmax(dim=1)
        idx = torch.arange(len(best), device=best.device)
        masks = self._to_masks(low[idx, best][:, None])[:, 0].cpu().numpy()
        return masks, iou.float()[idx, best].cpu().numpy()


def build(cfg: ExpertConfig, prerequisites: dict[str, str] | None = None) -> Sam2Expert:
    arch_name = cfg.resolved_arch()
    if arch_name not in _ARCHS:
        raise ValueError(f"sam2: unknown arch {arch_name!r}; choose one of {sorted(_ARCHS)}")
    arch = _ARCHS[arch_name]
    unknown = sorted(set(prerequisites or {}) - set(Sam2Expert.prerequisites))
    if unknown:
        raise ValueError(f"sam2: unknown prerequisites {unknown}; sam2 reads only {list(Sam2Expert.prerequisites)}")
    MaskOptions.from_options(dict(cfg.options), arch.image_size)  # fail before the (slow) build
    w = choose(cfg.weights, seed=cfg.seed, expert=NAME)
    path = None if w.random else _checkpoint_path(arch_name, arch, w)
    model = _build_model(arch, cfg.seed)
    if path is not None:
        _load_checkpoint(model, path, arch_name)
    expert = Sam2Expert(cfg, arch_name, model, dict(prerequisites or {}),
                        weights_file_sha256=files_sha256([path] if path is not None else []))
    if cfg.device != "cpu":
        expert.to(cfg.device)
    return expert
