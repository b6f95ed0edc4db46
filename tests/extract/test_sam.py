"""sam (v1) expert: parity with transformers' ``SamProcessor`` + ``SamModel`` on the same random
weights (preprocessing, image embedding, box- and point-prompted masks after ``post_process_masks``),
batching, options, weight loading, and the real-size shapes (on the meta device).
Test size: ``sam.tiny`` (2-block ViT at 256 px, full prompt encoder / mask decoder), random weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from astrea.schemas import mask_rle as rle
from astrea.extract.experts import sam as sam_expert
from astrea.extract.experts.base import WeightsUnavailableError, state_dict_sha256
from astrea.extract.experts.registry import ExpertConfig
from astrea.schemas.stages import STAGE_OF_EXPERT
from astrea.extract.experts.sam_family import MaskOptions, greedy_mask_nms

SMALL = sam_expert.DEFAULT_SMALL
S = 256  # image size of the tiny variant; embedding S/16 = 16, native mask size S/4 = 64


def _img(w: int = 150, h: int = 97, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / (7 + 3 * c) + seed) * np.cos(yy / (5 + 2 * c)) for c in range(3)], -1)
    return Image.fromarray((base * 100 + 128 + rng.normal(0, 10, (h, w, 3))).clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def expert():
    return ExpertConfig("sam", arch=SMALL, grid=16).build()


@pytest.fixture(scope="module")
def base(expert):
    """One fp32 grid-mode forward of the standard test image, shared: each forward costs seconds."""
    x = expert.preprocess(_img())[None]
    return x, expert.forward(x)[0]


@pytest.fixture(scope="module")
def reference():
    """An independently built SamProcessor, as a user of transformers would configure it for 256 px."""
    from transformers import SamImageProcessor, SamProcessor

    return SamProcessor(SamImageProcessor(size={"longest_edge": S}, pad_size={"height": S, "width": S}))


def _sharing(expert, **cfg):
    """Another configuration around the same built model (building costs seconds)."""
    c = ExpertConfig("sam", arch=SMALL, **{"grid": 16, **cfg})
    c.validate()
    return sam_expert.SamExpert(c, SMALL, expert.model, expert.processor, {})


def test_registered_as_segmentation_alternative():
    from astrea.extract.experts.registry import EXPERTS, variants
    from astrea.schemas.stages import EXPERT_ORDER

    assert "sam" in EXPERTS.names() and "sam" not in EXPERT_ORDER and STAGE_OF_EXPERT["sam"] == "segmentation"
    v = variants("sam")
    assert set(v) == {"sam.vit_b", "sam.vit_l", "sam.vit_h", "sam.tiny"}
    assert v["sam.vit_h"].default_weights == "facebook/sam-vit-huge" and sam_expert.DEFAULT == "sam.vit_h"
    assert v["sam.tiny"].small and (v["sam.tiny"].token_dim, v["sam.tiny"].image_size) == (256, 256)
    assert sam_expert.PREREQUISITES == ("grounding_dino",)


def test_preprocessing_is_bit_exact_with_sam_processor(expert, reference):
    for img in (_img(), _img(40, 300, seed=1), _img(S, S, seed=2), _img(1000, 600, seed=3)):
        x = expert.preprocess(img)
        ref = reference(images=img, return_tensors="pt")
        assert x.shape == (3, S, S) and x.dtype == torch.float32
        assert torch.equal(x, ref["pixel_values"][0])
        assert expert.valid_size(x) == tuple(int(v) for v in ref["reshaped_input_sizes"][0])
    gray = _img().convert("L")  # converted, not refused
    assert expert.preprocess(gray).shape == (3, S, S)


def test_image_embedding_matches_get_image_embeddings(expert, reference):
    imgs = [_img(), _img(60, 90, seed=5)]
    pv = reference(images=imgs, return_tensors="pt")["pixel_values"]
    outs = expert.forward(torch.stack([expert.preprocess(i) for i in imgs]))
    with torch.inference_mode():
        ref = expert.model.get_image_embeddings(pv)  # [2, 256, 16, 16]
    for i, out in enumerate(outs):
        # grid == embedding size: tokens are the embedding itself, row-major
        np.testing.assert_allclose(out.tokens, ref[i].flatten(1).T.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.pooled, ref[i].mean(dim=(1, 2)).numpy(), rtol=1e-5, atol=1e-6)
    assert expert.spec.weights_sha256 == state_dict_sha256(expert.model)


def test_box_masks_match_model_and_post_process_masks(expert, reference):
    """Image at the stored mask frame (longest side 64) so post_process_masks' output is the same size;
    box corners on multiples of 1/8 so both paths scale them to identical floats: exact equality."""
    img = _img(64, 40, seed=3)
    boxes = [[0.125, 0.25, 0.625, 0.875], [0.5, 0.0, 1.0, 0.5]]
    det = {"boxes": boxes, "labels": ["cat", "dog"], "scores": [0.9, 0.4]}
    out = expert.forward(expert.preprocess(img)[None], [{"grounding_dino": det}])[0].outputs
    assert out["prompt"] == "boxes"

    px = [[b[0] * 64, b[1] * 40, b[2] * 64, b[3] * 40] for b in boxes]
    inputs = reference(images=img, input_boxes=[px], return_tensors="pt")
    with torch.inference_mode():
        ref = expert.model(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"],
                           multimask_output=False)
    ref_masks = reference.image_processor.post_process_masks(
        ref.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])[0][:, 0].numpy()
    ref_scores = ref.iou_scores[0, :, 0].numpy()
    assert ref_masks.shape == (2, 40, 64)
    kept = [j for j in range(2) if ref_masks[j].sum() > 0]
    assert [m["label"] for m in out["masks"]] == [["cat", "dog"][j] for j in kept]
    for m, j in zip(out["masks"], kept):
        mask = rle.decode(m["rle"])
        assert m["rle"]["size"] == [40, 64]
        assert np.array_equal(mask, ref_masks[j])
        assert m["area"] == int(mask.sum())
        np.testing.assert_allclose(m["score"], ref_scores[j], rtol=1e-5, atol=1e-6)


def test_point_prompt_matches_model_best_of_three(expert, reference):
    """The grid path's prompt (one positive point at the image centre, points_per_side=1) through
    SamExpert.decode/post_process equals model(input_points=...) + post_process_masks."""
    img = _img(64, 48, seed=4)
    x = expert.preprocess(img)
    valid = expert.valid_size(x)
    inputs = reference(images=img, input_points=[[[32.0, 24.0]]], return_tensors="pt")
    with torch.inference_mode():
        embed = expert.image_embeddings(x[None])
        pts = torch.tensor([[[[valid[1] / 2, valid[0] / 2]]]])
        low, iou = expert.decode(embed, points=pts, labels=torch.ones(1, 1, 1, dtype=torch.int64), multimask=True)
        ours = expert.post_process(low, valid)[0].numpy()
        ref = expert.model(pixel_values=inputs["pixel_values"], input_points=inputs["input_points"],
                           multimask_output=True)
    ref_masks = reference.image_processor.post_process_masks(
        ref.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])[0][0].numpy()
    assert ours.shape == ref_masks.shape == (3, 48, 64)
    assert np.array_equal(ours, ref_masks)
    np.testing.assert_allclose(iou[0].numpy(), ref.iou_scores[0, 0].numpy(), rtol=1e-5, atol=1e-6)


def test_grid_mode_keeps_scored_masks_and_nms():
    a = np.zeros((8, 8), bool)
    a[:4] = True
    b = a.copy()
    b[4] = True  # IoU(a, b) = 0.8
    c = ~a
    masks, scores = np.stack([a, b, c, np.zeros_like(a)]), np.array([0.9, 0.95, 0.6, 0.99])
    o = MaskOptions(score_threshold=0.5, nms_iou=0.7, max_masks=16, mask_size=8)
    assert greedy_mask_nms(masks, scores, o) == [1, 2]  # empty mask dropped, a suppressed by b
    assert greedy_mask_nms(masks, scores, MaskOptions(nms_iou=1.0, max_masks=2, mask_size=8)) == [1, 0]
    assert greedy_mask_nms(masks, scores, MaskOptions(score_threshold=0.92, mask_size=8)) == [1]


def test_grid_path_end_to_end(expert, base):
    """Random weights predict IoUs near 0, below any valid score_threshold, so the threshold is lowered
    on the instance (past option validation) to see the whole grid path: 2x2 points over the valid
    area, best of three per point, sorted by score, equal to decoding those points directly."""
    import dataclasses

    e = _sharing(expert, options={"points_per_side": 2, "nms_iou": 1.0})
    e.opts = dataclasses.replace(e.opts, score_threshold=-1.0)
    x = base[0]
    out = e.forward(x)[0].outputs
    h, w = e.valid_size(x[0])  # 97x150 -> 166x256
    pts = torch.tensor([[[[w / 4, h / 4]], [[3 * w / 4, h / 4]], [[w / 4, 3 * h / 4]], [[3 * w / 4, 3 * h / 4]]]])
    with torch.inference_mode():
        low, iou = e.decode(e.image_embeddings(x), points=pts, labels=torch.ones(1, 4, 1, dtype=torch.int64),
                            multimask=True)
        best = iou.argmax(dim=1)
        ref = e.post_process(low[torch.arange(4), best][:, None], (h, w))[:, 0].numpy()
    ref_scores = iou[torch.arange(4), best].numpy()
    order = [j for j in np.argsort(-ref_scores, kind="stable") if ref[j].any()]
    assert out["prompt"] == "points" and len(out["masks"]) == len(order) >= 1
    for m, j in zip(out["masks"], order):
        assert np.array_equal(rle.decode(m["rle"]), ref[j]) and m["label"] is None
        np.testing.assert_allclose(m["score"], ref_scores[j], rtol=1e-5, atol=1e-6)


def test_outputs_follow_the_store_contract(expert, base):
    x, out = base
    assert out.tokens.shape == (256, 256) and out.pooled.shape == (256,) and out.tokens.dtype == np.float32
    o = out.outputs
    assert o["prompt"] == "points" and isinstance(o["masks"], list)
    json.dumps(o)
    det = {"boxes": [[0.1, 0.1, 0.9, 0.9]], "labels": ["x"], "scores": [1.0]}
    m = expert.forward(x, [{"grounding_dino": det}])[0].outputs["masks"]
    for r in m:
        assert set(r) == {"rle", "score", "area", "box", "label"}
        assert r["rle"]["size"] == [42, 64]  # 97x150 image, longest side 64
        assert r["area"] == rle.area(r["rle"])


def test_box_prompt_edge_cases(expert, base):
    x = base[0]
    empty = {"boxes": [], "labels": [], "scores": []}
    bad = {"boxes": [[0.5, 0.5, 0.2, 0.9], "nope", [0.1, 0.1, 0.4, float("nan")], [0.1, 0.1, 0.8, 0.8]],
           "labels": ["a", "b", "c", "d"], "scores": [0.9, 0.8, 0.7, 0.6]}
    outs = expert.forward(torch.cat([x, x]), [{"grounding_dino": empty}, {"grounding_dino": bad}])
    assert outs[0].outputs == {"masks": [], "prompt": "boxes"}
    assert outs[1].outputs["skipped_boxes"] == 3
    assert [m["label"] for m in outs[1].outputs["masks"]] in (["d"], [])
    with pytest.raises(ValueError, match="2 prompts for a batch of 1"):
        expert.forward(x, [None, None])
    with pytest.raises(ValueError, match=r"expected pixels \[B, 3, 256, 256\]"):
        expert.forward(torch.zeros(1, 3, 64, 64))


def test_batched_equals_unbatched(expert):
    xs = torch.stack([expert.preprocess(_img(seed=i, w=60 + 50 * i)) for i in range(2)])
    prompts = [{"grounding_dino": {"boxes": [[0.1, 0.1, 0.7, 0.8]], "labels": ["a"], "scores": [1.0]}}, None]
    batched = expert.forward(xs, prompts)
    for i in range(2):
        single = expert.forward(xs[i : i + 1], prompts[i : i + 1])[0]
        np.testing.assert_allclose(batched[i].tokens, single.tokens, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(batched[i].pooled, single.pooled, rtol=1e-4, atol=1e-5)
        assert batched[i].outputs["prompt"] == single.outputs["prompt"]
        assert len(batched[i].outputs["masks"]) == len(single.outputs["masks"])
        for a, b in zip(batched[i].outputs["masks"], single.outputs["masks"]):
            # a logit within float noise of 0 may flip a pixel between batch layouts; allow 0.1 %
            assert np.mean(rle.decode(a["rle"]) != rle.decode(b["rle"])) <= 1e-3


def test_spec_grid_and_options(expert, base):
    e8 = _sharing(expert, grid=8)
    s = e8.spec
    assert (s.expert, s.token_dim, s.pooled_dim, s.grid) == ("sam", 256, 256, 8)
    assert s.random_weights and s.preprocessing["resize_mode"] == "longest_edge"
    assert s.config["mask_size"] == 64 and s.config["points_per_side"] == 4
    assert _sharing(expert, grid=8, options={"points_per_side": 2}).spec.fingerprint() != s.fingerprint()
    x, out16 = base
    full = out16.tokens.reshape(16, 16, -1)
    np.testing.assert_allclose(e8.forward(x)[0].tokens, full.reshape(8, 2, 8, 2, -1).mean(axis=(1, 3)).reshape(64, -1),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"sam: unknown options \['point_per_side'\]"):
        ExpertConfig("sam", arch=SMALL, options={"point_per_side": 3}).build()
    with pytest.raises(ValueError, match="sam: option nms_iou"):
        ExpertConfig("sam", arch=SMALL, options={"nms_iou": 0.0}).build()
    with pytest.raises(ValueError, match="unknown prerequisites"):
        ExpertConfig("sam", arch=SMALL).build(prerequisites={"ram_plus": "x"})


def test_bfloat16_autocast_on_cpu(expert, base):
    e16 = _sharing(expert, compute_dtype="bfloat16")
    assert e16.spec.weights_sha256 == expert.spec.weights_sha256 and e16.spec.fingerprint() != expert.spec.fingerprint()
    x, a = base
    b = e16.forward(x)[0]
    assert np.isfinite(b.tokens).all() and b.tokens.dtype == np.float32
    cos = float(np.dot(a.pooled, b.pooled) / np.linalg.norm(a.pooled) / np.linalg.norm(b.pooled))
    assert cos > 0.98, cos


def test_random_embedding_is_not_degenerate_and_fp16_error_reported(base):
    """Random tokens must have a real scale (transformers' vision init default of 1e-10 gives ~1e-20,
    all zeros once stored as float16), and their float16/bfloat16 storage error is bounded."""
    from astrea.extract.experts.common import storage_error

    tokens = base[1].tokens
    assert 1e-2 < float(np.abs(tokens).max()) < 1e3 and float(tokens.std()) > 1e-3
    for dtype, bound in (("float16", 2.0**-11), ("bfloat16", 2.0**-8)):
        err = storage_error(tokens, dtype)
        print(f"sam {SMALL} tokens stored as {dtype}: {err}")
        assert err["nonfinite"] == 0 and 0 < err["max_rel"] <= bound * 1.0001 and err["rel_to_max"] < bound


def test_local_snapshot_roundtrip_and_errors(expert, tmp_path):
    snap = tmp_path / "sam-tiny"
    with torch.no_grad():
        expert.model.shared_image_embedding.positional_embedding.add_(1.0)  # "trained": differs from init
    try:
        expert.model.save_pretrained(snap)
        expert.processor.save_pretrained(snap)
        want = state_dict_sha256(expert.model)
    finally:
        with torch.no_grad():
            expert.model.shared_image_embedding.positional_embedding.sub_(1.0)
    e = ExpertConfig("sam", arch=SMALL, weights=str(snap)).build()
    assert e.spec.weights_sha256 == want != expert.spec.weights_sha256 and not e.spec.random_weights
    with pytest.raises(WeightsUnavailableError, match="--arch sam.tiny"):
        ExpertConfig("sam", arch="sam.vit_b", weights=str(snap)).build()
    with pytest.raises(WeightsUnavailableError, match="is a file"):
        ExpertConfig("sam", arch=SMALL, weights=str(snap / "config.json")).build()


def test_weights_errors_are_clear():
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        ExpertConfig("sam", arch=SMALL, weights="/no/such/sam").build()
    with pytest.raises(WeightsUnavailableError, match="test-size model"):
        ExpertConfig("sam", arch=SMALL, weights="facebook/sam-vit-base").build()
    # conftest sets HF_HUB_OFFLINE=1: one clear error that says how to provide the weights
    with pytest.raises(WeightsUnavailableError, match="--weights"):
        ExpertConfig("sam", arch="sam.vit_b", weights="facebook/sam-vit-base").build()


def _meta_shapes(arch: str) -> tuple[tuple[int, ...], float]:
    from transformers import SamModel

    with torch.device("meta"):
        m = SamModel(sam_expert._ARCHS[arch].config())
        e = m.get_image_embeddings(torch.zeros(1, 3, 1024, 1024))
    return tuple(e.shape), sum(p.numel() for p in m.parameters()) / 1e6


def test_real_size_default_shapes_on_meta_device():
    # The released SAM ViT-H has 641M parameters (segment_anything model card).
    shape, mparams = _meta_shapes(sam_expert.DEFAULT)
    assert shape == (1, 256, 64, 64) and round(mparams) == 641


@pytest.mark.slow
@pytest.mark.parametrize("arch,mparams", [("sam.vit_b", 94), ("sam.vit_l", 312)])
def test_real_size_shapes_on_meta_device(arch, mparams):
    shape, got = _meta_shapes(arch)
    assert shape == (1, 256, 64, 64) and round(got) == mparams


@pytest.mark.slow
def test_real_size_vit_b_forward():
    e = ExpertConfig("sam", arch="sam.vit_b", grid=24, options={"points_per_side": 2}).build()
    x = e.preprocess(_img(500, 300))
    assert tuple(x.shape) == (3, 1024, 1024)
    out = e.forward(x[None], [{"grounding_dino": {"boxes": [[0.1, 0.1, 0.5, 0.5]], "labels": ["a"], "scores": [1]}}])[0]
    assert out.tokens.shape == (576, 256) and out.pooled.shape == (256,)
    assert all(m["rle"]["size"] == [154, 256] for m in out.outputs["masks"])
