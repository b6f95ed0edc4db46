"""A trained run rebuilt from its directory: config, model with its trained weights, stages, run.json.

Used by eval, generate and :func:`astrea.api.load_run`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from astrea.train.errors import TrainError


@dataclass
class LoadedRun:
    """A run rebuilt for evaluation: config, model with its trained weights, stages, run.json."""

    cfg: Any
    model: Any
    stages: list[Any]
    info: dict[str, Any]
    weights: str
    device: torch.device


def load_run(
    run: str | Path, *, device: str = "auto", store: str = "", weights: str = "", residual_at_eval: str = ""
) -> LoadedRun:
    from safetensors.torch import load_file

    from astrea.train.build import build_model, device_for, plan_run, tiny_llm_dir
    from astrea.train.config import TrainConfig, read_config_file

    run_dir = Path(run)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise TrainError(f"{run_dir} is not a training run (no config.yaml); give the --out directory of `astrea train`")
    cfg = TrainConfig.load(cfg_path)
    if "target_format" not in (read_config_file(cfg_path).get("dataset") or {}):
        # a run from before issue 13 trained on the decimal text, cut at the limit: score it on that
        cfg.dataset.target_format, cfg.dataset.fit_targets = "decimal", False
    if "at_eval" not in (read_config_file(cfg_path).get("residual") or {}):
        # a run from before issue 13.4 was scored with w = p: score it the same way (--residual-at-eval to change)
        cfg.residual.at_eval = "expectation"
    if store:
        cfg.store = store
    if residual_at_eval:
        cfg.residual.at_eval = residual_at_eval
    info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    # the features the run trained on, exactly: same fingerprints as recorded in run.json
    plan = plan_run(cfg, {**info.get("experts", {}), **cfg.expected_fingerprints})
    model, _ = build_model(cfg, plan, llm_dir=tiny_llm_dir(cfg, run_dir / "llm"))
    wpath = _weights_file(run_dir, cfg.stages, weights)
    sd = {k: v for k, v in load_file(str(wpath)).items() if not k.startswith("stage.")}
    try:
        model.load_astrea_state_dict(sd, strict=True)
    except (KeyError, ValueError) as e:
        raise TrainError(f"{wpath} does not fit the model the run's config.yaml builds: {e.args[0] if e.args else e}") from None
    dev = device_for(device)
    model.to(dev)
    model.eval()
    return LoadedRun(cfg, model, plan.stages, info, str(wpath), dev)


def _weights_file(run_dir: Path, stages: list[str], weights: str) -> Path:
    if weights:
        p = Path(weights)
        p = p / "model.safetensors" if p.is_dir() else p
        if not p.is_file():
            raise TrainError(f"--weights {weights}: no such weights file (or directory with model.safetensors)")
        return p
    for name in reversed(stages):  # the last finished stage holds every part trained so far
        p = run_dir / "stages" / name / "model.safetensors"
        if p.is_file():
            return p
    from astrea.train.checkpoint import CheckpointDir

    latest = CheckpointDir(run_dir).latest()
    if latest is not None and (latest / "model.safetensors").is_file():
        return latest / "model.safetensors"
    raise TrainError(f"{run_dir} has no trained weights yet (no stages/*/model.safetensors, no checkpoint)")
