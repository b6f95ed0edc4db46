"""Astrea's trainable parts and the trainer that streams the feature store.

Public API::

    from astrea.train import TrainConfig, run
    summary = run(TrainConfig.load("train.yaml", {"steps": 50}))

See docs/train.md. Stages plug in through ``astrea.train.stages`` (``Stage``, ``STAGES``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from astrea.train.config import TrainConfig


def run(cfg: "TrainConfig") -> dict[str, Any]:
    from astrea.train.runner import run as _run

    return _run(cfg)


def __getattr__(name: str) -> Any:
    # Lazy: `import astrea.train` stays cheap (no torch/transformers) for the CLI's --help.
    if name == "TrainConfig":
        from astrea.train.config import TrainConfig

        return TrainConfig
    raise AttributeError(name)


__all__ = ["TrainConfig", "run"]
