"""`AstreaModel`: the LLM plus Astrea's light parts, as one module the trainer optimises and saves.

Parts, all keyed by store expert name:
- ``projectors[e]``: FFN D_e -> H (paper 3.1.1);
- ``residuals[e]``: random residual attention of expert e (Eq. 2-4);
- ``extras``: a ``ModuleDict`` where plug-in stages add their modules (the main stage's MoE router,
  adapters, MoCo heads). Everything under ``extras`` is checkpointed with the rest.

The LLM is frozen unless the config says otherwise; its base weights are not in checkpoints (they
are the hub/local model, or RUN/llm for tiny-random), LoRA weights are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from astrea.train.config import TrainConfig
from astrea.train.llm import LoadedLLM
from astrea.train.projector import ProjectorSpec
from astrea.train.residual import RandomResidualAttention

from astrea.train.labels import IGNORE  # noqa: F401 - re-exported: the model's label convention


class AstreaModel(nn.Module):
    def __init__(self, llm: LoadedLLM, expert_dims: dict[str, int], cfg: TrainConfig):
        super().__init__()
        self.llm = llm.model
        self.tokenizer = llm.tokenizer
        self.hidden_size = llm.hidden_size
        self.llm_random_weights = llm.random_weights
        self.llm_full_trainable = not cfg.llm.freeze
        self.llm_lora = cfg.llm.lora
        self.projectors = nn.ModuleDict(
            {e: ProjectorSpec(d, self.hidden_size, cfg.projector.layers).build() for e, d in expert_dims.items()}
        )
        r = cfg.residual
        self.residuals = nn.ModuleDict(
            {
                e: RandomResidualAttention(
                    self.hidden_size, p=r.p, gamma=r.gamma, reading=r.reading, heads=r.heads, at_eval=r.at_eval
                )
                for e in expert_dims
            }
        )
        self.extras = nn.ModuleDict()

    # -- visual side ------------------------------------------------------------------------------
    def project(self, expert: str, tokens: torch.Tensor) -> torch.Tensor:
        """Expert tokens [B, P, D_e] -> aligned tokens [B, P, H] (the projector alone, no residual)."""
        return self.projectors[expert](tokens)

    def aligned(
        self, expert: str, tokens: torch.Tensor, context: list[torch.Tensor], weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Projector, then random residual attention over earlier experts' frozen aligned tokens."""
        return self.residuals[expert](self.project(expert, tokens), context, weights)

    # -- language side ----------------------------------------------------------------------------
    def lm_loss(
        self,
        visual: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 1: next-token loss on target tokens only; returns (mean loss, number of target tokens).

        Visual tokens [B, P, H] are prepended to the text embeddings; their labels and the prompt's
        are -100. The mean is over all target tokens of the batch (long targets weigh more, as in
        LLaVA), so Eq. 1's sum is this mean times the token count.
        """
        logits = self._text_logits(visual, input_ids, attention_mask)
        count = (labels != IGNORE).sum()
        loss_sum = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
        return loss_sum / count.clamp(min=1), count

    def token_losses(
        self, visual: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Per-token next-token loss [B, N] (nats), 0 where the label is -100 (eval's per-line losses)."""
        logits = self._text_logits(visual, input_ids, attention_mask)
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="none"
        ).view(labels.shape)

    def _text_logits(self, visual: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, N, V] predicting each text token (position P-1+i predicts text token i)."""
        emb = self.llm.get_input_embeddings()(input_ids)
        b, p = visual.shape[:2]
        n = input_ids.shape[1]
        inputs = torch.cat([visual.to(emb.dtype), emb], dim=1)
        mask = torch.cat([attention_mask.new_ones(b, p), attention_mask], dim=1)
        # Only the positions that predict text are needed: the last n + 1 (position P-1 predicts the
        # first text token). Skipping the visual positions' logits saves P x vocab floats per sample.
        try:
            out = self.llm(inputs_embeds=inputs, attention_mask=mask, logits_to_keep=n + 1, use_cache=False)
        except TypeError:  # models without logits_to_keep
            out = self.llm(inputs_embeds=inputs, attention_mask=mask, use_cache=False)
        return out.logits[:, -(n + 1) : -1].float()

    # -- saving -----------------------------------------------------------------------------------
    def astrea_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything a checkpoint needs: projectors, residuals, extras, and trainable LLM weights."""
        out = {}
        for k, v in self.state_dict().items():
            if k.startswith("llm.") and not (self.llm_full_trainable or (self.llm_lora and "lora_" in k)):
                continue
            out[k] = v.detach().to("cpu").contiguous()
        return out

    def load_astrea_state_dict(self, sd: dict[str, torch.Tensor], *, strict: bool = True) -> list[str]:
        """Load a checkpoint written by :meth:`astrea_state_dict`; returns keys not present in it."""
        own = self.astrea_state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        if strict and (missing or unexpected):
            raise KeyError(
                f"checkpoint does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}"
            )
        for k in own:
            if k in sd and sd[k].shape != own[k].shape:
                raise ValueError(
                    f"checkpoint tensor {k} has shape {tuple(sd[k].shape)}, model {tuple(own[k].shape)}"
                )
        self.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
        return missing

