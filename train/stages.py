"""Training stages: what the trainer runs, one after another, on one `AstreaModel`.

The trainer (``astrea.train.trainer``) knows nothing about any particular stage. For each stage in
``cfg.stages`` it asks the stage registry for a class, builds it with a :class:`StageContext`, and:

1. before any step, for every stage of the run, in order: ``stage.build(model)`` (add modules to
   ``model.extras``; runs before checkpoints load, so their weights have a home), and
   ``stage.required_experts()`` is checked against the store (one clear error if one is missing);
2. when the stage starts: freezes the whole model, then unfreezes ``stage.trainable_modules(model)``
   (only those parameters go to the optimizer; everything else, earlier stages included, stays put);
3. streams samples with the experts of ``stage.required_experts()``; ``stage.render(sample)`` gives the
   prompt and target text (None: sample skipped and counted);
4. per micro-batch: ``visual = stage.visual_tokens(model, batch)`` [B, P, H];
   ``L_reg`` (Eq. 1) from ``model.lm_loss``; ``extras = stage.extra_losses(model, batch, visual)``, a dict
   of already-weighted scalar terms (e.g. ``{"moco": mu * L_moco}``) added to the loss and logged by name;
5. after each optimizer step: ``stage.after_step(model)`` (e.g. the MoCo momentum update);
6. checkpoints hold ``model.astrea_state_dict()`` (which includes ``model.extras``) and, per stage,
   ``stage.state_dict()`` for non-module state (tensors only; e.g. queue pointers).

The batch (``astrea.train.data.Collator``) is a dict:
    keys: list[str]; tokens: {expert: float Tensor [B, P, D_e]}; pooled: {expert: Tensor [B, D]};
    input_ids, attention_mask, labels: Tensor [B, N] (labels -100 on prompt and padding);
    prompts, targets, tasks, captions: list[str | None]

The main stage is a :class:`Stage` too, registered as ``"main"`` in
``astrea.train.main_stage`` (``STAGES.register("main", ...)`` at import; ``stage_class("main")`` imports
that module on first use). Its ``build`` adds the router/adapters/MoCo to ``model.extras`` and
initialises adapters from ``model.projectors``; ``visual_tokens`` mixes all experts' aligned tokens;
``render`` may pick a task per sample; ``extra_losses`` returns the MoCo term. Its options are the typed
sections ``cfg.moe``, ``cfg.moco`` and ``cfg.main`` of the train config.

Eval (``astrea.train.eval``) reads a stage through the methods of the "what evaluation reads" section
(``routing``, ``routing_probs``, ``residual_entropy``, ``retrieval_embeddings``, ...), never its class.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from astrea.registry import Registry
from astrea.schemas.stages import ALL, MAIN, PRE_ALIGNMENT_STAGES, TASKS, expand, stage, target_expert
from astrea.train.config import TrainConfig
from astrea.train.errors import TrainError
from astrea.train.model import AstreaModel
from astrea.train.targets import TargetOptions, TargetStats
from astrea.train.templates import Rendered, render


@dataclass(frozen=True)
class Routing:
    """What a routing stage tells eval: the experts its router mixes (in router order) and its top-k."""

    experts: list[str]
    top_k: int


@dataclass
class StageContext:
    """What a stage may know about the run when it is built."""

    cfg: TrainConfig
    name: str
    index: int  # position of this stage in cfg.stages
    order: list[str]  # cfg.stages
    # store expert name -> its ExpertSpec (token_dim, grid, fingerprint) for every expert the run reads
    specs: dict[str, Any] = field(default_factory=dict)
    stats: TargetStats = field(default_factory=TargetStats)

    def target_options(self) -> TargetOptions:
        d = self.cfg.dataset
        return TargetOptions(
            max_objects=d.max_objects, decimals=d.box_decimals, polygon_points=d.polygon_points,
            format=d.target_format, mask_grid=d.mask_grid,
        )


class Stage:
    """Base class of a training stage. Subclasses override what differs; see the module docstring."""

    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.name = ctx.name

    # -- what it reads ------------------------------------------------------------------------------
    def required_experts(self) -> list[str]:
        """Store experts this stage streams (features, residual context and target sources)."""
        raise NotImplementedError

    def tasks(self) -> list[str]:
        """Target tasks, in order (subset of templates.TASKS)."""
        raise NotImplementedError

    # -- model --------------------------------------------------------------------------------------
    def build(self, model: AstreaModel) -> None:
        """Add this stage's own modules to ``model.extras`` (nothing for pre-alignment stages)."""

    def trainable_modules(self, model: AstreaModel) -> list[nn.Module]:
        raise NotImplementedError

    def visual_tokens(self, model: AstreaModel, batch: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def extra_losses(self, model: AstreaModel, batch: dict[str, Any], visual: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def after_step(self, model: AstreaModel) -> None:
        """Called after every optimizer step (no grad)."""

    # -- text ---------------------------------------------------------------------------------------
    def render(self, sample: dict[str, Any]) -> Rendered | None:
        return render(sample, self.tasks(), self.ctx.cfg.target_sources, self.ctx.target_options(), self.ctx.stats)

    def wrap_opener(self, opener: Any, *, rank: int, world_size: int) -> Any:
        """The records this stage trains on, from the store's joined records (the main stage adds its
        instruction data here); identity by default."""
        return opener

    def bucket(self) -> int:
        """Pools of ``bucket() x batch_size`` records form length-bucketed batches (0: stream order)."""
        return 0

    def sample_length(self, sample: dict[str, Any]) -> int:
        return 0

    def text_renders(self) -> list[Any]:
        """Render functions whose texts this stage trains on (the LLM's text-only warm-up reads them)."""
        return [self.render]

    def render_task(self, task: str) -> Callable[[dict[str, Any]], Rendered | None]:
        """A render function that always asks ``task`` alone (held-out evaluation per task type)."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; tasks are {list(TASKS)}")
        return lambda sample: render(sample, [task], self.ctx.cfg.target_sources, self.ctx.target_options(),
                                     self.ctx.stats)

    # -- what evaluation reads (astrea.train.eval uses only these and the methods above) -------------
    def routing(self) -> Routing | None:
        """The experts a router mixes and its k (None: the stage does not route; eval then scores the
        stage's own target; a routing stage is scored per task type, with routing and retrieval)."""
        return None

    def routing_probs(self) -> torch.Tensor | None:
        """Routing probabilities [B, P, n_experts] of the latest ``visual_tokens`` call (routing stages)."""
        return None

    @property
    def context_experts(self) -> list[str]:
        """Experts whose aligned tokens are the residual context of the experts this stage trains."""
        return []

    def residual_entropy(self, model: AstreaModel, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Per trained expert, the per-sample mean entropy of its residual attention rows [B] ({}: none)."""
        return {}

    def has_retrieval(self, model: AstreaModel) -> bool:
        """Whether the stage trained image/text embeddings that image-text retrieval can rank."""
        return False

    def retrieval_embeddings(
        self, model: AstreaModel, batch: dict[str, Any], visual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]] | None:
        """(image, text) embeddings of the batch's captioned samples and their captions (None: no
        captioned sample, or no embeddings); ``visual`` is this batch's ``visual_tokens``."""
        return None

    # -- non-module state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise KeyError(f"stage {self.name} has no state, checkpoint holds {sorted(state)}")


def llm_trainable_modules(model: AstreaModel) -> list[nn.Module]:
    """The LLM parts every stage trains when the config asks (LoRA adapters or the full LLM)."""
    if model.llm_full_trainable:
        return [model.llm]
    if model.llm_lora:
        return [m for n, m in model.llm.named_modules() if n.split(".")[-1].startswith("lora_")]
    return []


class AlignStage(Stage):
    """One pre-alignment stage (paper 3.1): train the projector + residual attention of its expert(s).

    Each stage of the stage table (astrea.schemas.stages) trains the expert ``cfg.stage_experts[name]``;
    ``all`` (Tab. 6 "Cap->All") trains every pre-alignment expert no earlier stage trained, at once,
    their aligned tokens concatenated. Targets are cumulative over the run's stage order. The residual
    context C_i of a trained expert is the frozen projector output of every expert trained earlier.
    """

    def __init__(self, ctx: StageContext):
        super().__init__(ctx)
        before = ctx.order[: ctx.index]
        self._earlier_experts = _experts_of(before, ctx.cfg)
        if ctx.name == ALL:
            self._experts = [e for e in _experts_of(list(PRE_ALIGNMENT_STAGES), ctx.cfg) if e not in self._earlier_experts]
            if not self._experts:
                raise TrainError(f"stage {ALL!r} comes after every pre-alignment stage: nothing left to train")
        else:
            self._experts = _experts_of([ctx.name], ctx.cfg)
        self._tasks = _tasks_of(ctx.order[: ctx.index + 1])

    @property
    def experts(self) -> list[str]:
        return list(self._experts)

    @property
    def context_experts(self) -> list[str]:
        return list(self._earlier_experts) if self.ctx.cfg.residual.enabled else []

    def tasks(self) -> list[str]:
        return list(self._tasks)

    def required_experts(self) -> list[str]:
        need = list(self._experts) + self.context_experts
        need += [e for t in self._tasks if (e := target_expert(t, self.ctx.cfg.target_sources))]
        return list(dict.fromkeys(need))

    def trainable_modules(self, model: AstreaModel) -> list[nn.Module]:
        mods: list[nn.Module] = [model.projectors[e] for e in self._experts]
        if self.ctx.cfg.residual.enabled and self.context_experts:
            mods += [model.residuals[e] for e in self._experts]
        return mods + llm_trainable_modules(model)

    def visual_tokens(self, model: AstreaModel, batch: dict[str, Any]) -> torch.Tensor:
        context = []
        with torch.no_grad():  # C_i: earlier experts' aligned tokens, frozen (computed on the fly)
            for e in self.context_experts:
                context.append(model.project(e, batch["tokens"][e]))
        out = []
        for e in self._experts:
            if context:
                out.append(model.aligned(e, batch["tokens"][e], context))
            else:
                out.append(model.project(e, batch["tokens"][e]))
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def residual_entropy(self, model: AstreaModel, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Per trained expert, the per-sample mean entropy (nats) of its residual attention rows [B], as the
        model's mode (train: a draw; eval: ``residual.at_eval``) uses it; {} when the stage has no context."""
        context = [model.project(e, batch["tokens"][e]) for e in self.context_experts]
        if not context:
            return {}
        return {
            e: model.residuals[e].attention_entropy(model.project(e, batch["tokens"][e]), context)
            for e in self._experts
        }


def _experts_of(stages: list[str], cfg: TrainConfig) -> list[str]:
    return list(dict.fromkeys(cfg.stage_experts[s] for s in expand(stages)))


def _tasks_of(stages: list[str]) -> list[str]:
    return list(dict.fromkeys(stage(s).task for s in expand(stages)))


STAGES: Registry[type[Stage]] = Registry("stage")
for _name in (*PRE_ALIGNMENT_STAGES, ALL):
    STAGES.register(_name, AlignStage, help=f"pre-alignment: {_name}")

# Plug-in stages living in their own module; importing it registers the name.
_PLUGINS = {MAIN: "astrea.train.main_stage"}


def stage_class(name: str) -> type[Stage]:
    if name not in STAGES and name in _PLUGINS:
        try:
            importlib.import_module(_PLUGINS[name])
        except ModuleNotFoundError as e:
            if e.name != _PLUGINS[name]:
                raise
            raise TrainError(f"stage {name!r} is not available in this install ({_PLUGINS[name]} is missing)") from None
    return STAGES.get(name)


def build_stages(cfg: TrainConfig, specs: dict[str, Any] | None = None) -> list[Stage]:
    stats = TargetStats()
    stages = []
    for i, name in enumerate(cfg.stages):
        _check_stage_experts(cfg, name)
        ctx = StageContext(cfg=cfg, name=name, index=i, order=list(cfg.stages), specs=dict(specs or {}), stats=stats)
        stages.append(stage_class(name)(ctx))
    return stages


def _check_stage_experts(cfg: TrainConfig, name: str) -> None:
    if name in PRE_ALIGNMENT_STAGES and name not in cfg.stage_experts:
        raise TrainError(f"config field stage_experts has no expert for stage {name!r}; add stage_experts.{name}")
    used: dict[str, str] = {}
    for st in PRE_ALIGNMENT_STAGES:
        e = cfg.stage_experts.get(st)
        if e is None:
            continue
        if e in used:
            raise TrainError(
                f"config field stage_experts: expert {e!r} serves both {used[e]!r} and {st!r}; "
                "each stage needs its own expert (its projector is frozen after its stage)"
            )
        used[e] = st
