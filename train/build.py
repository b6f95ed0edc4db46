"""The run's modules, built one way for training (runner), eval and generate (loaded_run).

From a TrainConfig and the store: the stages, the store's spec of every expert they read (checked
against the expected fingerprints), the LLM + tokenizer, the Astrea model (projectors, residual
attentions) and each stage's own modules (the main stage's MoE and MoCo, in ``model.extras``).

Two steps, because training does work between them: it joins the instruction files and checks a resumed
run's store before any model is built, and seeds the RNG before the model's random initialisation::

    plan = plan_run(cfg, expected)                       # stages + specs (store checked)
    model, llm = build_model(cfg, plan, llm_dir=..., warmup=...)

Weights are not loaded here: training starts fresh, resumes or ``init_from``; eval loads a stage's file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from astrea.train.config import TrainConfig
from astrea.train.errors import TrainError
from astrea.train.llm import TINY, LoadedLLM, build_llm
from astrea.train.model import AstreaModel
from astrea.train.stages import Stage, build_stages
from astrea.train.store_check import resolve_experts


@dataclass
class RunPlan:
    """The run's stages, each holding the store's specs, and those specs (expert name -> ExpertSpec)."""

    stages: list[Stage]
    specs: dict[str, Any]


def plan_run(cfg: TrainConfig, expected: dict[str, str]) -> RunPlan:
    """Build the stages and resolve every expert they read in the store, with ``expected`` fingerprints
    (expert name -> fingerprint; experts not named take what the store holds)."""
    stages = build_stages(cfg)
    needed_by: dict[str, str] = {}
    for s in stages:
        for e in s.required_experts():
            needed_by.setdefault(e, f"stage {s.name}")
    wanted = {e: expected[e] for e in needed_by if e in expected}
    specs = resolve_experts(cfg.store, cfg.data, list(needed_by), wanted, needed_by=needed_by)
    for s in stages:
        s.ctx.specs = dict(specs)
    return RunPlan(stages, specs)


def build_model(
    cfg: TrainConfig, plan: RunPlan, *, llm_dir: Path | None = None, warmup: Any = None
) -> tuple[AstreaModel, LoadedLLM]:
    """The LLM (reloaded from ``llm_dir`` when given, else built from ``cfg.llm``; ``warmup``: the tiny
    LLM's text-only warm-up), the Astrea model over the plan's experts with every stage's own modules;
    returns the model and the loaded LLM (its source, size and warm-up, for run.json)."""
    llm = build_llm(cfg.llm, from_dir=llm_dir, warmup=warmup)
    model = AstreaModel(llm, {n: s.token_dim for n, s in plan.specs.items()}, cfg)
    for s in plan.stages:
        s.build(model)
    return model, llm


def tiny_llm_dir(cfg: TrainConfig, llm_dir: Path, init_from: str = "") -> Path | None:
    """Where a tiny-random LLM is reloaded from: the run's own copy ``llm_dir``, else the ``init_from``
    run's (None: build a fresh one; never for a named LLM, which loads by name).

    The projectors of an ``init_from`` run were trained against its (warmed-up) tiny LLM; a fresh one,
    warmed on this run's texts, would be another LLM."""
    if cfg.llm.name != TINY:
        return None
    if llm_dir.is_dir():
        return llm_dir
    if init_from:
        p = Path(init_from)
        for cand in (p, *p.parents[:3]):
            if (cand / "config.yaml").is_file():
                return cand / "llm" if (cand / "llm").is_dir() else None
    return None


def device_for(name: str) -> torch.device:
    """The torch device of a ``device`` field: auto | cpu | cuda[:i]."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"config field device={name!r}: no CUDA device here; use --device cpu")
    return torch.device(name)
