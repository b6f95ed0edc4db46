"""`astrea.train.run(cfg)`: one training run, from config to RUN directory.

RUN layout:
    config.yaml        the resolved TrainConfig (rerun with ``--config RUN/config.yaml``)
    run.json           experts read (name -> fingerprint), LLM (source, hidden size, random_weights)
    llm/               the tiny random LLM's weights + tokenizer (tiny-random only)
    metrics.jsonl, tb/ metrics (see metrics.py)
    checkpoints/       step checkpoints + ``latest`` (see checkpoint.py)
    stages/<name>/model.safetensors   Astrea weights at the end of each stage
    summary.json       per-stage results (held-out L_reg before/after, throughput, skipped records)

Every check that can fail on bad input (config, store, fingerprints, resume compatibility) runs before
the first step.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from astrea.train.config import TrainConfig
from astrea.train.errors import TrainError
from astrea.train.build import RunPlan, build_model, device_for, plan_run, tiny_llm_dir
from astrea.train.llm import TINY, save_llm
from astrea.train.metrics import Metrics
from astrea.train.model import AstreaModel


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train; returns the summary (also written to RUN/summary.json). ``cfg.workers > 1``: Ray Train."""
    cfg.validate()
    if cfg.workers > 1 and not _in_distributed_env():
        from astrea.train.ray_launch import launch

        return launch(cfg, ray_worker)
    return _run_validated(cfg)


def ray_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker's loop (a module-level function, so Ray ships it by reference)."""
    run_local(TrainConfig.from_dict(config))


def run_local(cfg: TrainConfig) -> dict[str, Any]:
    """Train in this process (one rank of an existing process group, or alone)."""
    cfg.validate()
    return _run_validated(cfg)


def _run_validated(cfg: TrainConfig) -> dict[str, Any]:
    from astrea.train.distributed import init_distributed

    device = device_for(cfg.device)
    dist = init_distributed(device.type)
    if device.type == "cuda" and cfg.device in ("auto", "cuda"):
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    try:
        return _run(cfg, dist, device)
    finally:
        dist.close()


def _run(cfg: TrainConfig, dist, device: torch.device) -> dict[str, Any]:
    from astrea.train.checkpoint import CheckpointDir

    run_dir = Path(cfg.out)
    latest = CheckpointDir(run_dir).latest()
    if latest is not None and not cfg.resume:
        raise TrainError(f"{run_dir} already holds a run (checkpoint {latest.name}); pass --resume or a new --out")
    plan, saved = _checked_plan(cfg, run_dir if cfg.resume and latest is not None else None)
    model, llm = _model_on_device(cfg, plan, saved, device)
    resume = _read_resume(latest, dist, model, device) if cfg.resume and latest is not None else None
    _seed(cfg.seed + dist.rank)  # same initial weights on every rank; per-rank RNG for the residual draws
    _write_run_files(cfg, plan, llm, dist)
    trainer = _fit(cfg, model, plan.stages, dist, device, resume)
    return _summarise(cfg, plan, llm, trainer, dist, device)


def _checked_plan(cfg: TrainConfig, resumed: Path | None) -> tuple[RunPlan, dict[str, Any] | None]:
    """Stages and the store: every expert they read must be there, as expected (and as the ``resumed``
    run saw it: its run.json is returned), and the instruction files join the store; all before any
    model is built."""
    plan = plan_run(cfg, cfg.expected_fingerprints)
    _join_instructions(cfg, plan.stages)
    saved = _read_run_json(resumed) if resumed is not None else None
    if saved is not None:
        _check_same_store(saved, plan.specs)
    return plan, saved


