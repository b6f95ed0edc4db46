"""The caption-stage expert: SigLIP ViT-SO400M/14@384 and the paper's Tab. 5 alternatives.

SigLIP, OpenAI CLIP L/14@336 and EVA-CLIP-02 L/14@336 are built through open_clip_torch (the real
``open_clip.create_model`` path, so hub and local checkpoints load exactly as open_clip loads them);
DINOv2 L/14@336 is not a CLIP model and open_clip has no config for it, so it is built through timm
(``vit_large_patch14_dinov2``, hub ``timm/vit_large_patch14_dinov2.lvd142m``) at 336 px, the
resolution the paper ablates.

Per image:
- ``tokens``: the final patch tokens (after the tower's last norm, prefix/CLS/register tokens dropped),
  resampled from the patch grid to ``grid x grid`` (area average when shrinking).
- ``pooled``: ``model.encode_image`` (unnormalised) for the CLIP-family models, the normed CLS token
  for DINOv2 (timm's ``forward_head(pre_logits=True)``).
- ``outputs``: ``{}``; the pooled embedding is the prediction.

Only the vision tower is kept after loading: the text tower is never used for extraction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from astrea.errors import AstreaError
from astrea.extract.experts.base import (
    spec_from_config,
    Expert,
    ExpertOutput,
    WeightsUnavailableError,
    state_dict_sha256,
)
from astrea.extract.experts.common import ensure_rgb, resample_grid
from astrea.extract.experts.registry import ExpertConfig, Variant
from astrea.extract.experts.weights import (
    Weights,
    choose,
    describe_keys,
    files_sha256,
    keys_from_load_error,
    resolve_file,
    seeded,
    weight_files,
)

NAME = "siglip"

# open_clip / timm preprocessing constants (copied as numbers so the spec is self-describing).
_INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
_OPENAI = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _pp(size: int, resize_mode: str, mean_std: tuple, interpolation: str = "bicubic") -> dict[str, Any]:
    return {
        "size": [size, size],
        "resize_mode": resize_mode,
        "interpolation": interpolation,
        "mean": list(mean_std[0]),
        "std": list(mean_std[1]),
    }


# Small configs: same model classes and code paths as the real ones, test/demo sized.
_TINY_SIGLIP_TIMM = "astrea_vit_tiny_patch14_siglip_112"
_TINY_TEXT = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}


@dataclass(frozen=True)
class _Arch:
    backend: str  # "open_clip" | "timm"
    model_name: str  # open_clip model config name, or timm model name
    hub: str | None  # default hub id for real weights
    preprocess: dict[str, Any]  # the preprocessing the real weights were trained with
    overrides: dict[str, Any] = field(default_factory=dict)  # open_clip model cfg / timm kwargs


_ARCHS: dict[str, _Arch] = {
    "siglip.so400m_14_384": _Arch(
        "open_clip", "ViT-SO400M-14-SigLIP-384", "timm/ViT-SO400M-14-SigLIP-384", _pp(384, "squash", _INCEPTION)
    ),
    # OpenAI's weights were trained with QuickGELU: the -quickgelu config is the one they load into.
    "siglip.clip_l14_336": _Arch(
        "open_clip", "ViT-L-14-336-quickgelu", "timm/vit_large_patch14_clip_336.openai", _pp(336, "shortest", _OPENAI)
    ),
    "siglip.eva02_l14_336": _Arch(
        "open_clip",
        "EVA02-L-14-336",
        "timm/eva02_large_patch14_clip_336.merged2b_s6b_b61k",
        _pp(336, "shortest", _OPENAI),
    ),
    "siglip.dinov2_l14_336": _Arch(
        "timm",
        "vit_large_patch14_dinov2",
        "timm/vit_large_patch14_dinov2.lvd142m",
        _pp(336, "shortest", _IMAGENET),
        {"img_size": 336},
    ),
    "siglip.tiny": _Arch(
        "open_clip",
        "ViT-SO400M-14-SigLIP-384",
        None,
        _pp(112, "squash", _INCEPTION),
        {
            "embed_dim": 64,
            "vision_cfg": {
                "image_size": 112,
                "timm_model_name": _TINY_SIGLIP_TIMM,
                "timm_model_pretrained": False,
                "timm_pool": "map",
                "timm_proj": "none",
            },
            "text_cfg": {**_TINY_TEXT, "width": 64, "no_causal_mask": True, "proj_bias": True, "pool_type": "last"},
        },
    ),
    "siglip.clip_tiny": _Arch(
        "open_clip",
        "ViT-L-14-336-quickgelu",
        None,
        _pp(112, "shortest", _OPENAI),
        {
            "embed_dim": 32,
            "vision_cfg": {"image_size": 112, "layers": 2, "width": 64, "head_width": 32, "patch_size": 14},
            "text_cfg": _TINY_TEXT,
        },
    ),
    "siglip.dinov2_tiny": _Arch(
        "timm",
        "vit_small_patch14_dinov2",
        None,
        _pp(112, "shortest", _IMAGENET),
        {"img_size": 112, "depth": 2, "embed_dim": 64, "num_heads": 2},
    ),
}

VARIANTS: dict[str, Variant] = {
    "siglip.so400m_14_384": Variant(
        "siglip.so400m_14_384", 1152, 1152, 384, "SigLIP ViT-SO400M/14@384 (open_clip), 27x27 patches",
        "timm/ViT-SO400M-14-SigLIP-384",
    ),
    "siglip.clip_l14_336": Variant(
        "siglip.clip_l14_336", 1024, 768, 336, "OpenAI CLIP ViT-L/14@336 (open_clip, QuickGELU), 24x24 patches",
        "timm/vit_large_patch14_clip_336.openai",
    ),
    "siglip.eva02_l14_336": Variant(
        "siglip.eva02_l14_336", 1024, 768, 336, "EVA-CLIP-02 ViT-L/14@336 (open_clip + timm), 24x24 patches",
        "timm/eva02_large_patch14_clip_336.merged2b_s6b_b61k",
    ),
    "siglip.dinov2_l14_336": Variant(
        "siglip.dinov2_l14_336", 1024, 1024, 336, "DINOv2 ViT-L/14@336 (timm), 24x24 patches, CLS pooled",
        "timm/vit_large_patch14_dinov2.lvd142m",
    ),
    "siglip.tiny": Variant(
        "siglip.tiny", 64, 64, 112, "test/demo size SigLIP-style ViT (timm, MAP pool) via open_clip, 8x8 patches",
        None, small=True,
    ),
    "siglip.clip_tiny": Variant(
        "siglip.clip_tiny", 64, 32, 112, "test/demo size OpenAI-CLIP-style ViT (open_clip), 8x8 patches",
        None, small=True,
    ),
    "siglip.dinov2_tiny": Variant(
        "siglip.dinov2_tiny", 64, 64, 112, "test/demo size DINOv2-style ViT (timm), 8x8 patches",
        None, small=True,
    ),
}
DEFAULT = "siglip.so400m_14_384"
DEFAULT_SMALL = "siglip.tiny"


def _register_tiny_timm() -> None:
    """Register the tiny SigLIP trunk with timm so it goes through open_clip's real TimmModel path
    (open_clip passes no size kwargs to timm, so a small trunk needs a timm name of its own)."""
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    if timm.is_model(_TINY_SIGLIP_TIMM):
        return

    def astrea_vit_tiny_patch14_siglip_112(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
        if pretrained:
            raise ValueError(f"{_TINY_SIGLIP_TIMM} is a test-size model with random weights only")
        for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(k, None)
        args = dict(
            img_size=112, patch_size=14, embed_dim=64, depth=2, num_heads=2, mlp_ratio=3.7362,
            class_token=False, global_pool="map",
        )
        return VisionTransformer(**{**args, **kwargs})

    astrea_vit_tiny_patch14_siglip_112.__module__ = __name__
    register_model(astrea_vit_tiny_patch14_siglip_112)


# ------------------------------------------------------------------------------------------ loading


def _no_hub_for_small(arch: _Arch, cfg: ExpertConfig, w: Weights) -> str:
    """Hub id for ``w``; test-size archs have no published weights, only random or local files."""
    if arch.hub is None:
        w.refuse_hub_for_small(NAME, cfg.resolved_arch(), (n for n, v in VARIANTS.items() if not v.small),
                               local="a local checkpoint file")
    return w.hub_id


def _open_clip_dir_checkpoint(p: Path) -> Path | None:
    """The file open_clip's ``local-dir:`` loads from ``p`` (its own preference order), or None."""
    import open_clip.factory

    find = getattr(open_clip.factory, "_find_checkpoint_in_dir", None)
    if find is not None:
        found = find(p)
        return Path(found) if found else None
    files = weight_files(p)
    return files[0] if files else None


