"""Stage plans: order (Tab. 6), expert per stage (Tab. 5), cumulative tasks, what each stage trains."""

from __future__ import annotations

import pytest
import torch

from astrea.train.config import TrainConfig
from astrea.train.errors import TrainError
from astrea.train.llm import build_llm
from astrea.train.model import AstreaModel
from astrea.train.stages import build_stages
from tests.train.fixtures import DIMS


def _cfg(stages, **over):
    return TrainConfig.load(None, {"store": "s", "data": "d", "out": "o", "stages": stages, **over})


def test_default_order_is_cumulative():
    st = build_stages(_cfg("caption,classification,detection,segmentation"))
    assert [s.tasks() for s in st] == [
        ["caption"], ["caption", "tags"], ["caption", "tags", "boxes"], ["caption", "tags", "boxes", "masks"]
    ]
    assert st[0].required_experts() == ["siglip"]
    assert st[2].required_experts() == ["grounding_dino", "siglip", "ram_plus"]
    assert st[3].context_experts == ["siglip", "ram_plus", "grounding_dino"]


def test_reversed_and_cap_all():
    rev = build_stages(_cfg("segmentation,detection,classification,caption"))
    assert rev[1].tasks() == ["masks", "boxes"] and rev[1].context_experts == ["sam2"]
    cap_all = build_stages(_cfg("caption,all"))
    assert cap_all[1].experts == ["ram_plus", "grounding_dino", "sam2"]
    assert cap_all[1].tasks() == ["caption", "tags", "boxes", "masks"]


def test_expert_per_stage_is_configurable():
    st = build_stages(_cfg("caption,classification", stage_experts={"caption": "clip"}))
    assert st[0].experts == ["clip"] and st[1].context_experts == ["clip"]
    with pytest.raises(TrainError, match="serves both"):
        build_stages(_cfg("caption", stage_experts={"classification": "siglip"}))
    with pytest.raises(Exception, match="Valid stage names"):
        build_stages(_cfg("caption,captioning"))


def test_residual_off_means_no_context_and_no_residual_params():
    st = build_stages(_cfg("caption,classification", **{"residual.enabled": False}))
    assert st[1].context_experts == [] and st[1].required_experts() == ["ram_plus"]


def test_visual_tokens_shapes_and_trainable_modules():
    cfg = _cfg("caption,all")
    model = AstreaModel(build_llm(cfg.llm), DIMS, cfg)
    st = build_stages(cfg)
    batch = {"tokens": {e: torch.randn(2, 16, d) for e, d in DIMS.items()}}
    assert st[0].visual_tokens(model, batch).shape == (2, 16, 64)
    assert st[1].visual_tokens(model, batch).shape == (2, 48, 64)  # three experts' tokens, concatenated
    mods = st[1].trainable_modules(model)
    assert model.projectors["sam2"] in mods and model.residuals["sam2"] in mods
    assert model.projectors["siglip"] not in mods and model.llm not in mods
