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

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from astrea.schemas import mask_rle as rle
from astrea.extract.experts.base import (
    spec_from_config,
    Expert,
    ExpertOutput,
    WeightsUnavailableError,
    state_dict_sha256,
)
from astrea.extract.experts.common import ensure_rgb, map_features
from astrea.extract.experts.registry import ExpertConfig, Variant
from astrea.extract.experts.weights import is_random, resolve_file

NAME = "sam2"
EMBED_DIM = 256
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
    text = f"SAM2.1 {size} ({a.config_file.rsplit('/', 1)[1]}) at {a.image_size}px, embedding {a.image_size // 16}^2"
    return text + ("; test/demo size, random weights" if a.hub is None else "")


VARIANTS: dict[str, Variant] = {
    name: Variant(name, EMBED_DIM, EMBED_DIM, a.image_size, _describe(name, a), a.hub, small=a.hub is None)
    for name, a in _ARCHS.items()
}
DEFAULT = "sam2.hiera_large"
DEFAULT_SMALL = "sam2.hiera_tiny_256"


@dataclass(frozen=True)
class MaskOptions:
    """``ExpertConfig.options`` for sam2 (all change the stored outputs, so all go into the spec)."""

    points_per_side: int = 4  # automatic grid when no detector boxes: points_per_side^2 points
    score_threshold: float = 0.5  # keep grid masks whose predicted IoU is at least this
    nms_iou: float = 0.7  # drop a grid mask overlapping a better one by more than this mask IoU
    max_masks: int = 16  # per image, grid mode
    max_boxes: int = 100  # per image, box mode (the detector's highest-scoring first)
    min_area: int = 1  # pixels at mask_size; smaller masks are dropped
    mask_size: int | None = None  # RLE resolution; None -> image_size // 4 (the decoder's native size)

    @classmethod
    def from_options(cls, options: dict[str, Any], image_size: int) -> "MaskOptions":
        import dataclasses

        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise ValueError(f"sam2: unknown options {unknown}; valid options are {sorted(valid)}")
        o = cls(**options)
        if o.mask_size is None:
            o = dataclasses.replace(o, mask_size=image_size // 4)
        checks = {
            "points_per_side": o.points_per_side >= 1,
            "score_threshold": 0.0 <= o.score_threshold <= 1.0,
            "nms_iou": 0.0 < o.nms_iou <= 1.0,
            "max_masks": o.max_masks >= 0,
            "max_boxes": o.max_boxes >= 0,
            "min_area": o.min_area >= 0,
            "mask_size": o.mask_size is not None and o.mask_size >= 1,
        }
        for k, ok in checks.items():
            if not ok:
                raise ValueError(f"sam2: option {k}={getattr(o, k)!r} is out of range")
        return o


# ------------------------------------------------------------------------------------------ loading


@contextlib.contextmanager
def _seeded(seed: int):
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _build_model(arch: _Arch, seed: int):
    """SAM2Base exactly as ``sam2.build_sam.build_sam2`` builds it (random init, seeded)."""
    from sam2.build_sam import build_sam2  # absolute: the sam2 package, not this module

    overrides = [] if arch.image_size == 1024 else [f"++model.image_size={arch.image_size}"]
    with _seeded(seed):
        return build_sam2(arch.config_file, ckpt_path=None, device="cpu", mode="eval", hydra_overrides_extra=overrides)


def _checkpoint_path(arch_name: str, arch: _Arch, weights: str) -> Path:
    p = Path(weights).expanduser()
    if p.is_dir():
        return resolve_file(str(p), arch.checkpoint, expert=NAME)
    if p.is_file():
        return p
    if weights.startswith((".", "/", "~")) or weights.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise WeightsUnavailableError(f"sam2: weights path {weights!r} does not exist")
    hub = weights[len("hf-hub:"):] if weights.startswith("hf-hub:") else weights
    if arch.hub is None:
        raise WeightsUnavailableError(
            f"sam2: arch {arch_name!r} is a test-size model: weights must be 'random' or a local checkpoint, "
            f"not the hub id {hub!r}; for hub weights pick a real arch "
            f"({', '.join(n for n, v in VARIANTS.items() if not v.small)})"
        )
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
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise WeightsUnavailableError(
            f"sam2: checkpoint {path} does not fit arch {arch_name!r}: {str(e).splitlines()[0][:200]}...; "
            f"pass the arch it was trained as"
        ) from None
    if missing or unexpected:
        raise WeightsUnavailableError(
            f"sam2: checkpoint {path} does not match arch {arch_name!r}: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]}); pass the arch "
            f"it was trained as"
        )


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


def apply_preprocessing(image: Any, image_size: int):
    """PIL RGB -> float32 [3, S, S], the same ops in the same order as ``SAM2Transforms``
    (to_tensor, then tensor Resize((S, S)) bilinear with antialias, then Normalize)."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    x = TF.to_tensor(image)
    x = TF.resize(x, [image_size, image_size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.normalize(x, _MEAN, _STD)


# ------------------------------------------------------------------------------------------- expert


class Sam2Expert(Expert):
    name = NAME
    prerequisites = ("grounding_dino",)

    def __init__(self, cfg: ExpertConfig, arch_name: str, model: Any, prerequisites: dict[str, str]) -> None:
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

    def _autocast(self):
        import torch

        if self.cfg.compute_dtype == "float32":
            return contextlib.nullcontext()
        # SAM2 is run in reduced precision through autocast (as its own demos do): its prompt encoder
        # mixes float32 coordinates with weights, so casting the weights would break it.
        device_type = "cuda" if str(self.device).startswith("cuda") else "cpu"
        return torch.autocast(device_type=device_type, dtype=self.compute_dtype)

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

    # -- prompts

    @staticmethod
    def _read_boxes(det: Any, max_boxes: int) -> tuple[list[list[float]], list[str | None], int]:
        """Valid normalised boxes (highest detector score first) + labels, and how many were skipped."""
        boxes = det.get("boxes", []) if isinstance(det, dict) else []
        labels = det.get("labels", []) if isinstance(det, dict) else []
        scores = det.get("scores", []) if isinstance(det, dict) else []
        keep, skipped = [], 0
        for j, b in enumerate(boxes):
            try:
                x1, y1, x2, y2 = (float(v) for v in b)
            except (TypeError, ValueError):
                skipped += 1
                continue
            x1, y1, x2, y2 = (min(max(v, 0.0), 1.0) for v in (x1, y1, x2, y2))
            if not (np.isfinite([x1, y1, x2, y2]).all() and x2 > x1 and y2 > y1):
                skipped += 1
                continue
            score = float(scores[j]) if j < len(scores) else 0.0
            label = str(labels[j]) if j < len(labels) else None
            keep.append((score, j, [x1, y1, x2, y2], label))
        keep.sort(key=lambda t: (-t[0], t[1]))
        keep = keep[:max_boxes]
        return [k[2] for k in keep], [k[3] for k in keep], skipped

    def _box_masks(self, embed, high_res, det: Any) -> dict[str, Any]:
        import torch

        boxes, labels, skipped = self._read_boxes(det, self.opts.max_boxes)
        out: dict[str, Any] = {"masks": [], "prompt": "boxes"}
        if skipped:
            out["skipped_boxes"] = skipped
        if not boxes:
            return out
        coords = torch.tensor(boxes, dtype=torch.float32, device=embed.device).reshape(-1, 2, 2) * self.image_size
        lab = torch.tensor([[2, 3]], dtype=torch.int, device=embed.device).repeat(len(boxes), 1)
        low, iou = self.decode(embed, high_res, coords, lab, multimask=False)
        masks = self._to_masks(low)[:, 0].cpu().numpy()
        scores = iou[:, 0].float().cpu().numpy()
        for j in range(len(boxes)):
            m = _mask_record(masks[j], float(scores[j]), labels[j])
            if m["area"] >= self.opts.min_area:
                out["masks"].append(m)
        return out

    def _grid_masks(self, embed, high_res) -> dict[str, Any]:
        import torch

        o = self.opts
        n = o.points_per_side
        c = (np.arange(n, dtype=np.float32) + 0.5) / n
        pts = np.stack(np.meshgrid(c, c, indexing="xy"), axis=-1).reshape(-1, 1, 2)  # row-major points
        coords = torch.from_numpy(pts).to(embed.device) * self.image_size
        lab = torch.ones(coords.shape[:2], dtype=torch.int, device=embed.device)
        low, iou = self.decode(embed, high_res, coords, lab, multimask=True)
        best = iou.float().argmax(dim=1)
        idx = torch.arange(len(best), device=best.device)
        masks = self._to_masks(low[idx, best][:, None])[:, 0].cpu().numpy()
        scores = iou.float()[idx, best].cpu().numpy()
        kept = greedy_mask_nms(masks, scores, o)
        return {"masks": [_mask_record(masks[j], float(scores[j]), None) for j in kept], "prompt": "points"}

    # -- contract

    def forward(self, pixels: Any, prompts: list[dict] | None = None) -> list[ExpertOutput]:
        import torch

        s = self.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ValueError(f"sam2: expected pixels [B, 3, {s}, {s}], got {tuple(pixels.shape)}")
        if prompts is not None and len(prompts) != pixels.shape[0]:
            raise ValueError(f"sam2: {len(prompts)} prompts for a batch of {pixels.shape[0]} images")
        results = []
        with torch.inference_mode(), self._autocast():
            x = pixels.to(self.device, torch.float32)
            embed, high_res = self.image_features(x)
            tokens, pooled = map_features(embed, self.cfg.grid)
            b = len(tokens)
            for i in range(b):
                e_i = embed[i : i + 1]
                hr_i = [f[i : i + 1] for f in high_res]
                p = (prompts[i] or {}) if prompts is not None else {}
                if "grounding_dino" in p:
                    outputs = self._box_masks(e_i, hr_i, p["grounding_dino"])
                else:
                    outputs = self._grid_masks(e_i, hr_i)
                results.append(ExpertOutput(tokens=tokens[i], pooled=pooled[i], outputs=outputs))
        return results

    def to(self, device: str) -> "Sam2Expert":
        self.model.to(device)
        self.device = device
        return self


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def greedy_mask_nms(masks: np.ndarray, scores: np.ndarray, o: MaskOptions) -> list[int]:
    """Indices kept: score >= threshold, best first, area >= min_area, mask IoU <= nms_iou with every
    kept one, at most max_masks. Shared by the sam2 and sam experts so their point-grid outputs read alike."""
    order = [j for j in np.argsort(-scores, kind="stable") if scores[j] >= o.score_threshold]
    kept: list[int] = []
    for j in order:
        if len(kept) >= o.max_masks:
            break
        if int(masks[j].sum()) < max(o.min_area, 1):
            continue
        if all(_mask_iou(masks[j], masks[k]) <= o.nms_iou for k in kept):
            kept.append(int(j))
    return kept


def _mask_record(mask: np.ndarray, score: float, label: str | None) -> dict[str, Any]:
    h, w = mask.shape
    area = int(mask.sum())
    if area:
        ys, xs = np.nonzero(mask)
        box = [float(xs.min()) / w, float(ys.min()) / h, float(xs.max() + 1) / w, float(ys.max() + 1) / h]
    else:
        box = [0.0, 0.0, 0.0, 0.0]
    return {"rle": rle.encode(mask), "score": score, "area": area, "box": box, "label": label}


def build(cfg: ExpertConfig, prerequisites: dict[str, str] | None = None) -> Sam2Expert:
    arch_name = cfg.resolved_arch()
    if arch_name not in _ARCHS:
        raise ValueError(f"sam2: unknown arch {arch_name!r}; choose one of {sorted(_ARCHS)}")
    arch = _ARCHS[arch_name]
    unknown = sorted(set(prerequisites or {}) - set(Sam2Expert.prerequisites))
    if unknown:
        raise ValueError(f"sam2: unknown prerequisites {unknown}; sam2 reads only {list(Sam2Expert.prerequisites)}")
    MaskOptions.from_options(dict(cfg.options), arch.image_size)  # fail before the (slow) build
    path = None if is_random(cfg.weights) else _checkpoint_path(arch_name, arch, cfg.weights)
    model = _build_model(arch, cfg.seed)
    if path is not None:
        _load_checkpoint(model, path, arch_name)
    expert = Sam2Expert(cfg, arch_name, model, dict(prerequisites or {}))
    if cfg.device != "cpu":
        expert.to(cfg.device)
    return expert
