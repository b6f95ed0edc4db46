"""grounding_dino expert: parity with transformers' processor + model + post-processing (same random
weights), prompts, batching, storage error, bad input, weights resolution, spec.

Tolerances: astrea and the reference run the same float32 ops on the same inputs, so tokens, boxes
and scores are compared with atol 1e-5 / rtol 1e-4 (observed difference: 0); preprocessing and
labels must be identical.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from astrea.extract.experts import grounding_dino as gd
from astrea.extract.experts.base import BadImageError, WeightsUnavailableError, state_dict_sha256
from astrea.extract.experts.common import decode_image, resample_grid, storage_error
from astrea.extract.experts.registry import ExpertConfig

ATOL, RTOL = 1e-5, 1e-4
TAGS = ["cat", "dog house", "zebra crossing", "tree"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The test machines share 2 cores among many processes: OpenMP's spinning worker threads then
    make these tiny models ~20x slower than one thread does. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _image(h: int, w: int, seed: int = 0) -> Image.Image:
    """Noise on a gradient: structure plus texture, so features differ across the image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) % 256], -1)
    arr = np.clip(base * 0.7 + rng.integers(0, 80, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def _soften(expert) -> None:
    """Random init saturates every score at ~1.0 (unscaled dot products of layer-normed vectors), so
    no threshold would select anything. Shrinking the decoder's final norm spreads scores over
    ~0.5..0.8 and makes the thresholds bite. Model and reference share this module, so parity holds."""
    with torch.no_grad():
        expert.model.model.decoder.layer_norm.weight.mul_(0.05)


def _build(**kw):
    opts = {"box_threshold": 0.65, "text_threshold": 0.6, "max_detections": None, **kw.pop("options", {})}
    e = ExpertConfig("grounding_dino", arch="grounding_dino.tiny", options=opts, **kw).build({"ram_plus": "0123abcd"})
    _soften(e)
    return e


@pytest.fixture(scope="module")
def expert():
    return _build()


@pytest.fixture(scope="module")
def expert_aspect():
    # The real variants' resize rule (shortest / longest edge, aspect kept), at a test size.
    return _build(options={"size": {"shortest_edge": 96, "longest_edge": 160}})


def _reference(expert, images, tag_lists):
    """transformers' own pipeline: processor(images, text) -> model -> post_process (one call)."""
    from transformers import GroundingDinoImageProcessor, GroundingDinoProcessor

    ip = GroundingDinoImageProcessor(size=dict(expert.preprocessing["size"]))
    proc = GroundingDinoProcessor(ip, gd.offline_tokenizer())
    text = tag_lists[0] if len(tag_lists) == 1 else tag_lists
    inputs = proc(images=images if len(images) > 1 else images[0], text=text, padding="longest", return_tensors="pt")
    with torch.inference_mode():
        out = expert.model(**inputs)
    dets = proc.post_process_grounded_object_detection(
        out, inputs["input_ids"], threshold=expert.opts.box_threshold, text_threshold=expert.opts.text_threshold
    )
    return inputs, out, dets


def _sorted_reference(det):
    order = torch.argsort(det["scores"], descending=True, stable=True)
    return (
        det["boxes"][order].clamp(0, 1).numpy(),
        [det["text_labels"][i] for i in order.tolist()],
        det["scores"][order].numpy(),
    )


def _assert_same_detections(out, det):
    boxes, labels, scores = _sorted_reference(det)
    assert out.outputs["labels"] == labels
    np.testing.assert_allclose(np.asarray(out.outputs["scores"]).reshape(-1), scores, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(np.asarray(out.outputs["boxes"]).reshape(-1, 4), boxes, atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------------------------ tokenizer


def test_offline_vocab_is_deterministic_and_keeps_bert_delimiter_ids():
    v1, v2 = gd.offline_vocab(), gd.offline_vocab()
    assert v1 == v2 and len(v1) == gd.OFFLINE_VOCAB_SIZE
    # transformers hard-wires these ids as Grounding-DINO's phrase delimiters.
    assert (v1["[CLS]"], v1["[SEP]"], v1["."], v1["?"], v1["[PAD]"]) == (101, 102, 1012, 1029, 0)
    tok = gd.offline_tokenizer()
    ids = tok("Zebra crossing . dog .")["input_ids"]
    assert ids[0] == 101 and ids[-1] == 102 and ids.count(1012) == 2
    assert 100 not in ids  # every ASCII word tokenizes (characters as the last resort)
    assert tok.decode(tok("zebra crossing", add_special_tokens=False)["input_ids"]) == "zebra crossing"


# -------------------------------------------------------------------------------------------- prompts


def test_prompt_uses_ram_plus_tags_else_vocabulary(expert):
    p = expert.prompt_for({"ram_plus": {"tags": ["Cat", "dog. house", "cat", "  "], "scores": [0.9, 0.8, 0.7, 0.6]}})
    assert p == {"phrases": ["cat", "dog house"], "source": "ram_plus", "dropped": 0}
    for prompt in (None, {}, {"siglip": {}}):
        p = expert.prompt_for(prompt)
        assert p["source"] == "vocabulary" and p["phrases"] == list(gd.DEFAULT_VOCABULARY) and "note" not in p
    p = expert.prompt_for({"ram_plus": {"tags": []}})
    assert p["source"] == "vocabulary" and "no tags" in p["note"]
    for bad in ({"ram_plus": {"tags": [3, "cat"]}}, {"ram_plus": {"tags": "cat"}}, {"ram_plus": {}}, {"ram_plus": 7}):
        p = expert.prompt_for(bad)
        assert p["source"] == "vocabulary" and "unusable" in p["note"], bad
    p = expert.prompt_for(["cat"])
    assert p["source"] == "vocabulary" and "not a dict" in p["note"]
    assert expert.spec.config["vocabulary"] == list(gd.DEFAULT_VOCABULARY)


def test_long_tag_lists_are_truncated_at_whole_tags(expert):
    tags = [f"object number {i}" for i in range(200)]  # ~5-6 tokens each: far over 256
    p = expert.prompt_for({"ram_plus": {"tags": tags}})
    kept = p["phrases"]
    assert kept == tags[: len(kept)] and p["dropped"] == 200 - len(kept) > 0
    n = len(expert.tokenizer(gd.prompt_text(kept))["input_ids"])
    assert n <= 256
    assert len(expert.tokenizer(gd.prompt_text(tags[: len(kept) + 1]))["input_ids"]) > 256
    # ... and the expert runs on it, recording what it dropped.
    out = expert.forward(torch.stack([expert.preprocess(_image(64, 64))]), [{"ram_plus": {"tags": tags}}])[0]
    assert out.outputs["prompt"] == kept and out.outputs["prompt_dropped"] == p["dropped"]


# --------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("tags", [TAGS, None], ids=["ram_plus", "vocabulary"])
def test_matches_transformers_reference(expert, tags):
    img = _image(90, 140, seed=1)
    use = tags if tags is not None else list(gd.DEFAULT_VOCABULARY)
    inputs, ref, dets = _reference(expert, [img], [use])
    x = expert.preprocess(img)
    assert torch.equal(x, inputs["pixel_values"][0])  # preprocessing: bit-identical
    prompts = [{"ram_plus": {"tags": tags, "scores": [0.9] * len(tags)}}] if tags is not None else None
    out = expert.forward(x[None], prompts)[0]
    h, w = gd.encoder_level_shapes(*x.shape[-2:])[0]
    want = resample_grid(ref.encoder_last_hidden_state_vision[:, : h * w], h, w, 24)[0]
    np.testing.assert_allclose(out.tokens, want.numpy(), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(out.pooled, out.tokens.mean(0), atol=1e-6)
    assert out.tokens.shape == (576, 64) and out.pooled.shape == (64,)
    assert 0 < len(out.outputs["scores"]) < 30  # thresholds select some, not all, of the 30 queries
    _assert_same_detections(out, dets[0])
    assert out.outputs["prompt"] == use
    assert out.outputs["prompt_source"] == ("ram_plus" if tags else "vocabulary")
    s = out.outputs["scores"]
    assert s == sorted(s, reverse=True) and min(s) > 0.65
    assert all(0.0 <= c <= 1.0 for b in out.outputs["boxes"] for c in b)


def test_matches_reference_with_aspect_preserving_resize(expert_aspect):
    img = _image(70, 200, seed=2)
    inputs, ref, dets = _reference(expert_aspect, [img], [TAGS])
    x = expert_aspect.preprocess(img)
    assert tuple(x.shape) == (3, 56, 160)  # shortest edge 96 would make the long side exceed 160
    assert torch.equal(x, inputs["pixel_values"][0])
    out = expert_aspect.forward(x[None], [{"ram_plus": {"tags": TAGS}}])[0]
    h, w = gd.encoder_level_shapes(*x.shape[-2:])[0]
    want = resample_grid(ref.encoder_last_hidden_state_vision[:, : h * w], h, w, 24)[0]
    np.testing.assert_allclose(out.tokens, want.numpy(), atol=ATOL, rtol=RTOL)
    _assert_same_detections(out, dets[0])


def test_pad_batching_matches_reference_batch():
    """batching='pad': the padded batch the reference processor builds, padding cropped from tokens."""
    e = _build(options={"size": {"shortest_edge": 96, "longest_edge": 160}, "batching": "pad"})
    imgs = [_image(70, 200, seed=3), _image(150, 100, seed=4)]
    tags = [TAGS, ["bird", "sky"]]
    inputs, ref, dets = _reference(e, imgs, tags)
    pixels, extra = e.collate([e.preprocess(i) for i in imgs])
    assert torch.equal(pixels, inputs["pixel_values"]) and torch.equal(extra["pixel_mask"], inputs["pixel_mask"])
    outs = e.forward(pixels, [{"ram_plus": {"tags": t}} for t in tags], **extra)
    H, W = pixels.shape[-2:]
    (h, w) = gd.encoder_level_shapes(H, W)[0]
    enc = ref.encoder_last_hidden_state_vision[:, : h * w].reshape(2, h, w, -1)
    for i, img in enumerate(imgs):
        vh, vw = gd.encoder_level_shapes(*e.preprocess(img).shape[-2:])[0]
        want = resample_grid(enc[i : i + 1, :vh, :vw].reshape(1, vh * vw, -1), vh, vw, 24)[0]
        np.testing.assert_allclose(outs[i].tokens, want.numpy(), atol=ATOL, rtol=RTOL)
        _assert_same_detections(outs[i], dets[i])


# ------------------------------------------------------------------------------------------- batching


def test_batched_equals_unbatched_mixed_sizes_and_prompts(expert_aspect):
    e = expert_aspect
    imgs = [_image(70, 200, seed=5), _image(150, 100, seed=6), _image(70, 200, seed=7)]
    prompts = [{"ram_plus": {"tags": TAGS}}, {}, {"ram_plus": {"tags": ["bird"]}}]
    xs = [e.preprocess(i) for i in imgs]
    assert len({tuple(x.shape) for x in xs}) < len(xs)  # some sizes shared, some not
    pixels, extra = e.collate(xs)
    batched = e.forward(pixels, prompts, **extra)
    for x, p, b in zip(xs, prompts, batched):
        one = e.forward(x[None], [p])[0]
        np.testing.assert_allclose(b.tokens, one.tokens, atol=ATOL, rtol=RTOL)
        np.testing.assert_allclose(b.pooled, one.pooled, atol=ATOL, rtol=RTOL)
        assert b.outputs["labels"] == one.outputs["labels"] and b.outputs["prompt"] == one.outputs["prompt"]
        np.testing.assert_allclose(b.outputs["scores"], one.outputs["scores"], atol=ATOL, rtol=RTOL)
        np.testing.assert_allclose(np.reshape(b.outputs["boxes"], (-1, 4)), np.reshape(one.outputs["boxes"], (-1, 4)),
                                   atol=ATOL, rtol=RTOL)


def test_stacked_equal_size_batch_equals_unbatched(expert):
    xs = [expert.preprocess(_image(60 + 20 * i, 90, seed=i)) for i in range(3)]
    batched = expert.forward(torch.stack(xs), None)
    for x, b in zip(xs, batched):
        one = expert.forward(x[None])[0]
        np.testing.assert_allclose(b.tokens, one.tokens, atol=ATOL, rtol=RTOL)
        assert b.outputs["labels"] == one.outputs["labels"]


def test_fp16_storage_error_is_small(expert):
    out = expert.forward(torch.stack([expert.preprocess(_image(90, 140))]))[0]
    err = storage_error(np.concatenate([out.tokens.ravel(), out.pooled]), "float16")
    assert err["nonfinite"] == 0
    assert err["max_rel"] <= 2**-11 * 1.0001  # fp16 rounding bound for normal numbers
    assert err["rel_to_max"] < 1e-3


def test_outputs_round_trip_through_the_store(expert, tmp_path):
    """What forward returns is what the store contract takes: JSON outputs, fp16 arrays."""
    import json

    from astrea.shards import Store

    xs = torch.stack([expert.preprocess(_image(90, 140, seed=s)) for s in range(2)])
    outs = expert.forward(xs, [{"ram_plus": {"tags": TAGS}}, {}])
    edir = Store(tmp_path / "store").expert_dir("toy", expert.spec, create=True)
    w = edir.open_unit("00000")
    for i, o in enumerate(outs):
        json.dumps(o.outputs, allow_nan=False)
        w.add(f"k{i}", o.tokens, o.pooled, o.outputs)
    w.commit()
    recs = list(edir.iter_unit("00000"))
    assert [r.outputs for r in recs] == [o.outputs for o in outs]
    for r, o in zip(recs, outs):
        np.testing.assert_allclose(np.asarray(r.tokens, np.float32), o.tokens, rtol=2**-10, atol=1e-6)


# ---------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16", "1"])
def test_odd_image_modes_are_converted(expert, mode):
    img = _image(50, 70).convert("RGB")
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257)
        assert img.mode == "I;16"
    else:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="TIFF" if mode in ("CMYK", "I;16") else "PNG")
    x = expert.preprocess(decode_image(buf.getvalue()))
    assert x.shape == (3, 128, 128) and x.dtype == torch.float32 and torch.isfinite(x).all()


def test_preprocessor_travels_without_the_model(expert):
    """CPU decode workers get ``expert.preprocessor()`` through Ray's cloudpickle: it must be small
    (no weights) and give exactly ``expert.preprocess``."""
    import ray.cloudpickle as cloudpickle

    blob = cloudpickle.dumps(expert.preprocessor())
    assert len(blob) < 200_000
    img = _image(77, 133)
    assert torch.equal(cloudpickle.loads(blob)(img), expert.preprocess(img))


def test_too_thin_for_the_queries_is_refused_per_key():
    e = _build(options={"size": {"shortest_edge": 32, "longest_edge": 64}})
    with pytest.raises(BadImageError, match="encoder tokens"):
        e.preprocess(_image(2, 100))
    assert e.preprocess(_image(40, 60)).shape[-2:] == (32, 48)


# ------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "options, field",
    [
        ({"box_threshold": 1.5}, "box_threshold"),
        ({"text_threshold": "high"}, "text_threshold"),
        ({"max_detections": 0}, "max_detections"),
        ({"token_level": -1}, "token_level"),
        ({"token_level": 9}, "token_level"),
        ({"batching": "sometimes"}, "batching"),
        ({"size": {"shortest_edge": 800}}, "size"),
        ({"vocabulary": [" . "]}, "vocabulary"),
        ({"vocabulary": ["x " * 300]}, "vocabulary"),  # one phrase over the 256-token text limit
        ({"vocab": ["cat"]}, "vocab"),
    ],
)
def test_bad_options_name_the_field(options, field):
    with pytest.raises(ValueError, match=field):
        ExpertConfig("grounding_dino", arch="grounding_dino.tiny", options=options).build()


def test_vocabulary_option_accepts_a_dotted_string():
    e = ExpertConfig("grounding_dino", arch="grounding_dino.tiny", options={"vocabulary": "Cat . Dog, bird"}).build()
    assert e.opts.vocabulary == ("cat", "dog", "bird")
    assert e.prompt_for(None)["phrases"] == ["cat", "dog", "bird"]


def test_detection_cap_equals_capped_reference():
    """max_detections drops queries before the post-processing; the result must still be exactly the
    reference's detections sorted by score and cut."""
    capped = _build(options={"max_detections": 3})
    img = _image(90, 140, seed=1)
    x = capped.preprocess(img)
    _, _, dets = _reference(capped, [img], [TAGS])
    out = capped.forward(x[None], [{"ram_plus": {"tags": TAGS}}])[0]
    boxes, labels, scores = _sorted_reference(dets[0])
    assert len(labels) > 3 and len(out.outputs["labels"]) == 3
    assert out.outputs["labels"] == labels[:3]
    np.testing.assert_allclose(out.outputs["scores"], scores[:3], atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(np.reshape(out.outputs["boxes"], (-1, 4)), boxes[:3], atol=ATOL, rtol=RTOL)


def test_token_level_mean():
    e = _build(options={"token_level": "mean"})
    x = e.preprocess(_image(90, 140))
    out = e.forward(x[None])[0]
    assert out.tokens.shape == (576, 64)
    level0 = _build().forward(x[None])[0]
    assert out.outputs == level0.outputs  # same model and prompt: only the tokens' level differs
    assert not np.allclose(out.tokens, level0.tokens)


def test_grid_option_changes_token_count():
    e = ExpertConfig("grounding_dino", arch="grounding_dino.tiny", grid=4).build()
    out = e.forward(e.preprocess(_image(64, 64))[None])[0]
    assert out.tokens.shape == (16, 64)


# ------------------------------------------------------------------------------------------- weights


def test_hub_weights_offline_give_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="huggingface-cli download IDEA-Research/grounding-dino-tiny"):
        ExpertConfig("grounding_dino", weights="IDEA-Research/grounding-dino-tiny").build()


def test_weights_path_errors(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        ExpertConfig("grounding_dino", weights=str(tmp_path / "nope")).build()
    with pytest.raises(WeightsUnavailableError, match="test-size"):
        ExpertConfig("grounding_dino", arch="grounding_dino.tiny", weights="IDEA-Research/grounding-dino-tiny").build()
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(WeightsUnavailableError, match="snapshot directory"):
        ExpertConfig("grounding_dino", weights=str(tmp_path / "model.safetensors")).build()
    with pytest.raises(WeightsUnavailableError, match="config.json"):
        ExpertConfig("grounding_dino", weights=str(tmp_path)).build()


def test_local_snapshot_loads_like_the_hub(tmp_path):
    """save_pretrained -> --weights DIR: the real loading path; same weights, tokenizer, outputs."""
    e = ExpertConfig("grounding_dino", arch="grounding_dino.tiny", seed=3).build()
    e.model.save_pretrained(tmp_path)
    e.processor.save_pretrained(tmp_path)
    loaded = ExpertConfig("grounding_dino", arch="grounding_dino.tiny", weights=str(tmp_path)).build()
    assert loaded.spec.weights_sha256 == e.spec.weights_sha256 == state_dict_sha256(e.model)
    assert loaded.spec.config["tokenizer"] == e.spec.config["tokenizer"]
    assert loaded.spec.preprocessing == e.spec.preprocessing
    assert not loaded.spec.random_weights
    x = e.preprocess(_image(90, 140))
    a, b = e.forward(x[None])[0], loaded.forward(x[None])[0]
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.outputs == b.outputs
    with pytest.raises(WeightsUnavailableError, match="--arch grounding_dino.tiny"):
        ExpertConfig("grounding_dino", arch="grounding_dino.swin_t", weights=str(tmp_path)).build()


# ---------------------------------------------------------------------------------------------- spec


def test_spec_fingerprint_follows_what_changes_outputs():
    def fp(prereq=None, **kw):
        return ExpertConfig("grounding_dino", arch="grounding_dino.tiny", **kw).build(prereq).spec.fingerprint()

    base = fp()
    assert fp() == base  # deterministic build (Ray workers rebuild and compare)
    assert fp(seed=1) != base
    assert fp(options={"vocabulary": ["cat"]}) != base
    assert fp(options={"box_threshold": 0.3}) != base
    assert fp(options={"batching": "pad"}) != base
    assert fp({"ram_plus": "abc"}) != base
    assert fp(grid=12) != base
    e = ExpertConfig("grounding_dino", arch="grounding_dino.tiny").build()
    s = e.spec
    assert s.random_weights and s.token_dim == s.pooled_dim == 64 and s.arch == "grounding_dino.tiny"
    assert s.preprocessing["size"] == {"height": 128, "width": 128}
    assert s.preprocessing["mean"] == [0.485, 0.456, 0.406]
    assert e.prerequisites == ("ram_plus",)


def test_registry_defaults():
    assert gd.DEFAULT == "grounding_dino.swin_t" and gd.DEFAULT_SMALL == "grounding_dino.tiny"
    assert gd.VARIANTS[gd.DEFAULT].default_weights == "IDEA-Research/grounding-dino-tiny"
    assert gd.VARIANTS["grounding_dino.swin_b"].default_weights == "IDEA-Research/grounding-dino-base"
    assert gd.VARIANTS[gd.DEFAULT_SMALL].small


def test_encoder_level_shapes_match_the_model(expert_aspect):
    for h, w in [(96, 160), (96, 97), (33, 64)]:
        expert_aspect.forward(torch.zeros(1, 3, h, w))
        assert expert_aspect._captured["shapes"] == gd.encoder_level_shapes(h, w)


# ----------------------------------------------------------------------------------------- real size


@pytest.mark.slow
@pytest.mark.parametrize("arch, embed_dim", [("grounding_dino.swin_t", 96), ("grounding_dino.swin_b", 128)])
def test_real_size_configs_build_and_run(arch, embed_dim):
    """Real-size architectures, random init (no hub here): shapes at the real 800/1333 preprocessing."""
    e = ExpertConfig("grounding_dino", arch=arch).build()
    mc = e.model.config
    assert mc.backbone_config.embed_dim == embed_dim and mc.d_model == 256 and mc.num_queries == 900
    assert mc.text_config.hidden_size == 768 and mc.text_config.num_hidden_layers == 12
    x = e.preprocess(_image(480, 640))
    assert x.shape == (3, 800, 1066)
    out = e.forward(x[None], [{"ram_plus": {"tags": TAGS}}])[0]
    assert out.tokens.shape == (576, 256) and out.pooled.shape == (256,)
    assert e.spec.token_dim == 256 and e.spec.preprocessing["size"] == {"shortest_edge": 800, "longest_edge": 1333}
    assert len(out.outputs["boxes"]) <= 100
