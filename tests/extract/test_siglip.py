"""siglip expert: parity with open_clip / timm on the same random weights, preprocessing bit-exactness,
batching, dtypes and weight loading. All at test size (random weights, labelled as such)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from astrea.extract.experts import siglip
from astrea.extract.experts.base import BadImageError, WeightsUnavailableError, state_dict_sha256
from astrea.extract.experts.common import storage_error
from astrea.extract.experts.weights import seeded
from astrea.extract.experts.registry import ExpertConfig

SMALL = [n for n, v in siglip.VARIANTS.items() if v.small]
REAL = [n for n, v in siglip.VARIANTS.items() if not v.small]
# open_clip pretrained tag whose published preprocessing each real open_clip arch must reproduce.
TAGS = {
    "siglip.so400m_14_384": ("ViT-SO400M-14-SigLIP-384", "webli"),
    "siglip.clip_l14_336": ("ViT-L-14-336-quickgelu", "openai"),
    "siglip.eva02_l14_336": ("EVA02-L-14-336", "merged2b_s6b_b61k"),
}


def _img(w: int = 150, h: int = 97, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _reference(arch_name: str, seed: int = 0):
    """The reference library's own model + transform, built from the same config and seed."""
    arch = siglip._ARCHS[arch_name]
    with seeded(seed):
        if arch.backend == "open_clip":
            import open_clip

            siglip._register_tiny_timm()
            pp = arch.preprocess
            model, _, transform = open_clip.create_model_and_transforms(
                arch.model_name,
                image_mean=tuple(pp["mean"]),
                image_std=tuple(pp["std"]),
                image_interpolation=pp["interpolation"],
                image_resize_mode=pp["resize_mode"],
                **arch.overrides,
            )
            return model.eval(), model.visual, transform
        import timm
        from timm.data import create_transform, resolve_data_config

        model = timm.create_model(arch.model_name, pretrained=False, num_classes=0, **arch.overrides).eval()
        size = arch.preprocess["size"][0]
        data_cfg = resolve_data_config({"input_size": (3, size, size)}, model=model)
        return model, model, create_transform(**data_cfg)


def _final_norm(tower):
    """The tower's last norm module: its output holds the patch tokens the expert stores."""
    if hasattr(tower, "trunk"):
        return tower.trunk.norm, tower.trunk.num_prefix_tokens
    if hasattr(tower, "ln_post"):
        return tower.ln_post, 1
    return tower.norm, tower.num_prefix_tokens