def _model_on_device(
    cfg: TrainConfig, plan: RunPlan, saved: dict[str, Any] | None, device: torch.device
) -> tuple[AstreaModel, Any]:
    """The model, seeded (same initial weights on every rank), on ``device``, ``init_from`` loaded."""
    if saved is not None and cfg.llm.name == TINY and saved["llm"]["hidden_size"] != cfg.llm.hidden_size:
        _hidden_size_error(saved, f"tiny-random with llm.hidden_size={cfg.llm.hidden_size}", cfg.llm.hidden_size)
    _seed(cfg.seed)
    from_dir = tiny_llm_dir(cfg, Path(cfg.out) / "llm", cfg.init_from)
    model, llm = build_model(cfg, plan, llm_dir=from_dir, warmup=_TextWarmup(cfg, plan.stages, device))
    if from_dir is not None:  # resumed, or init_from: that run's llm/ holds the warmed weights
        llm.text_warmup = ((_read_run_json(from_dir.parent) or {}).get("llm") or {}).get("text_warmup")
    if saved is not None and saved["llm"]["hidden_size"] != llm.hidden_size:
        _hidden_size_error(saved, llm.source, llm.hidden_size)
    if device.type == "cuda" and cfg.llm.freeze and not cfg.llm.lora and cfg.compute_dtype != "float32":
        model.llm.to(torch.bfloat16)  # a frozen LLM in bf16 halves its memory; autocast runs bf16 anyway
    model.to(device)
    if cfg.compile:
        model.llm.compile()  # in place: state-dict keys stay the same
    if cfg.init_from:
        _init_from(model, cfg.init_from)
    return model, llm


def _read_resume(latest: Path, dist, model: AstreaModel, device: torch.device) -> dict[str, Any]:
    """The checkpoint to resume from, checked against this run, its model weights loaded."""
    from astrea.train.checkpoint import read_checkpoint

    resume = read_checkpoint(latest, dist.rank)
    if resume["state"]["world_size"] != dist.world_size:
        raise TrainError(
            f"--resume: checkpoint {latest} was written by {resume['state']['world_size']} processes, this "
            f"run has {dist.world_size}; data positions are per rank, resume with the same number of workers"
        )
    if resume["state"]["hidden_size"] != model.hidden_size:
        raise TrainError(f"--resume: checkpoint hidden size {resume['state']['hidden_size']} != {model.hidden_size}")
    model.load_astrea_state_dict({k: v.to(device) for k, v in resume["model"].items()})
    return resume


def _write_run_files(cfg: TrainConfig, plan: RunPlan, llm: Any, dist) -> None:
    """config.yaml, run.json and (tiny-random) llm/, by the main rank; every rank waits for them."""
    run_dir = Path(cfg.out)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.yaml")
        info = {
            "experts": {n: s.fingerprint() for n, s in plan.specs.items()},
            "experts_random_weights": {n: s.random_weights for n, s in plan.specs.items()},
            "llm": _llm_info(llm),
            "stages": list(cfg.stages),
            "world_size": dist.world_size,
        }
        (run_dir / "run.json").write_text(json.dumps(info, indent=2))
        if cfg.llm.name == TINY and not (run_dir / "llm").is_dir():
            save_llm(llm, run_dir / "llm")
    dist.barrier()


def _fit(cfg: TrainConfig, model: AstreaModel, stages, dist, device: torch.device, resume: dict[str, Any] | None):
    """Run the stages (from the checkpoint when resuming: metrics logged after it are dropped first)."""
    from astrea.train.trainer import Trainer

    run_dir = Path(cfg.out)
    if resume is not None and dist.is_main:
        from astrea.train.metrics import trim_metrics

        st = resume["state"]
        trim_metrics(run_dir / "metrics.jsonl", st["global_step"], st["stage"], stage_done=st["done"])
    metrics = Metrics(run_dir, enabled=dist.is_main, progress=cfg.progress)
    try:
        trainer = Trainer(cfg, model, stages, dist, device, run_dir, metrics)
        trainer.fit(resume)
    finally:
        metrics.close()
    return trainer


