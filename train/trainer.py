"""The stage loop: freeze, optimise, log, evaluate held-out L_reg, checkpoint; one stage after another.

Stage-agnostic: everything stage-specific goes through the :class:`~astrea.train.stages.Stage`
interface. Optimisation follows paper 4.1: AdamW(betas 0.9/0.98, weight decay 0.05), peak lr 1e-4,
linear warm-up over 15% of the stage's steps then cosine to zero; a fresh optimizer per stage (the
parameters it trains are new each stage).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from astrea.schemas.stages import TASKS
from astrea.train.checkpoint import CheckpointDir, load_optimizer, save_tensors, set_rng_state, write_checkpoint
from astrea.train.config import TrainConfig
from astrea.train.data import (
    Collator,
    Position,
    Prefetcher,
    StoreReadLog,
    batches,
    heldout_batches,
    scan_targets,
    store_opener,
    target_loss_message,
    with_permuted_features,
)
from astrea.train.distributed import DistInfo, all_gather_floats, all_gather_ints, all_sum, average_gradients
from astrea.train.errors import TrainError
from astrea.train.metrics import Metrics
from astrea.train.model import AstreaModel
from astrea.train.stages import Stage

log = logging.getLogger(__name__)


def lr_lambda(total: int, warmup: float, schedule: str):
    warm = int(math.ceil(warmup * total))

    def f(step: int) -> float:  # step = optimizer steps taken so far (LambdaLR's last_epoch)
        if step < warm:
            return (step + 1) / warm
        if schedule == "constant":
            return 1.0
        progress = (step - warm) / max(total - warm, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return f


@dataclass
class StageResult:
    name: str
    steps: int
    heldout_before: float | None = None
    heldout_after: float | None = None
    # the control: the same held-out texts with every image's features replaced by another image's
    heldout_permuted_after: float | None = None
    last_loss: float | None = None
    seconds: float = 0.0
    samples: int = 0
    tokens: int = 0
    data_wait_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        model: AstreaModel,
        stages: list[Stage],
        dist: DistInfo,
        device: torch.device,
        run_dir: Path,
        metrics: Metrics,
    ):
        self.cfg, self.model, self.stages, self.dist, self.device = cfg, model, stages, dist, device
        self.run_dir, self.metrics = run_dir, metrics
        self.ckpt = CheckpointDir(run_dir)
        self.global_step = 0
        self.results: list[StageResult] = []
        self.collators: dict[str, Collator] = {}
        self.store_log = StoreReadLog(skip_damaged=cfg.dataset.skip_damaged)

    # -- helpers ----------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        p = self.cfg.compute_dtype
        if p == "float32" or (p == "auto" and self.device.type != "cuda"):
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = dict(batch)
        for k in ("input_ids", "attention_mask", "labels"):
            out[k] = batch[k].to(self.device, non_blocking=True)
        for k in ("tokens", "pooled"):
            out[k] = {e: t.to(self.device, non_blocking=True).float() for e, t in batch[k].items()}
        return out

    def set_trainable(self, stage: Stage) -> list[torch.nn.Parameter]:
        self.model.requires_grad_(False)
        for m in stage.trainable_modules(self.model):
            m.requires_grad_(True)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise TrainError(f"stage {stage.name!r} has nothing to train")
        self.model.train()
        if not (self.model.llm_full_trainable or self.model.llm_lora):
            self.model.llm.eval()  # a frozen LLM never runs dropout
        return params

    def _stream_parts(self, stage: Stage) -> tuple[Any, Collator]:
        experts = stage.required_experts()
        if stage.name not in self.collators:
            self.collators[stage.name] = Collator(
                stage.render, self.model.tokenizer, experts, self.cfg.dataset.max_text_tokens,
                fit_targets=self.cfg.dataset.fit_targets,
            )
        opener = store_opener(
            self.cfg.store, self.cfg.data, experts, seed=self.cfg.seed, rank=self.dist.rank,
            world_size=self.dist.world_size, log=self.store_log,
        )
        return stage.wrap_opener(opener, rank=self.dist.rank, world_size=self.dist.world_size), self.collators[stage.name]

    def check_targets(self, stage: Stage, opener: Any, collator: Collator) -> dict[str, Any]:
        """Scan the stage's first training targets (``dataset.target_check``, summed over ranks); warn
        with counts per task when ``max_text_tokens`` would cut them or drop items, and log the counts."""
        local = scan_targets(opener, collator, heldout_fraction=self.cfg.dataset.heldout_fraction,
                             max_samples=self.cfg.dataset.target_check)
        keys = ["records", "targets", "truncated_targets", "fitted_targets"]
        flat = [float(local[k]) for k in keys]
        tasks = (*TASKS, "instruction")
        for group in ("dropped_items", "cut_tasks", "task_targets"):
            flat += [float(local[group].get(t, 0)) for t in tasks]
        tot = [int(v) for v in all_sum(flat, self.device, self.dist.world_size)]
        counts: dict[str, Any] = dict(zip(keys, tot[: len(keys)], strict=True))
        for i, group in enumerate(("dropped_items", "cut_tasks", "task_targets")):
            vals = tot[len(keys) + i * len(tasks) : len(keys) + (i + 1) * len(tasks)]
            counts[group] = {t: v for t, v in zip(tasks, vals, strict=True) if v}
        msg = target_loss_message(stage.name, counts, self.cfg.dataset.max_text_tokens)
        if msg and self.dist.is_main:
            log.warning(msg)
        self.metrics.log({
            "kind": "targets", "stage": stage.name, "step": 0, "global_step": self.global_step,
            "checked": counts["targets"], "truncated_targets": counts["truncated_targets"],
            "fitted_targets": counts["fitted_targets"],
            **{f"cut_{t}": v for t, v in counts["cut_tasks"].items()},
            **{f"dropped_{t}": v for t, v in counts["dropped_items"].items()},
        })
        return counts

    # -- held-out ---------------------------------------------------------------------------------
    @torch.no_grad()
    def heldout_loss(self, stage: Stage, hb: list[dict[str, Any]]) -> tuple[float | None, int]:
        was_training = self.model.training
        self.model.eval()  # residual weights at their expectation, no dropout
        loss_sum, tokens, samples = 0.0, 0.0, 0.0
        for b in hb:
            b = self.to_device(b)
            with self.autocast():
                visual = stage.visual_tokens(self.model, b)
                loss, n = self.model.lm_loss(visual, b["input_ids"], b["attention_mask"], b["labels"])
            loss_sum += float(loss) * int(n)
            tokens += int(n)
            samples += len(b["keys"])
        loss_sum, tokens, samples = all_sum([loss_sum, tokens, samples], self.device, self.dist.world_size)
        if was_training:
            self.model.train()
            if not (self.model.llm_full_trainable or self.model.llm_lora):
                self.model.llm.eval()
        return (loss_sum / tokens if tokens else None), int(samples)

    def log_heldout(self, stage: Stage, step: int, hb: list[dict[str, Any]], *, kind: str = "heldout") -> float | None:
        loss, n = self.heldout_loss(stage, hb)
        if loss is not None:
            self.metrics.log(
                {"kind": kind, "stage": stage.name, "step": step, "global_step": self.global_step,
                 "loss_reg": loss, "samples": n}
            )
        return loss

    @torch.no_grad()
    def check_ranks_in_sync(self, stage: Stage, params: list[torch.nn.Parameter]) -> list[float]:
        """Sum of the trained parameters on every rank; ranks that drifted apart are an error."""
        local = float(sum(p.detach().double().sum() for p in params))
        sums = [v[0] for v in all_gather_floats([local], self.device, self.dist.world_size)]
        if max(sums) - min(sums) > 1e-6 * max(1.0, max(abs(v) for v in sums)):
            raise TrainError(f"stage {stage.name}: ranks hold different weights {sums}; gradients were not averaged")
        return sums

    # -- checkpoints ------------------------------------------------------------------------------
    def save(
        self, index: int, stage: Stage, step: int, pos: Position, opt, sched, result: StageResult, *, done: bool
    ) -> None:
        positions = all_gather_ints([pos.epoch, pos.consumed, pos.in_pool], self.device, self.dist.world_size)
        name = f"step-{self.global_step:08d}"
        tmp = self.ckpt.root / f"{name}.tmp"
        if self.dist.is_main:
            self.ckpt.begin(name)
        self.dist.barrier()
        state = {
            "stage_index": index, "stage": stage.name, "step": step, "global_step": self.global_step,
            "done": done, "positions": positions, "world_size": self.dist.world_size,
            "scheduler": sched.state_dict(), "hidden_size": self.model.hidden_size,
            # finished stages + this one (partial unless done): a resumed summary stays complete
            "results": [r.__dict__ for r in self.results] + [result.__dict__],
        }
        write_checkpoint(
            tmp, rank=self.dist.rank,
            model_sd=self.model.astrea_state_dict() if self.dist.is_main else None,
            stage_sd=stage.state_dict(), optimizer=opt, state=state,
        )
        self.dist.barrier()
        if self.dist.is_main:
            self.ckpt.finish(tmp, name, keep=self.cfg.keep_checkpoints)
        self.dist.barrier()

    def _nonfinite_loss(self, stage: Stage, step: int, local: list[str]) -> None:
        if local:
            value, keys = local[0], local[1:]
            shown = ", ".join(repr(k) for k in keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
            what = f"the loss is {value} on the batch with keys {shown}"
        else:
            what = f"the loss is not finite on rank(s) other than {self.dist.rank} (their log names the keys)"
        raise TrainError(
            f"stage {stage.name}, step {step} (global step {self.global_step}): {what}; the run stopped without "
            "saving this step. Check those rows (astrea shards verify), lower optim.lr, or train with "
            "compute_dtype=float32; resume from the last checkpoint with --resume"
        )

    def save_stage(self, stage: Stage, result: StageResult) -> None:
        if not self.dist.is_main:
            return
        d = self.run_dir / "stages" / stage.name
        d.mkdir(parents=True, exist_ok=True)
        save_tensors(self.model.astrea_state_dict(), d / "model.safetensors")

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self, resume: dict[str, Any] | None) -> list[StageResult]:
        start_index = 0
        if resume is not None:
            st = resume["state"]
            self.global_step = st["global_step"]
            self.results = [StageResult(**r) for r in st.get("results", [])]
            start_index = st["stage_index"] + (1 if st["done"] else 0)
            if st["done"] and resume["rng"] is not None:
                set_rng_state(*resume["rng"])
        partial = None
        if resume is not None and not resume["state"]["done"]:
            partial = self.results.pop()  # the interrupted stage's record continues
        for i in range(start_index, len(self.stages)):
            mid = resume if (partial is not None and i == start_index) else None
            self.results.append(self.run_stage(i, mid, partial if mid else None))
        return self.results

    def run_stage(self, index: int, resume: dict[str, Any] | None, partial: StageResult | None = None) -> StageResult:
        """One stage: set up (or restore) its optimiser and data, step to ``cfg.steps_for(stage)``, then
        score it held-out, save its weights and a stage-end checkpoint."""
        run = self._start_stage(index, resume, partial)
        cfg = self.cfg
        stream = Prefetcher(
            batches(run.opener, run.collator, cfg.batch_size, heldout_fraction=cfg.dataset.heldout_fraction,
                    shuffle=cfg.dataset.shuffle, start=run.pos, bucket=run.stage.bucket(),
                    length=run.stage.sample_length, seed=cfg.seed),
            cfg.dataset.prefetch,
        )
        self.metrics.start_bar(run.stage.name, run.total, run.step)
        run.window = _LogWindow()
        t_stage, seconds_before = time.perf_counter(), run.result.seconds
        try:
            while run.step < run.total:
                self._optimizer_step(run, stream)
                self._log_train(run)
                if cfg.eval_every and run.step % cfg.eval_every == 0 and run.step < run.total:
                    self.log_heldout(run.stage, run.step, run.hb)
                if cfg.save_every and run.step % cfg.save_every == 0 and run.step < run.total:
                    run.result.seconds = seconds_before + time.perf_counter() - t_stage
                    self.save(index, run.stage, run.step, run.pos, run.opt, run.sched, run.result, done=False)
        finally:
            stream.close()
            self.metrics.close_bar()
        run.result.seconds = seconds_before + time.perf_counter() - t_stage
        return self._finish_stage(index, run)

    def _start_stage(self, index: int, resume: dict[str, Any] | None, partial: StageResult | None) -> _StageRun:
        """Trainable parameters, optimiser, scheduler, data, target check and held-out batches; restored
        from ``resume`` (a checkpoint inside this stage), else the held-out L_reg before the first step."""
        stage = self.stages[index]
        cfg, o = self.cfg, self.cfg.optim
        total = cfg.steps_for(stage.name)
        params = self.set_trainable(stage)
        opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, o.warmup, o.schedule))
        opener, collator = self._stream_parts(stage)
        joined = getattr(stage, "joined", None)
        if joined is not None and self.dist.is_main:
            print(f"[astrea train] stage {stage.name}: {joined.summary()}", flush=True)
        target_check = self.check_targets(stage, opener, collator)
        per_rank = max(cfg.dataset.heldout_max // self.dist.world_size, 1)
        hb = heldout_batches(
            opener, collator, cfg.batch_size, heldout_fraction=cfg.dataset.heldout_fraction, max_samples=per_rank
        )
        run = _StageRun(stage, total, params, opt, sched, opener, collator, hb, target_check, joined,
                        StageResult(stage.name, total))
        if resume is not None:
            st = resume["state"]
            run.step = st["step"]
            run.pos = Position(*st["positions"][self.dist.rank])
            load_optimizer(opt, resume["optim"], st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            stage.load_state_dict(resume["stage"])
            if partial is not None:
                run.result = partial
            if resume["rng"] is not None:
                set_rng_state(*resume["rng"])
        else:
            run.result.heldout_before = self.log_heldout(stage, 0, hb)
        return run

    def _optimizer_step(self, run: _StageRun, stream: Prefetcher) -> None:
        """``optim.grad_accum`` micro-batches, gradients averaged over ranks, one optimiser step; the
        losses (averaged over ranks) go to ``run.losses``; a non-finite loss stops every rank."""
        stage, o, result, w = run.stage, self.cfg.optim, run.result, run.window
        loss_reg_acc, extras_acc = 0.0, {}
        nonfinite: list[str] = []  # this rank's batch keys whose loss was inf/NaN
        for _ in range(o.grad_accum):
            t0 = time.perf_counter()
            batch, run.pos = next(stream)
            wait = time.perf_counter() - t0
            w.wait += wait
            result.data_wait_s += wait
            b = self.to_device(batch)
            with self.autocast():
                visual = stage.visual_tokens(self.model, b)
                loss_reg, _ = self.model.lm_loss(visual, b["input_ids"], b["attention_mask"], b["labels"])
                extras = stage.extra_losses(self.model, b, visual)
            loss = loss_reg + sum(extras.values()) if extras else loss_reg
            if not bool(torch.isfinite(loss.detach()).all()):
                nonfinite = nonfinite or [f"{float(loss.detach())}", *batch["keys"]]
            (loss / o.grad_accum).backward()
            loss_reg_acc += float(loss_reg.detach()) / o.grad_accum
            for k, v in extras.items():
                extras_acc[k] = extras_acc.get(k, 0.0) + float(v.detach()) / o.grad_accum
            n_tok = visual.shape[1] * len(b["keys"]) + int(b["attention_mask"].sum())
            w.samples += len(b["keys"])
            w.tokens += n_tok
            result.samples += len(b["keys"])
            result.tokens += n_tok
        average_gradients(run.params, self.dist.world_size)
        if o.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(run.params, o.clip_grad)
        run.lr = run.opt.param_groups[0]["lr"]
        run.opt.step()
        run.sched.step()
        run.opt.zero_grad(set_to_none=True)
        stage.after_step(self.model)
        run.step += 1
        self.global_step += 1
        vals = all_sum([loss_reg_acc, *extras_acc.values()], self.device, self.dist.world_size)
        vals = [v / self.dist.world_size for v in vals]
        if not all(math.isfinite(v) for v in vals):  # every rank sees the sum: all stop together
            self._nonfinite_loss(stage, run.step, nonfinite)
        result.last_loss = vals[0] + sum(vals[1:])
        run.losses = {"loss_reg": vals[0], **{f"loss_{k}": v for k, v in zip(extras_acc, vals[1:], strict=True)}}

    def _log_train(self, run: _StageRun) -> None:
        """Every ``log_every`` steps (and the last): a ``train`` metrics row and the progress bar."""
        cfg, step, w = self.cfg, run.step, run.window
        if not (step % cfg.log_every == 0 or step == run.total):
            return
        dt = time.perf_counter() - w.t0
        row = {
            "kind": "train", "stage": run.stage.name, "step": step, "global_step": self.global_step,
            "loss": run.result.last_loss, **run.losses,
            "lr": run.lr,
            "samples_per_s": w.samples * self.dist.world_size / dt,
            "tokens_per_s": w.tokens * self.dist.world_size / dt,
            "data_wait": w.wait / dt,
        }
        self.metrics.log(row)
        self.metrics.bar(
            cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every,
            loss=row["loss"], lr=run.lr, sps=row["samples_per_s"], wait=row["data_wait"],
        )
        run.window = _LogWindow()

    def _finish_stage(self, index: int, run: _StageRun) -> StageResult:
        """Held-out L_reg after the stage (true and permuted images), what the stage's data did, the
        ranks' parameter checksums; the stage's weights and its stage-end checkpoint."""
        stage, result, collator = run.stage, run.result, run.collator
        result.heldout_after = self.log_heldout(stage, run.total, run.hb)
        result.heldout_permuted_after = self.log_heldout(
            stage, run.total, with_permuted_features(run.hb, seed=self.cfg.seed), kind="heldout_permuted"
        )
        result.extra = {
            "skipped_records": collator.skipped,
            "truncated_targets": collator.truncated,
            # what max_text_tokens did to this rank's targets (training + held-out), per task
            "targets": collator.counts(),
            "target_check": run.target_check,
            "rank_param_checksums": self.check_ranks_in_sync(stage, run.params),
        }
        if run.joined is not None:
            result.extra["instructions"] = run.joined.counts()
        self.save_stage(stage, result)
        self.save(index, stage, run.total, run.pos, run.opt, run.sched, result, done=True)
        return result


@dataclass
class _LogWindow:
    """What happened since the last ``train`` metrics row (throughput, data wait)."""

    t0: float = field(default_factory=time.perf_counter)
    wait: float = 0.0
    samples: int = 0
    tokens: int = 0


@dataclass
class _StageRun:
    """One stage's training state inside :meth:`Trainer.run_stage`."""

    stage: Stage
    total: int
    params: list[torch.nn.Parameter]
    opt: Any
    sched: Any
    opener: Any
    collator: Collator
    hb: list[dict[str, Any]]
    target_check: dict[str, Any]
    joined: Any
    result: StageResult
    step: int = 0
    pos: Position = field(default_factory=Position)
    lr: float = 0.0
    losses: dict[str, float] = field(default_factory=dict)
    window: _LogWindow = field(default_factory=_LogWindow)
