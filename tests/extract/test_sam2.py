"""sam2 expert: parity with ``SAM2ImagePredictor`` on the same random weights (preprocessing,
image embedding, box- and point-prompted masks), RLE, prompts, batching, dtypes, weight loading.
Test size: the real hiera-tiny architecture at 256 px, random weights (labelled as such)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from astrea.schemas import mask_rle as rle
from astrea.extract.experts import sam2 as sam2_expert
from astrea.extract.experts.base import WeightsUnavailableError, state_dict_sha256
from astrea.extract.experts.common import storage_error
from astrea.extract.experts.registry import ExpertConfig

SMALL = sam2_expert.DEFAULT_SMALL
S = 256  # image size of the small variant; embedding S/16 = 16, native mask size S/4 = 64


def _img(w: int = 150, h: int = 97, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    # smooth blobs rather than pure noise so masks have some structure
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / (7 + 3 * c) + seed) * np.cos(yy / (5 + 2 * c)) for c in range(3)], -1)
    arr = (base * 100 + 128 + rng.normal(0, 10, (h, w, 3))).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def expert():
    return ExpertConfig("sam2", arch=SMALL, grid=16).build()


@pytest.fixture(scope="module")
def base(expert):
    """One fp32 forward of the standard test image (grid mode), shared: each forward costs seconds."""
    img = _img()
    x = expert.preprocess(img)[None]
    return img, x, expert.forward(x)[0]


def _sharing(expert, prerequisites=None, **cfg):
    """Another configuration around the same (already built) model: building SAM2 costs seconds."""
    c = ExpertConfig("sam2", arch=SMALL, **{"grid": 16, **cfg})
    c.validate()
    return sam2_expert.Sam2Expert(c, SMALL, expert.model, dict(prerequisites or {}))


@pytest.fixture(scope="module")
def predictor(expert):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    p = SAM2ImagePredictor(expert.model)
    # The predictor hard-codes the 1024 px feature sizes; at 256 px they are a quarter of those.
    p._bb_feat_sizes = [(S // 4, S // 4), (S // 8, S // 8), (S // 16, S // 16)]
    return p


def test_preprocessing_is_bit_exact_with_sam2_transforms(expert, predictor):
    for img in (_img(), _img(40, 300, seed=1), _img(S, S, seed=2)):
        x = expert.preprocess(img)
        ref = predictor._transforms(np.asarray(img))
        assert x.shape == (3, S, S) and torch.equal(x, ref)


def test_image_embedding_matches_predictor(expert, predictor, base):
    img, _, out = base
    predictor.set_image(np.asarray(img))
    ref = predictor.get_image_embedding()[0]  # [256, 16, 16]
    # grid == embedding size: tokens are the embedding itself, row-major
    np.testing.assert_allclose(out.tokens, ref.flatten(1).T.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.pooled, ref.mean(dim=(1, 2)).numpy(), rtol=1e-5, atol=1e-5)
    assert expert.spec.weights_sha256 == state_dict_sha256(predictor.model)


def test_box_masks_match_predictor(expert, predictor):
    """Image at the mask size (64 px) so the predictor's masks come back at the same resolution."""
    img = _img(64, 64, seed=3)
    boxes = [[0.1, 0.2, 0.6, 0.9], [0.4, 0.05, 0.95, 0.5]]
    det = {"boxes": boxes, "labels": ["cat", "dog"], "scores": [0.9, 0.4]}
    out = expert.forward(expert.preprocess(img)[None], [{"grounding_dino": det}])[0].outputs
    assert out["prompt"] == "boxes"
    predictor.set_image(np.asarray(img))
    # normalize_coords=False: the predictor takes [0, 1] boxes and scales them by the input size
    ref_masks, ref_scores, _ = predictor.predict(box=np.array(boxes), multimask_output=False, normalize_coords=False)
    by_label = {m["label"]: m for m in out["masks"]}
    assert len(out["masks"]) == sum(int(m.sum() > 0) for m in ref_masks[:, 0])
    for j, label in enumerate(["cat", "dog"]):
        if ref_masks[j, 0].sum() == 0:
            continue
        m = by_label[label]
        mask = rle.decode(m["rle"])
        assert mask.shape == (64, 64)
        assert np.array_equal(mask, ref_masks[j, 0] > 0)
        assert m["area"] == int(mask.sum())
        np.testing.assert_allclose(m["score"], ref_scores[j, 0], rtol=1e-5, atol=1e-6)
    # single box through the predictor's unbatched path too
    ref1, s1, _ = predictor.predict(box=np.array(boxes[0]), multimask_output=False, normalize_coords=False)
    if ref1[0].sum():
        assert np.array_equal(rle.decode(by_label["cat"]["rle"]), ref1[0] > 0)