def _summarise(cfg: TrainConfig, plan: RunPlan, llm: Any, trainer, dist, device: torch.device) -> dict[str, Any]:
    """summary.json: per-stage results, throughput and what the store skipped (summed over ranks)."""
    from astrea.train.distributed import all_sum
    from astrea.train.metrics import dumps_strict

    store = trainer.store_log.to_dict()
    # ranks read disjoint units: the run skipped the sum of what each rank skipped
    store["damaged_rows_skipped"] = int(all_sum([store["damaged_rows_skipped"]], device, dist.world_size)[0])
    stages = plan.stages
    summary = {
        "run": str(Path(cfg.out)),
        "llm": _llm_info(llm),
        "experts_random_weights": {n: s.random_weights for n, s in plan.specs.items()},
        "world_size": dist.world_size,
        "global_steps": trainer.global_step,
        "target_render_drops": dict(stages[0].ctx.stats.dropped) if stages else {},
        "stages": [
            {**r.__dict__, "samples_per_s": r.samples / r.seconds if r.seconds else None,
             "tokens_per_s": r.tokens / r.seconds if r.seconds else None,
             "data_wait_fraction": r.data_wait_s / r.seconds if r.seconds else None}
            for r in trainer.results
        ],
        "store": store,
    }
    if dist.is_main:
        (Path(cfg.out) / "summary.json").write_text(dumps_strict(summary))
    return summary


def _join_instructions(cfg: TrainConfig, stages) -> None:
    """Parse and join the instruction files before any step: bad files and an empty join fail here."""
    for s in stages:
        if not getattr(s, "uses_instructions", False):
            continue
        joined = s.join_instructions()
        c = joined.counts()
        if c["matched"] == 0 and not (c["text_only"] and cfg.instructions.text_only):
            shown = ", ".join(repr(x.image) for x in joined.unmatched[:3])
            raise TrainError(
                f"instructions: none of the {c['records']} records' images is in {cfg.store}/{cfg.data} "
                f"(e.g. {shown}); check instructions.match and the dataset, and list them with "
                f"`astrea data instructions FILE --store {cfg.store} --data {cfg.data}`"
            )


def _llm_info(llm) -> dict[str, Any]:
    info = {"source": llm.source, "hidden_size": llm.hidden_size, "random_weights": llm.random_weights}
    if llm.text_warmup:
        info["text_warmup"] = llm.text_warmup
    if llm.tokenizer_info:
        info["tokenizer"] = llm.tokenizer_info
    return info