@pytest.mark.parametrize("arch", SMALL)
def test_parity_with_reference_library(arch):
    """Same random weights: preprocessing bit-exact, pooled == encode_image (or timm's head),
    tokens == the final norm's patch tokens (at grid == patch grid, so no resampling in between)."""
    grid = siglip.VARIANTS[arch].image_size // 14
    expert = ExpertConfig("siglip", arch=arch, grid=grid).build()
    ref_model, ref_tower, ref_transform = _reference(arch)
    assert state_dict_sha256(ref_tower) == expert.spec.weights_sha256

    img = _img()
    x = expert.preprocess(img)
    x_ref = ref_transform(img)
    assert x.dtype == torch.float32 and torch.equal(x, x_ref)  # exact, not approximate

    captured = {}
    norm, n_prefix = _final_norm(ref_tower)
    handle = norm.register_forward_hook(lambda m, i, o: captured.setdefault("t", o))
    with torch.inference_mode():
        if siglip._ARCHS[arch].backend == "open_clip":
            pooled_ref = ref_model.encode_image(x_ref[None])
        else:
            pooled_ref = ref_model(x_ref[None])
    handle.remove()
    out = expert.forward(x[None])[0]
    # fp32 CPU, same ops in the same order: agreement is at float32 rounding level.
    np.testing.assert_allclose(out.pooled, pooled_ref[0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.tokens, captured["t"][0, n_prefix:].numpy(), rtol=1e-5, atol=1e-6)
    assert out.tokens.shape == (grid * grid, expert.spec.token_dim)
    assert out.pooled.shape == (expert.spec.pooled_dim,)
    assert out.outputs == {}


@pytest.mark.parametrize("arch", REAL)
def test_real_arch_preprocessing_and_hub_ids_match_reference_metadata(arch):
    """Hard-coded recipes for the real archs equal what open_clip / timm publish for the real weights."""
    a = siglip._ARCHS[arch]
    v = siglip.VARIANTS[arch]
    assert v.default_weights == a.hub
    if a.backend == "open_clip":
        import open_clip

        name, tag = TAGS[arch]
        cfg = open_clip.get_pretrained_cfg(name, tag)
        assert cfg["hf_hub"].rstrip("/") == a.hub
        assert list(cfg["mean"]) == a.preprocess["mean"] and list(cfg["std"]) == a.preprocess["std"]
        assert cfg["interpolation"] == a.preprocess["interpolation"]
        assert cfg["resize_mode"] == a.preprocess["resize_mode"]
        assert open_clip.get_model_config(a.model_name)["vision_cfg"]["image_size"] == v.image_size
        assert bool(cfg.get("quick_gelu", False)) == bool(open_clip.get_model_config(a.model_name).get("quick_gelu"))
    else:
        import timm

        cfg = timm.models.get_pretrained_cfg(a.hub.split("/", 1)[1]).to_dict()
        assert cfg["hf_hub_id"] == a.hub and cfg["crop_pct"] == 1.0 and cfg["crop_mode"] == "center"
        assert list(cfg["mean"]) == a.preprocess["mean"] and list(cfg["std"]) == a.preprocess["std"]
        assert cfg["interpolation"] == a.preprocess["interpolation"]


def test_spec_is_complete_and_follows_what_changes_outputs():
    e = ExpertConfig("siglip", arch=siglip.DEFAULT_SMALL, grid=4).build()
    s = e.spec
    assert s.expert == "siglip" and s.arch == "siglip.tiny" and s.random_weights
    assert s.preprocessing["size"] == [112, 112] and s.preprocessing["resize_mode"] == "squash"
    assert s.preprocessing["mean"] == [0.5, 0.5, 0.5] and s.preprocessing["interpolation"] == "bicubic"
    assert (s.token_dim, s.pooled_dim, s.grid) == (64, 64, 4)
    assert s.config["patch_grid"] == [8, 8] and s.config["compute_dtype"] == "float32"
    fp = s.fingerprint()
    assert ExpertConfig("siglip", arch="siglip.tiny", grid=4).build().spec.fingerprint() == fp  # deterministic
    assert ExpertConfig("siglip", arch="siglip.tiny", grid=4, seed=1).build().spec.weights_sha256 != s.weights_sha256
    assert ExpertConfig("siglip", arch="siglip.tiny", grid=6).build().spec.fingerprint() != fp
    assert ExpertConfig("siglip", arch="siglip.tiny", grid=4, compute_dtype="bfloat16").build().spec.fingerprint() != fp


def test_batched_equals_unbatched():
    e = ExpertConfig("siglip", arch="siglip.tiny", grid=6).build()
    xs = torch.stack([e.preprocess(_img(seed=i, w=60 + 40 * i)) for i in range(3)])
    batched = e.forward(xs)
    for i in range(3):
        single = e.forward(xs[i : i + 1])[0]
        np.testing.assert_allclose(batched[i].tokens, single.tokens, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(batched[i].pooled, single.pooled, rtol=1e-5, atol=1e-5)
    assert not np.allclose(batched[0].pooled, batched[1].pooled)  # different images, different features


def test_grid_resampling_is_area_mean_of_patch_tokens():
    e8 = ExpertConfig("siglip", arch="siglip.tiny", grid=8).build()
    e4 = ExpertConfig("siglip", arch="siglip.tiny", grid=4).build()
    x = e8.preprocess(_img())[None]
    full = e8.forward(x)[0].tokens.reshape(8, 8, -1)
    pooled2x2 = full.reshape(4, 2, 4, 2, -1).mean(axis=(1, 3)).reshape(16, -1)
    np.testing.assert_allclose(e4.forward(x)[0].tokens, pooled2x2, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_on_cpu_close_to_float32():
    e32 = ExpertConfig("siglip", arch="siglip.tiny", grid=4).build()
    e16 = ExpertConfig("siglip", arch="siglip.tiny", grid=4, compute_dtype="bfloat16").build()
    assert e16.spec.weights_sha256 == e32.spec.weights_sha256  # hashed before the compute cast
    x = e32.preprocess(_img())[None]
    a, b = e32.forward(x)[0], e16.forward(x)[0]
    assert b.tokens.dtype == np.float32 and np.isfinite(b.tokens).all()
    cos = float(np.dot(a.pooled, b.pooled) / np.linalg.norm(a.pooled) / np.linalg.norm(b.pooled))
    assert cos > 0.99, cos


def test_fp16_storage_error_is_reported_and_within_format_bound():
    e = ExpertConfig("siglip", arch="siglip.tiny", grid=4).build()
    out = e.forward(torch.stack([e.preprocess(_img(seed=i)) for i in range(2)]))
    tokens = np.stack([o.tokens for o in out])
    for dtype, bound in (("float16", 2.0**-11), ("bfloat16", 2.0**-8)):
        err = storage_error(tokens, dtype)
        print(f"siglip.tiny tokens stored as {dtype}: {err}")
        assert err["nonfinite"] == 0
        assert 0 < err["max_rel"] <= bound * 1.0001
    assert storage_error(tokens, "float32")["max_abs"] == 0.0


def test_bad_image_modes_are_converted():
    e = ExpertConfig("siglip", arch="siglip.tiny", grid=4).build()
    base = _img()
    for img in (base.convert("L"), base.convert("CMYK"), base.convert("RGBA"), base.convert("P"),
                Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)):
        x = e.preprocess(img)
        assert x.shape == (3, 112, 112) and torch.isfinite(x).all(), img.mode


def test_forward_rejects_wrong_input_size():
    e = ExpertConfig("siglip", arch="siglip.tiny", grid=4).build()
    with pytest.raises(ValueError, match=r"\[B, 3, 112, 112\]"):
        e.forward(torch.zeros(1, 3, 64, 64))


def test_local_checkpoint_open_clip(tmp_path):
    """A local open_clip checkpoint loads through open_clip (torch.load weights_only) with its hash."""
    ref_model, ref_tower, _ = _reference("siglip.tiny", seed=5)
    path = tmp_path / "tiny.pt"
    torch.save(ref_model.state_dict(), path)
    e = ExpertConfig("siglip", arch="siglip.tiny", weights=str(path), grid=4).build()
    assert e.spec.weights_sha256 == state_dict_sha256(ref_tower)
    assert not e.spec.random_weights
    assert e.spec.weights_sha256 != ExpertConfig("siglip", arch="siglip.tiny", grid=4).build().spec.weights_sha256


def test_local_checkpoint_timm(tmp_path):
    from safetensors.torch import save_file

    ref, _, _ = _reference("siglip.dinov2_tiny", seed=3)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    e = ExpertConfig("siglip", arch="siglip.dinov2_tiny", weights=str(tmp_path), grid=4).build()  # dir works too
    assert e.spec.weights_sha256 == state_dict_sha256(ref)


def test_checkpoint_of_the_wrong_arch_is_refused(tmp_path):
    ref_model, _, _ = _reference("siglip.clip_tiny")
    path = tmp_path / "clip.pt"
    torch.save(ref_model.state_dict(), path)
    with pytest.raises(WeightsUnavailableError, match="do not load into arch .siglip.tiny"):
        ExpertConfig("siglip", arch="siglip.tiny", weights=str(path)).build()


def test_weights_errors_are_clear():
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        ExpertConfig("siglip", arch="siglip.tiny", weights="/nonexistent/ckpt.pt").build()
    with pytest.raises(WeightsUnavailableError, match="test-size model"):
        ExpertConfig("siglip", arch="siglip.tiny", weights="timm/ViT-SO400M-14-SigLIP-384").build()
    # conftest sets HF_HUB_OFFLINE=1: the hub is unreachable, the error says how to provide weights.
    for arch in ("siglip.so400m_14_384", "siglip.dinov2_l14_336"):
        hub = siglip.VARIANTS[arch].default_weights
        with pytest.raises(WeightsUnavailableError, match="--weights"):
            ExpertConfig("siglip", arch=arch, weights=f"hf-hub:{hub}").build()


def test_unknown_arch_lists_valid_ones():
    with pytest.raises(Exception, match="siglip.so400m_14_384"):
        ExpertConfig("siglip", arch="siglip.nope").build()


def test_bad_image_error_is_a_value_error():
    # the extraction job catches BadImageError per key; make sure the hierarchy stays as documented
    assert issubclass(BadImageError, ValueError)


@pytest.mark.slow
@pytest.mark.parametrize("arch", REAL)
def test_real_size_shapes(arch):
    """Real architectures at full size, random init: the dims and grid the docs and `experts ls` state."""
    e = ExpertConfig("siglip", arch=arch, grid=24).build()
    v = siglip.VARIANTS[arch]
    assert (e.spec.token_dim, e.spec.pooled_dim) == (v.token_dim, v.pooled_dim)
    x = e.preprocess(_img(500, 300))
    assert tuple(x.shape) == (3, v.image_size, v.image_size)
    out = e.forward(x[None])[0]
    assert out.tokens.shape == (576, v.token_dim) and out.pooled.shape == (v.pooled_dim,)
    assert np.isfinite(out.tokens).all()
