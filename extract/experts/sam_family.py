"""What the two segmentation experts share (sam2, and SAM v1 as the paper's Tab. 5 alternative): the mask
options, how detector boxes and the point grid become prompts, the greedy NMS, the mask records they
store, and the per-image loop of ``forward``. Each expert module keeps only what its library does
differently: how the image embedding is computed and how prompts are decoded into masks.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from astrea.extract.experts.base import Expert, ExpertOutput
from astrea.extract.experts.common import map_features
from astrea.extract.experts.registry import Variant
from astrea.schemas import mask_rle


EMBED_DIM = 256  # both families' image embedding width (tokens and pooled)


def variants(archs: dict[str, Any], describe: Any) -> dict[str, Any]:
    """The registry's ``Variant`` table of a SAM-family module: every arch with a hub id is real size,
    the others test/demo size (random weights only)."""
    return {
        name: Variant(name, EMBED_DIM, EMBED_DIM, a.image_size,
                      describe(name, a) + ("; test/demo size, random weights" if a.hub is None else ""),
                      a.hub, small=a.hub is None)
        for name, a in archs.items()
    }


@dataclass(frozen=True)
class MaskOptions:
    """``ExpertConfig.options`` for sam2 and sam (all change the stored outputs, so all go into the spec)."""

    points_per_side: int = 4  # automatic grid when no detector boxes: points_per_side^2 points
    score_threshold: float = 0.5  # keep grid masks whose predicted IoU is at least this
    nms_iou: float = 0.7  # drop a grid mask overlapping a better one by more than this mask IoU
    max_masks: int = 16  # per image, grid mode
    max_boxes: int = 100  # per image, box mode (the detector's highest-scoring first)
    min_area: int = 1  # pixels at mask_size; smaller masks are dropped
    mask_size: int | None = None  # RLE resolution; None -> image_size // 4 (the decoder's native size)

    @classmethod
    def from_options(cls, options: dict[str, Any], image_size: int) -> "MaskOptions":
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


def read_boxes(det: Any, max_boxes: int) -> tuple[list[list[float]], list[str | None], int]:
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


def grid_points(n: int) -> np.ndarray:
    """Centres of an n x n grid over the unit square, row-major, float32 [n*n, 2] as (x, y)."""
    c = (np.arange(n, dtype=np.float32) + 0.5) / n
    return np.stack(np.meshgrid(c, c, indexing="xy"), axis=-1).reshape(-1, 2)


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


def mask_record(mask: np.ndarray, score: float, label: str | None) -> dict[str, Any]:
    """One stored mask: COCO RLE, score, area, tight normalised box, label (DEVELOPING.md contract)."""
    h, w = mask.shape
    area = int(mask.sum())
    if area:
        ys, xs = np.nonzero(mask)
        box = [float(xs.min()) / w, float(ys.min()) / h, float(xs.max() + 1) / w, float(ys.max() + 1) / h]
    else:
        box = [0.0, 0.0, 0.0, 0.0]
    return {"rle": mask_rle.encode(mask), "score": score, "area": area, "box": box, "label": label}


class PromptedMaskExpert(Expert):
    """``forward`` of a SAM-family expert: one embedding pass for the batch, then per image either the
    detector's boxes (``prompts[i]["grounding_dino"]``) or the point grid as prompts.

    Subclasses set ``name``, ``prerequisites`` (the stage table's), ``cfg``, ``opts``, ``model``,
    ``image_size``, ``compute_dtype`` and implement ``_embed`` (batch -> embedding and per-image decoder
    context), ``_decode_boxes`` and ``_decode_points`` (prompts -> bool masks [N, h, w] and scores [N])."""

    device: str = "cpu"

    # -- what each library does its own way

    def _embed(self, pixels: Any) -> tuple[Any, list[tuple]]:  # pragma: no cover - interface
        raise NotImplementedError

    def _decode_boxes(self, boxes: list[list[float]], *ctx: Any) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def _decode_points(self, points: np.ndarray, *ctx: Any) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def _forward_context(self) -> Any:
        """Held around the whole forward (sam2 runs it all under autocast; sam autocasts its pieces)."""
        return contextlib.nullcontext()

    # -- shared

    _read_boxes = staticmethod(read_boxes)

    def _autocast(self):
        import torch

        if self.cfg.compute_dtype == "float32":
            return contextlib.nullcontext()
        # Reduced precision through autocast (as SAM2's own demos do): the prompt encoder mixes float32
        # coordinate features with the weights, which a weight cast would break; the weights stay
        # float32 (and their sha256 with them).
        device_type = "cuda" if str(self.device).startswith("cuda") else "cpu"
        return torch.autocast(device_type=device_type, dtype=self.compute_dtype)

    def _box_masks(self, det: Any, *ctx: Any) -> dict[str, Any]:
        boxes, labels, skipped = read_boxes(det, self.opts.max_boxes)
        out: dict[str, Any] = {"masks": [], "prompt": "boxes"}
        if skipped:
            out["skipped_boxes"] = skipped
        if not boxes:
            return out
        masks, scores = self._decode_boxes(boxes, *ctx)
        for j in range(len(boxes)):
            m = mask_record(masks[j], float(scores[j]), labels[j])
            if m["area"] >= self.opts.min_area:
                out["masks"].append(m)
        return out

    def _grid_masks(self, *ctx: Any) -> dict[str, Any]:
        masks, scores = self._decode_points(grid_points(self.opts.points_per_side), *ctx)
        kept = greedy_mask_nms(masks, scores, self.opts)
        return {"masks": [mask_record(masks[j], float(scores[j]), None) for j in kept], "prompt": "points"}

    def forward(self, pixels: Any, prompts: list[dict] | None = None) -> list[ExpertOutput]:
        import torch

        s = self.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ValueError(f"{self.name}: expected pixels [B, 3, {s}, {s}], got {tuple(pixels.shape)}")
        if prompts is not None and len(prompts) != pixels.shape[0]:
            raise ValueError(f"{self.name}: {len(prompts)} prompts for a batch of {pixels.shape[0]} images")
        results = []
        with torch.inference_mode(), self._forward_context():
            embed, contexts = self._embed(pixels)
            tokens, pooled = map_features(embed, self.cfg.grid)
            for i, ctx in enumerate(contexts):
                p = (prompts[i] or {}) if prompts is not None else {}
                if "grounding_dino" in p:
                    outputs = self._box_masks(p["grounding_dino"], *ctx)
                else:
                    outputs = self._grid_masks(*ctx)
                results.append(ExpertOutput(tokens=tokens[i], pooled=pooled[i], outputs=outputs))
        return results

    def to(self, device: str) -> "PromptedMaskExpert":
        self.model.to(device)
        self.device = device
        return self
