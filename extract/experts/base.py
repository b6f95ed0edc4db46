"""What every expert is: frozen model + exact preprocessing -> tokens on a common grid, pooled, outputs.

Contract (all experts, see extract/experts/registry.py for names):

- ``preprocess(image: PIL.Image.Image) -> torch.Tensor`` runs on CPU workers (Ray tasks), per image,
  returns the model input [C, H, W] float32 exactly as the reference library would build it.
  Raises :class:`BadImageError` (with a short reason) for images it cannot take.
- ``forward(pixels: Tensor[B, C, H, W], prompts: list[dict] | None) -> list[ExpertOutput]`` runs the
  frozen model under ``torch.inference_mode`` and returns one output per image, float32 numpy:
  ``tokens`` [grid*grid, token_dim], ``pooled`` [pooled_dim], ``outputs`` JSON-serialisable.
  ``prompts[i]`` carries the stored predictions of prerequisite experts for image i
  (e.g. ``{"ram_plus": {...outputs...}}``), when the expert declares ``prerequisites``.
- ``spec`` is the :class:`~astrea.schemas.ExpertSpec` that fingerprints the whole thing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from astrea.errors import AstreaError


class BadImageError(AstreaError, ValueError):
    """An input image an expert cannot take; the message is the per-key failure reason."""


class WeightsUnavailableError(AstreaError, RuntimeError):
    """Pretrained weights could not be had (offline hub, missing file); the message says how to fix it."""


@dataclass
class ExpertOutput:
    tokens: np.ndarray  # [grid*grid, token_dim] float32
    pooled: np.ndarray  # [pooled_dim] float32
    outputs: dict[str, Any] = field(default_factory=dict)


def state_dict_sha256(module: Any) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor in a state dict, in name order.

    Used as ``ExpertSpec.weights_sha256`` for random and loaded weights alike, so the fingerprint
    follows the actual parameters rather than the name the user typed.
    """
    import torch

    h = hashlib.sha256()
    sd = module.state_dict() if hasattr(module, "state_dict") else module
    for name in sorted(sd):
        t = sd[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes())
    return h.hexdigest()


class Expert:
    """Base class; subclasses set ``name``, ``prerequisites`` and implement preprocess/forward."""

    name: ClassVar[str] = ""
    # Experts whose stored outputs this one reads as prompts (e.g. sam2 reads grounding_dino boxes).
    # They are optional: without them the expert falls back to a configured default and says so
    # in its spec config.
    prerequisites: ClassVar[tuple[str, ...]] = ()

    spec: Any  # ExpertSpec

    def preprocess(self, image: Any) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, pixels: Any, prompts: list[dict] | None = None) -> list[ExpertOutput]:  # pragma: no cover
        raise NotImplementedError

    def to(self, device: str) -> "Expert":  # pragma: no cover - interface
        raise NotImplementedError


def spec_from_config(cfg: Any, *, expert: str, arch: str, weights_sha256: str, preprocessing: dict,
                     token_dim: int, pooled_dim: int, config: dict, prerequisites: dict | None = None,
                     weights_file_sha256: str = "") -> Any:
    """The ExpertSpec of an expert built from ``cfg`` (an ExpertConfig): the storage fields (weights as
    given, grid, dtype, format, seed) come from the config, the rest from what the expert measured
    (``weights_file_sha256``: the checkpoint file's own hash, "" for random weights)."""
    from astrea.schemas import ExpertSpec

    return ExpertSpec(
        expert=expert, arch=arch, weights=cfg.weights, weights_sha256=weights_sha256,
        weights_file_sha256=weights_file_sha256,
        preprocessing=preprocessing, grid=cfg.grid, token_dim=token_dim, pooled_dim=pooled_dim,
        dtype=cfg.dtype, format=cfg.format, codec=getattr(cfg, "codec", "raw"), seed=cfg.seed, config=config,
        prerequisites=dict(prerequisites or {}),
    )
