"""The main stage on the real tiny LLM and AstreaModel, fed records shaped like the store's joined rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from astrea.train.config import TrainConfig
from astrea.train.data import Collator
from astrea.train.errors import TrainError
from astrea.train.llm import build_llm
from astrea.train.main_stage import MainStage, pre_alignment_plan
from astrea.train.model import AstreaModel
from astrea.train.moco import MoCo
from astrea.train.stages import StageContext, build_stages
from astrea.train.targets import encode_rle

DIMS = {"siglip": 12, "ram_plus": 10, "grounding_dino": 8, "sam2": 6}
P = 4


def records(n: int, seed: int = 0, caption: bool = True) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        mask = np.zeros((8, 8), dtype=bool)
        mask[2:6, 1:5] = True
        out.append(
            {
                "key": f"{i:06d}",
                "caption": f"a photo of thing {i}" if caption else None,
                "labels": {},
                "experts": {
                    "siglip": {"tokens": rng.standard_normal((P, 12), dtype=np.float32), "pooled": rng.standard_normal(12, dtype=np.float32), "outputs": {}},
                    "ram_plus": {"tokens": rng.standard_normal((P, 10), dtype=np.float32), "pooled": rng.standard_normal(10, dtype=np.float32), "outputs": {"tags": ["dog", "grass"], "scores": [0.9, 0.8]}},
                    "grounding_dino": {"tokens": rng.standard_normal((P, 8), dtype=np.float32), "pooled": rng.standard_normal(8, dtype=np.float32), "outputs": {"boxes": [[0.1, 0.2, 0.5, 0.6]], "labels": ["dog"], "scores": [0.7]}},
                    "sam2": {"tokens": rng.standard_normal((P, 6), dtype=np.float32), "pooled": rng.standard_normal(6, dtype=np.float32), "outputs": {"masks": [{"rle": encode_rle(mask), "score": 0.9, "area": 16, "box": [0.1, 0.2, 0.6, 0.7], "label": "dog"}]}},
                },
            }
        )
    return out


def setup(sections: dict | None = None, stages: list[str] | None = None, **cfg_kw):
    """``sections``: the main stage's config sections (moe, moco, main)."""
    cfg = TrainConfig.from_dict(
        {"store": "x", "data": "x", "out": "x", "stages": stages or ["caption", "classification", "detection", "segmentation", "main"],
         **(sections or {"moco": {"queue_size": 16, "embed_dim": 8}}), **cfg_kw}
    )
    torch.manual_seed(0)
    llm = build_llm(cfg.llm)
    model = AstreaModel(llm, DIMS, cfg)
    stages_ = build_stages(cfg)
    for s in stages_:
        s.build(model)
    main = stages_[-1]
    assert isinstance(main, MainStage)
    collate = Collator(main.render, model.tokenizer, main.required_experts(), 256)
    return cfg, model, main, collate


def trainable(model, stage):
    model.requires_grad_(False)
    for m in stage.trainable_modules(model):
        m.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def test_main_stage_trains_only_router_adapters_and_online_heads():
    cfg, model, main, collate = setup()
    params = trainable(model, main)
    moco: MoCo = model.extras["moco"]
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("extras.moe.", "extras.moco.online_")) for n in names), names
    batch = collate(records(6))
    model.train()
    model.llm.eval()
    visual = main.visual_tokens(model, batch)
    assert visual.shape == (6, P, model.hidden_size)
    loss_reg, n = model.lm_loss(visual, batch["input_ids"], batch["attention_mask"], batch["labels"])
    extras = main.extra_losses(model, batch, visual)
    assert set(extras) == {"moco", "balance"}
    (loss_reg + sum(extras.values())).backward()
    assert all(p.grad is not None for p in model.extras["moe"].parameters())
    assert all(p.grad is not None for p in moco.online_parameters())
    assert all(p.grad is None for p in model.projectors.parameters())  # pre-alignment stays frozen
    before = [p.clone() for p in moco.momentum_v.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-2)
    opt.step()
    main.after_step(model)
    # Eq. 8 after the optimizer step: theta_M moved by (1-m) towards the updated theta_E
    m = moco.cfg.momentum
    for b, pm, pe in zip(before, moco.momentum_v.parameters(), moco.online_v.parameters()):
        torch.testing.assert_close(pm, m * b + (1 - m) * pe)
    assert int(moco.queue_filled) == 6