def test_point_grid_mask_matches_predictor_best_of_three(expert, predictor):
    e = _sharing(expert, options={"points_per_side": 1, "score_threshold": 0.0})
    p = predictor
    img = _img(64, 64, seed=4)
    out = e.forward(e.preprocess(img)[None])[0].outputs
    assert out["prompt"] == "points"
    p.set_image(np.asarray(img))
    masks, scores, _ = p.predict(
        point_coords=np.array([[0.5, 0.5]]), point_labels=np.array([1]), multimask_output=True, normalize_coords=False
    )
    best = int(np.argmax(scores))
    if masks[best].sum() == 0:
        assert out["masks"] == []
    else:
        assert len(out["masks"]) == 1
        assert np.array_equal(rle.decode(out["masks"][0]["rle"]), masks[best] > 0)
        np.testing.assert_allclose(out["masks"][0]["score"], scores[best], rtol=1e-5)


def test_outputs_follow_the_store_contract(expert, base):
    out = base[2].outputs
    assert set(out) >= {"masks", "prompt"}
    import json

    json.dumps(out)  # JSON-serialisable
    for m in out["masks"]:
        assert set(m) == {"rle", "score", "area", "box", "label"}
        assert m["rle"]["size"] == [64, 64] and isinstance(m["rle"]["counts"], str)
        assert 0.0 <= m["box"][0] < m["box"][2] <= 1.0 and 0.0 <= m["box"][1] < m["box"][3] <= 1.0
        assert m["area"] == rle.area(m["rle"]) and m["area"] >= 1
        assert m["score"] >= expert.opts.score_threshold
    assert len(out["masks"]) <= expert.opts.max_masks


def test_grid_nms_and_caps(expert, base):
    with torch.inference_mode():
        embed, high_res = expert.image_features(base[1])  # one encoder pass, two mask settings
    loose = _sharing(expert, options={"points_per_side": 3, "score_threshold": 0.0, "nms_iou": 1.0, "max_masks": 4})
    with torch.inference_mode():
        out = loose._grid_masks(embed, high_res)["masks"]
    assert 1 <= len(out) <= 4
    scores = [m["score"] for m in out]
    assert scores == sorted(scores, reverse=True)
    strict = _sharing(expert, options={"points_per_side": 3, "score_threshold": 0.0, "nms_iou": 0.01, "max_masks": 9})
    with torch.inference_mode():
        masks = [rle.decode(m["rle"]) for m in strict._grid_masks(embed, high_res)["masks"]]
    assert 1 <= len(masks)
    for i in range(len(masks)):
        for j in range(i):
            inter = np.logical_and(masks[i], masks[j]).sum()
            assert inter / np.logical_or(masks[i], masks[j]).sum() <= 0.01


def test_box_prompt_edge_cases(expert, base):
    x = base[1]
    empty = {"boxes": [], "labels": [], "scores": []}
    bad = {"boxes": [[0.5, 0.5, 0.2, 0.9], "nope", [0.1, 0.1, 0.4, float("nan")], [0.1, 0.1, 0.8, 0.8]],
           "labels": ["a", "b", "c", "d"], "scores": [0.9, 0.8, 0.7, 0.6]}
    outs = expert.forward(torch.cat([x, x]), [{"grounding_dino": empty}, {"grounding_dino": bad}])
    assert outs[0].outputs == {"masks": [], "prompt": "boxes"}
    assert outs[1].outputs["skipped_boxes"] == 3
    assert [m["label"] for m in outs[1].outputs["masks"]] in (["d"], [])
    with pytest.raises(ValueError, match="2 prompts for a batch of 1"):
        expert.forward(x, [None, None])  # raised before any compute
    with pytest.raises(ValueError, match=r"expected pixels \[B, 3, 256, 256\]"):
        expert.forward(torch.zeros(1, 3, 64, 64))


def test_max_boxes_keeps_highest_scores():
    boxes, labels, skipped = sam2_expert.Sam2Expert._read_boxes(
        {"boxes": [[0, 0, 0.5, 0.5], [0.1, 0.1, 0.9, 0.9], [0.2, 0.2, 0.3, 0.3]], "labels": ["x", "y", "z"],
         "scores": [0.2, 0.9, 0.5]}, max_boxes=2)
    assert labels == ["y", "z"] and skipped == 0 and boxes[0] == [0.1, 0.1, 0.9, 0.9]