class _TextWarmup:
    """The text-only warm-up for build_llm: the run's own prompts and targets, training split only.

    ``texts()`` gives the raw texts a fitted tokenizer is trained on; calling it with (model, tokenizer)
    fits the targets with that tokenizer, as the stages will, and trains the model on them."""

    def __init__(self, cfg: TrainConfig, stages, device: torch.device):
        self.cfg, self.stages, self.device = cfg, stages, device
        self._rendered: list[Any] | None = None

    def rendered(self) -> list[Any]:
        if self._rendered is None:
            from astrea.train.data import StoreReadLog, is_heldout, store_opener
            from astrea.train.text_warmup import collect_rendered

            cfg, stages = self.cfg, self.stages
            stats = stages[0].ctx.stats if stages else None
            before = dict(stats.dropped) if stats else {}
            experts = list(dict.fromkeys(e for s in stages for e in s.required_experts()))
            opener = store_opener(cfg.store, cfg.data, experts, seed=cfg.seed, rank=0, world_size=1,
                                  log=StoreReadLog(skip_damaged=cfg.dataset.skip_damaged))
            records = (r for r in opener(0, False) if not is_heldout(r["key"], cfg.dataset.heldout_fraction))
            renders = [r for s in stages for r in s.text_renders()]
            limit = cfg.llm.text_warmup_texts
            rendered = collect_rendered(records, renders, limit)
            for s in stages:  # instruction conversations (main stage): their prompts and answers too
                if getattr(s, "uses_instructions", False):
                    convs = (r for r in s.wrap_opener(opener, rank=0, world_size=1)(0, False)
                             if "instruction" in r and not is_heldout(r["key"], cfg.dataset.heldout_fraction))
                    more = collect_rendered(convs, [s.render], limit)
                    both = {(r.prompt, r.target): r for r in rendered + more}
                    rendered = list(both.values())[: max(limit, len(rendered))]
            self._rendered = rendered
            if stats:  # the stages count targets they drop while training; reading texts here is not training
                stats.dropped.clear()
                stats.dropped.update(before)
            if not self._rendered:
                raise TrainError("llm.text_warmup_steps > 0 but the training split renders no target text; "
                                 "set --set llm.text_warmup_steps=0")
        return self._rendered

    def texts(self) -> list[str]:
        return [t for r in self.rendered() for t in (r.prompt, r.target)]

    def __call__(self, model, tokenizer) -> dict[str, Any]:
        from astrea.train.data import Collator
        from astrea.train.text_warmup import warm_up

        cfg = self.cfg
        # the texts as the stages will see them: fitted to dataset.max_text_tokens by whole items, never cut
        fit = Collator(lambda rec: None, tokenizer, [], cfg.dataset.max_text_tokens, fit_targets=cfg.dataset.fit_targets)
        texts = list(dict.fromkeys((f.prompt, f.target) for f in (fit.encode(r)[2] for r in self.rendered())))
        model.to(self.device)
        c = cfg.llm
        # a few passes over the texts, at most text_warmup_steps: small datasets (tests) stay cheap
        steps = max(1, min(c.text_warmup_steps, math.ceil(c.text_warmup_epochs * len(texts) / c.text_warmup_batch)))
        print(f"[astrea train] text-only warm-up of the tiny LLM: {steps} steps on {len(texts)} training-split "
              "target texts (no images)", flush=True)
        return warm_up(model, tokenizer, texts, steps=steps, batch_size=c.text_warmup_batch,
                       lr=c.text_warmup_lr, max_len=cfg.dataset.max_text_tokens, seed=cfg.seed)


def _hidden_size_error(saved: dict[str, Any], what: str, hidden: int) -> None:
    raise TrainError(
        f"--resume: the run was trained with an LLM of hidden size {saved['llm']['hidden_size']} "
        f"({saved['llm']['source']}), this config loads {what} with hidden size {hidden}; the projectors "
        "cannot be reused. Resume with the same --llm, or start a new --out"
    )


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _in_distributed_env() -> bool:
    import os

    import torch.distributed as tdist

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or (tdist.is_available() and tdist.is_initialized())


def _read_run_json(run_dir: Path) -> dict[str, Any] | None:
    p = run_dir / "run.json"
    return json.loads(p.read_text()) if p.exists() else None


def _check_same_store(saved: dict[str, Any], specs: dict[str, Any]) -> None:
    changed = {
        n: (saved["experts"][n], s.fingerprint())
        for n, s in specs.items()
        if n in saved.get("experts", {}) and saved["experts"][n] != s.fingerprint()
    }
    if changed:
        detail = ", ".join(f"{n}: {a} -> {b}" for n, (a, b) in changed.items())
        raise TrainError(
            f"--resume: the store's experts changed since this run started ({detail}); features from a "
            "different expert would silently corrupt the run. Resume against the original store or start a new --out"
        )


def _init_from(model: AstreaModel, path: str) -> None:
    from safetensors.torch import load_file

    from astrea.train.checkpoint import CheckpointDir

    p = Path(path)
    if (p / "checkpoints").is_dir():  # a RUN directory: its newest checkpoint
        latest = CheckpointDir(p).latest()
        if latest is None:
            raise TrainError(f"init_from={path}: the run has no finished checkpoint")
        p = latest
    f = p / "model.safetensors" if p.is_dir() else p
    if not f.is_file():
        raise TrainError(f"init_from={path}: no model.safetensors there")
    sd = {k: v for k, v in load_file(str(f)).items() if not k.startswith("stage.")}
    try:
        model.load_astrea_state_dict(sd, strict=False)
    except ValueError as e:
        raise TrainError(f"init_from={path}: {e}") from None
