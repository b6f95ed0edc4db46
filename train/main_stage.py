"""The ``main`` stage (paper Sec. 3.2): MoE fusion of all aligned experts + MoCo, on top of pre-alignment.

What it trains: the MoE router and per-expert adapters (Eq. 9-10) and the MoCo online heads (Eq. 5-8),
with ``L_total = L_reg + mu * L_moco`` (Eq. 11). The projectors and residual attentions trained by the
pre-alignment stages stay frozen (``train_projectors: true`` unfreezes them); the LLM follows
``llm.freeze`` / ``llm.lora`` as in every stage.

Visual tokens: every pre-alignment expert's aligned grid (projector, then the random residual attention
over the experts aligned before it, exactly as pre-alignment trained it; ``residual.enabled: false`` is
the Tab. 4 "no residual" ablation) is mixed token by token by the router into one grid of P tokens.

Task per sample: the main stage teaches one task per sample (caption, tags, boxes or masks, each with its
own instruction), so that routing can be measured per task type (Fig. 2). The task of an image is a
hash of (seed, key): reproducible, identical after ``--resume`` and independent of the prefetch thread's
timing; over many images every task gets an even share. When the chosen task has no text for an image
(no caption, no outputs), the next task in order is used.

Instruction data (issue 16): with ``instructions.files`` (``astrea train --instructions FILE``), the main stage
trains on LLaVA-format conversations joined with the store by image key (astrea.train.instructions):
one sample per conversation, loss on every assistant turn, the LLM's chat template where it has one;
``instructions.with_targets`` keeps the per-task targets above as one more source.

Options are typed sections of the train config: ``moe`` (:class:`MoEConfig`), ``moco`` (:class:`MoCoConfig`)
and ``main`` (:class:`MainConfig`), e.g. ``--set moe.top_k=1 --set moco.enabled=false --set moco.mu=0.5``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from astrea.schemas.stages import ALL, MAIN, PRE_ALIGNMENT_STAGES, target_expert
from astrea.train.config import TrainConfig
from astrea.train.errors import TrainError
from astrea.train.model import IGNORE, AstreaModel
from astrea.train.moco import MoCo, sample_ids
from astrea.train.moe import MoEFusion, MoEOutput
from astrea.train.stages import STAGES, AlignStage, Routing, Stage, StageContext, llm_trainable_modules
from astrea.train.templates import Rendered, render

__all__ = ["MainStage", "pre_alignment_plan"]


def pre_alignment_plan(cfg: TrainConfig, before: list[str]) -> list[tuple[str, list[str]]]:
    """(expert, experts aligned before it) for every pre-alignment expert, in the order they were aligned.

    The run's own stage order when it has pre-alignment stages before ``main`` (reversed, ``all``, ...);
    otherwise (a main-only run initialised from a pre-alignment run) the canonical order.
    """
    order = [s for s in before if s in (*PRE_ALIGNMENT_STAGES, ALL)] or list(PRE_ALIGNMENT_STAGES)
    plan: list[tuple[str, list[str]]] = []
    for i, name in enumerate(order):
        if name in PRE_ALIGNMENT_STAGES and name not in cfg.stage_experts:
            raise TrainError(
                f"config field stage_experts has no expert for stage {name!r}, which the main stage mixes; "
                f"add stage_experts.{name}"
            )
        st = AlignStage(StageContext(cfg=cfg, name=name, index=i, order=order))
        plan += [(e, st.context_experts) for e in st.experts]
    return plan


class MainStage(Stage):
    def __init__(self, ctx: StageContext):
        super().__init__(ctx)
        cfg = ctx.cfg
        self.moe_cfg, self.moco_cfg, self.main_cfg = cfg.moe, cfg.moco, cfg.main
        self.plan = pre_alignment_plan(cfg, ctx.order[: ctx.index])
        self.experts = [e for e, _ in self.plan]
        cfg.validate_main(self.experts)  # before any step runs; top_k is bounded by the experts mixed
        self._last: MoEOutput | None = None
        self.joined = None  # instruction records joined with the store (astrea.train.instructions.Joined)

    # -- instruction data ---------------------------------------------------------------------------
    @property
    def uses_instructions(self) -> bool:
        return bool(self.ctx.cfg.instructions.files)

    def join_instructions(self):
        """Parse the instruction files and join them with the store (once); returns the ``Joined``."""
        from astrea.train.instructions import join_store

        if self.joined is None and self.uses_instructions:
            self.joined = join_store(self.ctx.cfg, self.required_experts())
        return self.joined

    def wrap_opener(self, opener: Any, *, rank: int, world_size: int) -> Any:
        if not self.uses_instructions:
            return opener
        from astrea.train.instructions import blank_features, instruction_opener

        ic = self.ctx.cfg.instructions
        blank = blank_features(self.ctx.specs, self.required_experts()) if ic.text_only else None
        return instruction_opener(opener, self.join_instructions(), blank=blank, with_targets=ic.with_targets,
                                  seed=self.ctx.cfg.seed, rank=rank, world_size=world_size)

    def sample_length(self, sample: dict[str, Any]) -> int:
        """Length estimate for length-bucketed batches (characters of the conversation)."""
        c = sample.get("instruction")
        return c.chars() if c is not None else len(str(sample.get("caption") or ""))

    def bucket(self) -> int:
        return self.ctx.cfg.instructions.bucket if self.uses_instructions else 0

    # -- what it reads ------------------------------------------------------------------------------
    def tasks(self) -> list[str]:
        return list(self.main_cfg.tasks)

    def required_experts(self) -> list[str]:
        need = list(self.experts)
        need += [e for t in self.main_cfg.tasks if (e := target_expert(t, self.ctx.cfg.target_sources))]
        return list(dict.fromkeys(need))

    # -- model --------------------------------------------------------------------------------------
    def build(self, model: AstreaModel) -> None:
        h = model.hidden_size
        try:
            model.extras["moe"] = self.moe_cfg.build(dim=h, n_experts=len(self.experts), expert_names=self.experts)
            if self.moco_cfg.enabled:
                model.extras["moco"] = self.moco_cfg.build(visual_dim=h, text_dim=h)
        except ValueError as e:  # the configs name their field ("moco.tau")
            raise TrainError(f"config field {e}") from None

    def trainable_modules(self, model: AstreaModel) -> list[nn.Module]:
        mods: list[nn.Module] = [model.extras["moe"]]
        if "moco" in model.extras:
            moco: MoCo = model.extras["moco"]  # type: ignore[assignment]
            mods += [moco.online_v, moco.online_t]  # never the momentum heads (Eq. 8 only)
        if self.main_cfg.train_projectors:
            mods += [model.projectors[e] for e in self.experts]
            if self.ctx.cfg.residual.enabled:
                mods += [model.residuals[e] for e, ctx in self.plan if ctx]
        return mods + llm_trainable_modules(model)

    def aligned_tokens(self, model: AstreaModel, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Each expert's aligned grid [B, P, H], as pre-alignment produced it."""
        grad = self.main_cfg.train_projectors and torch.is_grad_enabled()
        out = []
        with torch.set_grad_enabled(grad):
            projected = {e: model.project(e, batch["tokens"][e]) for e in self.experts}
            for e, before in self.plan:
                ctx = [projected[c] for c in before] if self.ctx.cfg.residual.enabled else []
                out.append(model.residuals[e](projected[e], ctx) if ctx else projected[e])
        return out

    def instruction_context(self, model: AstreaModel, batch: dict[str, Any]) -> torch.Tensor:
        """What the router knows of the task, [B, H] (see ``MoEConfig.router_context``).

        "instruction": the prompt alone through the LLM, the last layer's hidden state at the prompt's
        last token. A causal LM's state there summarises the whole instruction; "caption" and
        "detection" prompts that share every other token still end in clearly different states, where
        their mean input embeddings differ by one token in thirty. No gradient: the context is a
        reading of the instruction, the LLM is not trained to serve the router.
        """
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        # the prompt: each row's prefix before its first target token (a conversation's later questions,
        # also without loss, are not part of it)
        prompt = mask.bool() & ((labels != IGNORE).long().cumsum(1) == 0)
        with torch.no_grad():
            if self.moe_cfg.router_context == "embedding":
                emb = model.llm.get_input_embeddings()(ids).float()
                p = prompt.float()
                return (emb * p[..., None]).sum(1) / p.sum(1, keepdim=True).clamp(min=1)
            lengths = prompt.sum(1).clamp(min=1)
            n = int(lengths.max())
            kw = dict(input_ids=ids[:, :n], attention_mask=prompt[:, :n].long(), output_hidden_states=True,
                      use_cache=False)
            try:  # only hidden states are wanted: skip the vocabulary projection where the model allows
                out = model.llm(**kw, logits_to_keep=1)
            except TypeError:
                out = model.llm(**kw)
            h = out.hidden_states[-1]
            return h[torch.arange(h.shape[0], device=h.device), lengths - 1].float()

    def fuse(self, model: AstreaModel, batch: dict[str, Any]) -> MoEOutput:
        grids = self.aligned_tokens(model, batch)
        moe: MoEFusion = model.extras["moe"]  # type: ignore[assignment]
        context = None
        if moe.cfg.router_context != "none" and moe.cfg.router == "learned":
            context = self.instruction_context(model, batch).to(grids[0].dtype)
        return moe(grids, context=context)

    @property
    def last_output(self) -> MoEOutput | None:
        """The MoE output of the latest ``visual_tokens`` call (routing probabilities for statistics)."""
        return self._last

    # -- what eval reads -----------------------------------------------------------------------------
    def routing(self) -> Routing:
        return Routing(list(self.experts), self.moe_cfg.top_k)

    def routing_probs(self) -> torch.Tensor | None:
        return self._last.probs if self._last is not None else None

    def has_retrieval(self, model: AstreaModel) -> bool:
        return "moco" in model.extras

    def retrieval_embeddings(
        self, model: AstreaModel, batch: dict[str, Any], visual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]] | None:
        """The MoCo online embeddings (Eq. 5-6) of the captioned rows' mean visual token and caption."""
        rows = self.caption_rows(batch) if self.has_retrieval(model) else []
        if not rows:
            return None
        moco: MoCo = model.extras["moco"]  # type: ignore[assignment]
        idx = torch.tensor(rows, device=visual.device)
        captions = [batch["captions"][i] for i in rows]
        text = self.text_features(model, captions, visual.device)
        v, t = moco.embed(visual.float().mean(1).index_select(0, idx), text)
        return v, t, captions

    def visual_tokens(self, model: AstreaModel, batch: dict[str, Any]) -> torch.Tensor:
        out = self.fuse(model, batch)
        self._last = out  # extra_losses (same micro-batch) reads the aux loss and the fused grid
        return out.fused

    def extra_losses(self, model: AstreaModel, batch: dict[str, Any], visual: torch.Tensor) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        if self._last is not None and model.extras["moe"].cfg.balance_weight > 0:  # type: ignore[union-attr]
            losses["balance"] = self._last.aux_loss
        if "moco" in model.extras:
            losses["moco"] = self.moco_cfg.mu * self.moco_loss(model, batch, visual)
        self._last = None  # do not keep this micro-batch's graph alive into the next one
        return losses

    # -- MoCo ---------------------------------------------------------------------------------------
    def caption_rows(self, batch: dict[str, Any]) -> list[int]:
        return [i for i, c in enumerate(batch.get("captions") or []) if isinstance(c, str) and c.strip()]

    def text_features(self, model: AstreaModel, captions: list[str], device: torch.device) -> torch.Tensor:
        """Pooled text embedding [B, H] of captions (MoCo's text side input)."""
        c = self.moco_cfg
        # Plain calls, truncated and padded here: a fast tokenizer keeps padding/truncation as state on its
        # shared backend, and the prefetch thread tokenises batches at the same time (plain calls). A
        # padding=True call here could race with one of those and come back unpadded (seen in the demo).
        rows = [model.tokenizer(x, add_special_tokens=False).input_ids[: c.max_caption_tokens] for x in captions]
        n = max(len(r) for r in rows)
        pad = model.tokenizer.pad_token_id
        ids = torch.tensor([r + [pad] * (n - len(r)) for r in rows], dtype=torch.long, device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows], dtype=torch.long, device=device)
        trainable = any(p.requires_grad for p in model.llm.parameters())
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            if c.text_encoder == "embeddings":
                h = model.llm.get_input_embeddings()(ids)
            else:
                out = model.llm(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
                h = out.hidden_states[-1]
        m = mask[..., None].to(h.dtype)
        return ((h * m).sum(1) / m.sum(1).clamp(min=1)).float()

    def moco_loss(self, model: AstreaModel, batch: dict[str, Any], visual: torch.Tensor) -> torch.Tensor:
        moco: MoCo = model.extras["moco"]  # type: ignore[assignment]
        rows = self.caption_rows(batch)
        pooled = visual.float().mean(1)
        if len(rows) < 2:
            # No contrast without two captions. Still a graph-connected zero and an (empty) enqueue, so
            # every DDP rank produces the same gradients tensors and joins the same key gather.
            moco.enqueue(pooled.new_zeros(0, moco.cfg.embed_dim), pooled.new_zeros(0, moco.cfg.embed_dim))
            zero = moco.online_v(pooled).sum() * 0.0
            return zero + moco.online_t(pooled.new_zeros(1, moco.text_dim)).sum() * 0.0
        idx = torch.tensor(rows, device=visual.device)
        text = self.text_features(model, [batch["captions"][i] for i in rows], visual.device)
        ids = sample_ids([batch["keys"][i] for i in rows])
        return moco(pooled.index_select(0, idx), text, ids=ids).loss

    def after_step(self, model: AstreaModel) -> None:
        if "moco" in model.extras:
            model.extras["moco"].momentum_update()  # type: ignore[operator]

    # -- text ---------------------------------------------------------------------------------------
    def task_for(self, key: str) -> str:
        h = hashlib.blake2b(f"{self.ctx.cfg.seed}:{key}".encode(), digest_size=8).digest()
        return self.main_cfg.tasks[int.from_bytes(h, "little") % len(self.main_cfg.tasks)]

    def render(self, sample: dict[str, Any]) -> Any:
        conv = sample.get("instruction")
        if conv is not None:
            from astrea.train.instructions import Dialogue

            return Dialogue(list(conv.turns), self.ctx.cfg.instructions.template)
        tasks = self.main_cfg.tasks
        start = tasks.index(self.task_for(str(sample.get("key", ""))))
        return self._render_first(sample, tasks[start:] + tasks[:start])

    def text_renders(self) -> list[Callable[[dict[str, Any]], Rendered | None]]:
        return [self.render_task(t) for t in self.main_cfg.tasks]

    def _render_first(self, sample: dict[str, Any], tasks: list[str]) -> Rendered | None:
        opts = self.ctx.target_options()
        for task in tasks:
            r = render(sample, [task], self.ctx.cfg.target_sources, opts, self.ctx.stats)
            if r is not None:
                return r
        return None


STAGES.register(MAIN, MainStage, help="main: MoE router + adapters over all aligned experts, MoCo (Eq. 5-11)")