def _load_open_clip(arch: _Arch, cfg: ExpertConfig, w: Weights) -> tuple[Any, dict[str, Any], list[Path]]:
    """-> (vision tower, preprocess cfg that open_clip attached to the model, checkpoint files read)."""
    import open_clip

    force_pp = {
        "size": tuple(arch.preprocess["size"]),
        "mean": tuple(arch.preprocess["mean"]),
        "std": tuple(arch.preprocess["std"]),
        "interpolation": arch.preprocess["interpolation"],
        "resize_mode": arch.preprocess["resize_mode"],
    }
    _register_tiny_timm()
    if w.random:
        with seeded(w.seed):
            # Random weights keep the preprocessing the real weights were trained with, so a
            # random-weight run exercises exactly the production transform.
            model = open_clip.create_model(
                arch.model_name, pretrained=None, force_preprocess_cfg=force_pp, **arch.overrides
            )
        return _vision_tower(model) + ([],)
    p = w.path
    if w.kind == "hub":
        # Fetch only the open_clip files (timm hub repos also hold timm-format copies), through
        # astrea's resolver so offline gives the one clear error; then load as a local dir, where
        # open_clip reads the repo's open_clip_config.json, preprocessing included.
        hub = _no_hub_for_small(arch, cfg, w)
        p = resolve_file(hub, "open_clip_config.json", expert=NAME).parent
        try:
            resolve_file(hub, "open_clip_model.safetensors", expert=NAME)
        except WeightsUnavailableError:
            resolve_file(hub, "open_clip_pytorch_model.bin", expert=NAME)
    if w.kind != "file" and (p / "open_clip_config.json").exists():
        # A config without a checkpoint beside it would build at random (open_clip only logs it):
        # refused here, and require_pretrained refuses it inside open_clip as well.
        ckpt = _open_clip_dir_checkpoint(p)
        if ckpt is None:
            raise WeightsUnavailableError(
                f"siglip: {p} holds open_clip_config.json but no checkpoint (open_clip_model.safetensors or "
                f"open_clip_pytorch_model.bin); it would build with random weights. Copy the whole "
                f"`huggingface-cli download {arch.hub or VARIANTS[DEFAULT].default_weights}` snapshot, or pass "
                f"--weights random for a random-weight run"
            )
        model = open_clip.create_model(f"local-dir:{p}", require_pretrained=True)
        return _vision_tower(model) + ([ckpt],)
    ckpt = p
    if w.kind == "directory":
        ckpt = _checkpoint_in(p, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"), arch)
    model = open_clip.create_model(arch.model_name, pretrained=str(ckpt), force_preprocess_cfg=force_pp, **arch.overrides)
    return _vision_tower(model) + ([ckpt],)


def _checkpoint_in(p: Path, names: tuple[str, ...], arch: _Arch) -> Path:
    """The first checkpoint file of ``names`` that directory ``p`` holds, else an error naming them."""
    found = [p / n for n in names if (p / n).exists()]
    if not found:
        raise WeightsUnavailableError(
            f"siglip: {p} holds none of {', '.join(names)}; pass the checkpoint file or a `huggingface-cli "
            f"download {arch.hub}` snapshot directory"
        )
    return found[0]


def _vision_tower(model: Any) -> tuple[Any, dict[str, Any]]:
    """-> (open_clip model's vision tower, the preprocess cfg open_clip attached to the model)."""
    import open_clip

    pp = dict(open_clip.get_model_preprocess_cfg(model))
    visual = model.visual
    del model  # drop the text tower: extraction never uses it
    return visual, pp


def _load_timm(arch: _Arch, cfg: ExpertConfig, w: Weights) -> tuple[Any, dict[str, Any], list[Path]]:
    import timm

    kwargs = dict(arch.overrides, num_classes=0)
    if w.random:
        with seeded(w.seed):
            model = timm.create_model(arch.model_name, pretrained=False, **kwargs)
        return model, dict(arch.preprocess), []
    p = w.path
    if w.kind == "directory":
        p = _checkpoint_in(p, ("model.safetensors", "pytorch_model.bin"), arch)
    elif w.kind == "hub":
        p = resolve_file(_no_hub_for_small(arch, cfg, w), "model.safetensors", expert=NAME)
    # timm loads files with safetensors or torch.load(weights_only=True) (strictly) and resamples the
    # position embedding from 518 to the configured 336 px.
    model = timm.create_model(arch.model_name, pretrained=True, pretrained_cfg_overlay={"file": str(p)}, **kwargs)
    return model, dict(arch.preprocess), [p]


# ------------------------------------------------------------------------------------ preprocessing


def preprocessing_spec(pp: dict[str, Any]) -> dict[str, Any]:
    """open_clip preprocess cfg -> the exact, JSON-able recipe this expert applies."""
    size = pp["size"]
    size = [int(size), int(size)] if isinstance(size, int) else [int(s) for s in size]
    mode = pp.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        raise ValueError(f"siglip: resize_mode {mode!r} is not supported (shortest | squash)")
    interp = pp.get("interpolation", "bicubic")
    if interp not in ("bicubic", "bilinear"):
        raise ValueError(f"siglip: interpolation {interp!r} is not supported (bicubic | bilinear)")
    return {
        "input": "RGB PIL image (grayscale/CMYK/alpha/16-bit converted by astrea.extract.experts.common)",
        "size": size,
        "resize_mode": mode,  # squash: resize to size ignoring aspect; shortest: shortest edge + center crop
        "interpolation": interp,
        "antialias": True,
        "resize_backend": "torchvision.transforms.functional.resize on PIL (PIL resampling)",
        "scale": "1/255",
        "mean": [float(m) for m in pp["mean"]],
        "std": [float(s) for s in pp["std"]],
    }


def apply_preprocessing(image: Any, pp: dict[str, Any]):
    """Apply a :func:`preprocessing_spec` recipe to a PIL image -> float32 [3, H, W].

    Same torchvision ops, on PIL, as open_clip's ``image_transform`` (and timm's eval transform with
    crop_pct 1.0), so outputs are bit-identical to the reference transforms.
    """
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    interp = InterpolationMode.BICUBIC if pp["interpolation"] == "bicubic" else InterpolationMode.BILINEAR
    h, w = pp["size"]
    if pp["resize_mode"] == "squash":
        image = TF.resize(image, [h, w], interpolation=interp, antialias=True)
    else:
        if h != w:
            raise ValueError("siglip: shortest-edge resize needs a square size")
        image = TF.resize(image, h, interpolation=interp, antialias=True)
        image = TF.center_crop(image, [h, w])
    x = TF.to_tensor(image)
    return TF.normalize(x, pp["mean"], pp["std"])


# ------------------------------------------------------------------------------------------- expert


class SiglipExpert(Expert):
    name = NAME
    prerequisites = ()

    def __init__(self, cfg: ExpertConfig, arch: _Arch, model: Any, pp: dict[str, Any], *,
                 weights_file_sha256: str = "") -> None:
        import torch

        self.cfg = cfg
        self.arch_name = cfg.resolved_arch()
        self.arch = arch
        self.model = model.eval().requires_grad_(False)
        self.compute_dtype = getattr(torch, cfg.compute_dtype)
        self.device = "cpu"
        self.pp = preprocessing_spec(pp)
        self._kind = self._tower_kind(model)
        self.patch_grid = self._patch_grid()
        weights_sha = state_dict_sha256(self.model)  # hashed in fp32, before any compute-dtype cast
        self.model.to(self.compute_dtype)
        token_dim, pooled_dim = self._dims()
        v = VARIANTS[self.arch_name]
        if (token_dim, pooled_dim, self.pp["size"][0]) != (v.token_dim, v.pooled_dim, v.image_size):
            raise WeightsUnavailableError(
                f"siglip: weights {cfg.weights!r} built a model with token_dim={token_dim}, pooled_dim={pooled_dim}, "
                f"image size {self.pp['size'][0]}, but arch {self.arch_name!r} is {v.token_dim}/{v.pooled_dim}/"
                f"{v.image_size}; pass the arch these weights belong to (--arch)"
            )
        self.spec = spec_from_config(
            cfg, expert=NAME, arch=self.arch_name, weights_sha256=weights_sha,
            weights_file_sha256=weights_file_sha256, preprocessing=self.pp, token_dim=token_dim, pooled_dim=pooled_dim,
            config={
                "backend": arch.backend,
                "model_name": arch.model_name,
                "model_overrides": arch.overrides,
                "tower": self._kind,
                "patch_grid": list(self.patch_grid),
                "tokens": "final-norm patch tokens, prefix tokens dropped, resampled (area mean / bilinear)",
                "pooled": "encode_image, unnormalised" if arch.backend == "open_clip" else "normed CLS token",
                "compute_dtype": cfg.compute_dtype,
            },
            prerequisites={},
        )

    @staticmethod
    def _tower_kind(model: Any) -> str:
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import VisionTransformer as OCViT

        if isinstance(model, TimmModel):
            return "open_clip.TimmModel"
        if isinstance(model, OCViT):
            return "open_clip.VisionTransformer"
        if hasattr(model, "forward_features") and hasattr(model, "num_prefix_tokens"):
            return "timm"
        raise TypeError(f"siglip: unsupported vision tower {type(model).__name__}")

    def _patch_grid(self) -> tuple[int, int]:
        m = self.model
        if self._kind == "open_clip.TimmModel":
            return tuple(int(g) for g in m.trunk.patch_embed.grid_size)
        if self._kind == "open_clip.VisionTransformer":
            return tuple(int(g) for g in m.grid_size)
        return tuple(int(g) for g in m.patch_embed.grid_size)

    def _dims(self) -> tuple[int, int]:
        import torch

        # One tiny dry run settles both dims for every tower kind (cheaper than special-casing each).
        h, w = self.pp["size"]
        with torch.inference_mode():
            tokens, pooled = self._features(torch.zeros(1, 3, h, w, dtype=self.compute_dtype))
        return int(tokens.shape[-1]), int(pooled.shape[-1])

    def _features(self, x):
        """-> (patch tokens [B, h*w, D], pooled [B, P]) in compute dtype."""
        m = self.model
        if self._kind == "open_clip.TimmModel":
            feats = m.trunk.forward_features(x)
            pooled = m.head(m.trunk.forward_head(feats))
            return feats[:, m.trunk.num_prefix_tokens:], pooled
        if self._kind == "open_clip.VisionTransformer":
            m.output_tokens = True
            try:
                pooled, tokens = m(x)
            finally:
                m.output_tokens = False
            return tokens, pooled
        feats = m.forward_features(x)
        return feats[:, m.num_prefix_tokens:], m.forward_head(feats, pre_logits=True)

    def preprocess(self, image: Any):
        image = ensure_rgb(image)
        return apply_preprocessing(image, self.pp)

    def forward(self, pixels: Any, prompts: list[dict] | None = None) -> list[ExpertOutput]:
        import torch

        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, *self.pp["size"]):
            raise ValueError(
                f"siglip: expected pixels [B, 3, {self.pp['size'][0]}, {self.pp['size'][1]}], got {tuple(pixels.shape)}"
            )
        with torch.inference_mode():
            x = pixels.to(self.device, self.compute_dtype)
            tokens, pooled = self._features(x)
            gh, gw = self.patch_grid
            tokens = resample_grid(tokens.float(), gh, gw, self.cfg.grid)
            tokens = tokens.cpu().numpy().astype(np.float32, copy=False)
            pooled = pooled.float().cpu().numpy().astype(np.float32, copy=False)
        return [ExpertOutput(tokens=tokens[i], pooled=pooled[i], outputs={}) for i in range(len(tokens))]

    def to(self, device: str) -> "SiglipExpert":
        self.model.to(device)
        self.device = device
        return self