def test_batched_equals_unbatched(expert):
    xs = torch.stack([expert.preprocess(_img(seed=i, w=60 + 50 * i)) for i in range(2)])
    prompts = [{"grounding_dino": {"boxes": [[0.1, 0.1, 0.7, 0.8]], "labels": ["a"], "scores": [1.0]}}, None]
    batched = expert.forward(xs, prompts)
    for i in range(2):
        single = expert.forward(xs[i : i + 1], prompts[i : i + 1])[0]
        np.testing.assert_allclose(batched[i].tokens, single.tokens, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(batched[i].pooled, single.pooled, rtol=1e-4, atol=1e-5)
        assert len(batched[i].outputs["masks"]) == len(single.outputs["masks"])
        for a, b in zip(batched[i].outputs["masks"], single.outputs["masks"]):
            # a logit within float noise of 0 may flip a pixel between batch layouts; allow 0.1 %
            da, db = rle.decode(a["rle"]), rle.decode(b["rle"])
            assert np.mean(da != db) <= 1e-3


def test_grid_resampling_and_spec(expert, base):
    e8 = _sharing(expert, prerequisites={"grounding_dino": "abc123def456"}, grid=8)
    s = e8.spec
    assert (s.token_dim, s.pooled_dim, s.grid) == (256, 256, 8)
    assert s.prerequisites == {"grounding_dino": "abc123def456"}
    assert s.preprocessing["size"] == [S, S] and s.preprocessing["interpolation"] == "bilinear"
    assert s.config["mask_size"] == 64 and s.config["points_per_side"] == 4
    assert s.random_weights and s.seed == 0
    other = _sharing(expert, grid=8, options={"points_per_side": 2})
    assert other.spec.fingerprint() != _sharing(expert, grid=8).spec.fingerprint() != s.fingerprint()
    # 16x16 embedding -> 8x8 grid is the 2x2 area mean
    _, x, out16 = base
    full = out16.tokens.reshape(16, 16, -1)
    np.testing.assert_allclose(
        e8.forward(x)[0].tokens, full.reshape(8, 2, 8, 2, -1).mean(axis=(1, 3)).reshape(64, -1), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="unknown prerequisites"):
        ExpertConfig("sam2", arch=SMALL).build(prerequisites={"ram_plus": "x"})


def test_option_errors_name_the_field():
    with pytest.raises(ValueError, match=r"unknown options \['point_per_side'\]"):
        ExpertConfig("sam2", arch=SMALL, options={"point_per_side": 3}).build()
    with pytest.raises(ValueError, match="nms_iou"):
        ExpertConfig("sam2", arch=SMALL, options={"nms_iou": 0.0}).build()


def test_bfloat16_autocast_on_cpu(expert, base):
    e16 = _sharing(expert, compute_dtype="bfloat16")  # autocast: the fp32 weights are shared untouched
    assert e16.spec.weights_sha256 == expert.spec.weights_sha256
    assert e16.spec.fingerprint() != expert.spec.fingerprint()
    _, x, a = base
    b = e16.forward(x)[0]
    assert np.isfinite(b.tokens).all() and b.tokens.dtype == np.float32
    cos = float(np.dot(a.pooled, b.pooled) / np.linalg.norm(a.pooled) / np.linalg.norm(b.pooled))
    assert cos > 0.98, cos


def test_fp16_storage_error_reported(base):
    out = base[2]
    for dtype, bound in (("float16", 2.0**-11), ("bfloat16", 2.0**-8)):
        err = storage_error(out.tokens, dtype)
        print(f"sam2 {SMALL} tokens stored as {dtype}: {err}")
        assert err["nonfinite"] == 0 and 0 < err["max_rel"] <= bound * 1.0001


def test_local_checkpoint_roundtrip(expert, tmp_path):
    sd = {k: v.clone() for k, v in expert.model.state_dict().items()}
    sd["no_mem_embed"] += 1.0  # "trained" weights: differ from the random init
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": sd}, path)
    for weights in (str(path), str(tmp_path)):  # a file, or a directory holding the hub file name
        e = ExpertConfig("sam2", arch=SMALL, weights=weights).build()
        assert e.spec.weights_sha256 == state_dict_sha256(sd) != expert.spec.weights_sha256
        assert not e.spec.random_weights
    sd.pop(next(iter(sd)))
    torch.save({"model": sd}, tmp_path / "broken.pt")
    with pytest.raises(WeightsUnavailableError, match="1 missing keys"):
        ExpertConfig("sam2", arch=SMALL, weights=str(tmp_path / "broken.pt")).build()


def test_weights_errors_are_clear():
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        ExpertConfig("sam2", arch=SMALL, weights="/no/such/sam2.pt").build()
    with pytest.raises(WeightsUnavailableError, match="test-size model"):
        ExpertConfig("sam2", arch=SMALL, weights="facebook/sam2.1-hiera-tiny").build()
    with pytest.raises(WeightsUnavailableError, match="pass arch sam2.hiera_large"):
        ExpertConfig("sam2", arch="sam2.hiera_tiny", weights="facebook/sam2.1-hiera-large").build()
    # conftest sets HF_HUB_OFFLINE=1: one clear error that says how to provide the weights
    with pytest.raises(WeightsUnavailableError, match="--weights"):
        ExpertConfig("sam2", arch="sam2.hiera_tiny", weights="facebook/sam2.1-hiera-tiny").build()


# ---------------------------------------------------------------------------------------------- RLE


def test_rle_counts_match_sam2_reference_and_roundtrip():
    from sam2.utils.amg import mask_to_rle_pytorch

    rng = np.random.default_rng(0)
    masks = [rng.random((13, 7)) > 0.5, np.zeros((5, 4), bool), np.ones((3, 9), bool)]
    big = np.zeros((200, 300), bool)
    big[20:150, 40:260] = True  # long runs: multi-group and negative deltas in the string encoding
    big[60:70, 100:120] = False
    masks.append(big)
    for m in masks:
        ref = mask_to_rle_pytorch(torch.from_numpy(m)[None])[0]
        assert rle.mask_to_counts(m) == ref["counts"]
        enc = rle.encode(m)
        assert enc["size"] == list(m.shape)
        assert rle.string_to_counts(enc["counts"]) == ref["counts"]
        assert np.array_equal(rle.decode(enc), m)
        assert np.array_equal(rle.decode({"size": list(m.shape), "counts": ref["counts"]}), m)
        assert rle.area(enc) == int(m.sum())


def test_rle_known_strings():
    # hand-computed with maskApi.c's rleToString (5-bit groups + 48, delta to count i-2 from i=3 on)
    assert rle.encode(np.zeros((2, 2), bool))["counts"] == "4"
    center = np.zeros((3, 3), bool)
    center[1, 1] = True
    assert rle.encode(center)["counts"] == "414"
    assert rle.counts_to_string([0, 40, 10, 5]) == "0X1:mN"
    with pytest.raises(ValueError, match="expected 3x3"):
        rle.decode({"size": [3, 3], "counts": "4"})


@pytest.mark.slow
@pytest.mark.parametrize("arch", [n for n, v in sam2_expert.VARIANTS.items() if not v.small])
def test_real_size_shapes(arch):
    e = ExpertConfig("sam2", arch=arch, grid=24, options={"points_per_side": 2}).build()
    x = e.preprocess(_img(500, 300))
    assert tuple(x.shape) == (3, 1024, 1024)
    out = e.forward(x[None])[0]
    assert out.tokens.shape == (576, 256) and out.pooled.shape == (256,)
    assert all(m["rle"]["size"] == [256, 256] for m in out.outputs["masks"])


def test_large_images_are_resized_in_strips_to_the_same_bits(monkeypatch):
    """Above STRIP_ABOVE_PIXELS the width is resized strip by strip, then the height: the same output as
    SAM2Transforms' one full-size float resize, bit for bit (a lower threshold exercises it cheaply)."""
    import numpy as np
    from PIL import Image

    from astrea.extract.experts import sam2

    rng = np.random.default_rng(0)
    for h, w in ((701, 1203), (1100, 333)):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        whole = sam2.apply_preprocessing(img, 256)
        monkeypatch.setattr(sam2, "STRIP_ABOVE_PIXELS", 1000)
        monkeypatch.setattr(sam2, "STRIP_BYTES", 37 * w * 12)  # 37-row strips: the last one is short
        strips = sam2.apply_preprocessing(img, 256)
        monkeypatch.undo()
        assert strips.shape == whole.shape and torch.equal(strips, whole)