def test_fused_tokens_start_as_mixture_of_aligned_tokens():
    cfg, model, main, collate = setup()
    model.eval()
    batch = collate(records(3))
    grids = main.aligned_tokens(model, batch)
    out = main.fuse(model, batch)
    # identity adapters: the LLM sees exactly a convex mixture of the pre-aligned tokens at step 0
    hand = sum(out.probs[..., i : i + 1] * g for i, g in enumerate(grids))
    torch.testing.assert_close(out.fused, hand)
    assert ((out.probs > 0).sum(-1) == 3).all()  # top-3 of 4 by default


def test_task_per_sample_is_stable_and_covers_all_tasks():
    _, _, main, collate = setup()
    recs = records(40)
    tasks1 = [main.render(r).task for r in recs]
    tasks2 = [main.render(r).task for r in recs]
    assert tasks1 == tasks2
    assert set(tasks1) == {"caption", "tags", "boxes", "masks"}
    r = main.render_task("boxes")(recs[0])
    assert r.prompt == "Instruction: detection.\nAnswer:\n" and r.target == "boxes: dog [10,20,50,59]"  # round(99 v)
    # no caption: the caption task falls through to the next one with text
    nocap = records(40, caption=False)
    assert all(main.render(x).task != "caption" for x in nocap)
    assert main.render_task("caption")(nocap[0]) is None


@pytest.mark.parametrize("context", ["instruction", "embedding", True])  # True: configs written before words
def test_router_context_makes_routing_depend_on_the_instruction(context):
    cfg, model, main, collate = setup({"moe": {"router_context": context}, "moco": {"enabled": False}})
    with torch.no_grad():
        model.extras["moe"].context_router.weight.normal_(std=1.0)
    model.eval()
    recs = records(2)
    a = main.fuse(model, Collator(main.render_task("caption"), model.tokenizer, main.required_experts(), 256)(recs))
    b = main.fuse(model, Collator(main.render_task("masks"), model.tokenizer, main.required_experts(), 256)(recs))
    assert not torch.allclose(a.probs, b.probs)


def test_no_moco_and_top_k_and_balance_flags():
    cfg, model, main, collate = setup({"moco": {"enabled": False}, "moe": {"top_k": 1, "balance_weight": 0.01}})
    assert "moco" not in model.extras
    batch = collate(records(4))
    model.train()
    v = main.visual_tokens(model, batch)
    assert ((main.last_output.probs > 0).sum(-1) == 1).all()
    assert set(main.extra_losses(model, batch, v)) == {"balance"}


def test_short_batch_without_captions_gives_connected_zero():
    cfg, model, main, collate = setup()
    trainable(model, main)
    model.train()
    batch = collate(records(3, caption=False))
    v = main.visual_tokens(model, batch)
    loss = main.extra_losses(model, batch, v)["moco"]
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is not None for p in model.extras["moco"].online_parameters())


def test_no_residual_uses_projector_outputs():
    cfg, model, main, collate = setup(residual={"enabled": False})
    batch = collate(records(2))
    model.eval()
    grids = main.aligned_tokens(model, batch)
    for e, g in zip(main.experts, grids):
        torch.testing.assert_close(g, model.project(e, batch["tokens"][e]))
    cfg2, model2, main2, collate2 = setup()
    grids2 = main2.aligned_tokens(model2, collate2(records(2)))
    # with the residual, every expert after the first is changed by attention over earlier experts
    assert torch.allclose(grids2[0], model2.project("siglip", collate2(records(2))["tokens"]["siglip"]))
    assert not torch.allclose(grids2[3], model2.project("sam2", collate2(records(2))["tokens"]["sam2"]))


def test_stage_order_follows_the_run():
    cfg = TrainConfig.from_dict({"stages": ["segmentation", "detection", "classification", "caption", "main"]})
    plan = pre_alignment_plan(cfg, cfg.stages[:-1])
    assert [e for e, _ in plan] == ["sam2", "grounding_dino", "ram_plus", "siglip"]
    assert plan[3] == ("siglip", ["sam2", "grounding_dino", "ram_plus"])
    cfg = TrainConfig.from_dict({"stages": ["caption", "all", "main"]})
    plan = dict(pre_alignment_plan(cfg, cfg.stages[:-1]))
    assert plan["siglip"] == [] and plan["sam2"] == ["siglip"] and plan["ram_plus"] == ["siglip"]
    experts = {"caption": "clip", "classification": "ram_plus", "detection": "grounding_dino", "segmentation": "sam2"}
    cfg = TrainConfig.from_dict({"stages": ["main"], "stage_experts": experts})
    assert [e for e, _ in pre_alignment_plan(cfg, [])] == ["clip", "ram_plus", "grounding_dino", "sam2"]