def build(cfg: ExpertConfig, prerequisites: dict[str, str] | None = None) -> SiglipExpert:
    arch_name = cfg.resolved_arch()
    if arch_name not in _ARCHS:
        raise ValueError(f"siglip: unknown arch {arch_name!r}; choose one of {sorted(_ARCHS)}")
    arch = _ARCHS[arch_name]
    load = _load_open_clip if arch.backend == "open_clip" else _load_timm
    w = choose(cfg.weights, seed=cfg.seed, expert=NAME)
    try:
        model, pp, files = load(arch, cfg, w)
    except AstreaError:  # ours already says what to fix (and WeightsUnavailableError is a RuntimeError)
        raise
    except (RuntimeError, ValueError, KeyError, AssertionError) as e:
        if w.random:
            raise
        # open_clip / timm load strictly, and torch's message lists the keys over many lines: they
        # are named (the shared check's wording), not cut to the first line; other errors
        # (a pos_embed that cannot be resampled...) keep their first line. Neither says which flag
        # to fix, hence the advice.
        keys = keys_from_load_error(e)
        first = str(e).splitlines()[0] if str(e) else ""
        what = describe_keys(**keys) if keys else f"{type(e).__name__}: {first[:300]}"
        raise WeightsUnavailableError(
            f"siglip: weights {cfg.weights!r} do not load into arch {arch_name!r} ({arch.backend} "
            f"{arch.model_name}): {what}. Pass the arch these weights belong to (one of {sorted(_ARCHS)})."
        ) from e
    expert = SiglipExpert(cfg, arch, model, pp, weights_file_sha256=files_sha256(files))
    if cfg.device != "cpu":
        expert.to(cfg.device)
    return expert