@pytest.mark.parametrize(
    "sections,field",
    [
        ({"moe": {"top_k": 5}}, "moe.top_k"),
        ({"moe": {"top_k": 0}}, "moe.top_k"),
        ({"moe": {"topk": 2}}, "moe.topk"),
        ({"moco": {"tau": 0}}, "moco.tau"),
        ({"moco": {"max_caption_tokens": 0}}, "moco.max_caption_tokens"),
        ({"moe": {"adapter_init": "x"}}, "moe.adapter_init"),
        ({"moe": {"router_context": "x"}}, "moe.router_context"),
        ({"main": {"tasks": ["vqa"]}}, "main.tasks"),
        ({"main": {"tasks": []}}, "main.tasks"),
        ({"moco": {"mu": -1}}, "moco.mu"),
        ({"extras": {"top_k": 5}}, "moe.top_k"),  # the legacy form names the typed field
        ({"extras": {"topk": 2}}, "extras.topk"),
    ],
)
def test_bad_options_name_their_field(sections, field):
    with pytest.raises(TrainError, match=field.replace(".", r"\.")):
        setup(sections)


@pytest.mark.parametrize("sections", [{"moe": {"top_k": 9}}, {"moco": {"tau": -1}}, {"main": {"tasks": ["vqa"]}}])
def test_train_config_validate_checks_the_main_sections(sections):
    """The ranges are checked when the whole config is validated (before any stage or data is touched)."""
    cfg = TrainConfig.from_dict({"store": "/s", "data": "x", "out": "/o", **sections})
    if sections.get("moe"):  # top_k's upper bound needs the experts: the main stage checks it
        cfg.validate()
        with pytest.raises(TrainError, match=r"moe\.top_k=9 must be between 1 and the number of experts \(4: "):
            cfg.validate_main(["siglip", "ram_plus", "grounding_dino", "sam2"])
    else:
        with pytest.raises(TrainError, match=next(iter(sections)) + r"\."):
            cfg.validate()


def test_main_config_defaults():
    cfg = TrainConfig()
    assert cfg.moe.top_k == 3 and cfg.moco.enabled and cfg.moco.mu == 0.1
    assert cfg.main.tasks == ["caption", "tags", "boxes", "masks"] and not cfg.main.train_projectors
    assert cfg.moe.router_context == "instruction" and cfg.moe.balance_weight == 0.01
    ctx = StageContext(cfg=TrainConfig(), name="main", index=0, order=["main"])
    assert MainStage(ctx).required_experts() == ["siglip", "ram_plus", "grounding_dino", "sam2"]


def test_train_cli_has_the_ablation_flags():
    from typer.testing import CliRunner

    from astrea.cli import app

    r = CliRunner().invoke(app, ["train", "--help"])
    assert r.exit_code == 0
    for flag in ("--top-k", "--no-residual", "--no-moco", "--stages"):
        assert flag in r.output
    from astrea.train.config import SHORTHANDS

    for key, _ in SHORTHANDS.values():  # each flag's help names the field it sets (the shared table)
        assert key in r.output, key


def test_moco_text_features_while_another_thread_tokenises():
    """The prefetch thread tokenises batches while the main thread embeds captions for MoCo; a fast
    tokenizer's padding state is shared, so a padding=True call raced with it (a demo crashed)."""
    import threading

    cfg, model, main, collate = setup()
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            model.tokenizer("a photo of a much longer caption than the others, " * 3, add_special_tokens=False)

    t = threading.Thread(target=hammer, daemon=True)
    t.start()
    try:
        caps = ["a dog", "a photo of thing 12 on the grass", "x"]
        for _ in range(300):
            f = main.text_features(model, caps, torch.device("cpu"))
            assert f.shape == (3, model.hidden_size)
    finally:
        stop.set()
        t.join()
    # padding does not change a caption's pooled embedding
    alone = main.text_features(model, ["a dog"], torch.device("cpu"))
    torch.testing.assert_close(alone[0], f[0])
