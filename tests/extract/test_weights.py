"""The one weights resolver (extract/experts/weights.py): typed choice, the one strict key check for every
expert, and the checkpoint file's own sha256 in the spec.

Real checkpoint files are written from the tiny random configs, then damaged (a parameter dropped, one
added): every expert must refuse them naming the keys, never build with a parameter left at random.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from astrea.extract.experts.base import WeightsUnavailableError, state_dict_sha256
from astrea.extract.experts.registry import ExpertConfig
from astrea.extract.experts.weights import choose, files_sha256, keys_from_load_error, load_state_dict_strict
from astrea.schemas import ExpertSpec


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _damage_safetensors(path: Path, drop: str | None = None, add: str | None = None) -> None:
    sd = load_file(str(path))
    if drop is not None:
        del sd[drop]
    if add is not None:
        sd[add] = torch.zeros(2)
    save_file(sd, str(path), metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------ choose
def test_choose_types_what_weights_names(tmp_path):
    f = tmp_path / "w.pt"
    f.write_bytes(b"x")
    assert choose("random", seed=4, expert="e").kind == "random" and choose("random", seed=4, expert="e").seed == 4
    assert choose(str(f), seed=0, expert="e").kind == "file"
    assert choose(str(tmp_path), seed=0, expert="e").path == tmp_path
    hub = choose("hf-hub:org/repo", seed=0, expert="e")
    assert (hub.kind, hub.hub_id) == ("hub", "org/repo")
    with pytest.raises(WeightsUnavailableError, match="e: weights path .* does not exist"):
        choose(str(tmp_path / "nope.safetensors"), seed=0, expert="e")


def test_strict_load_names_keys_torch_cuts_to_one_line():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    sd = model.state_dict()
    try:
        model.load_state_dict({**sd, "2.weight": torch.zeros(1)} | {"0.bias": torch.zeros(5)}, strict=True)
    except RuntimeError as e:
        keys = keys_from_load_error(e)
    assert keys["unexpected"] == ["2.weight"] and keys["mismatched"][0].startswith("0.bias")
    broken = {k: v for k, v in sd.items() if k != "1.bias"}
    with pytest.raises(WeightsUnavailableError, match=r"1 missing keys \(e.g. \['1.bias'\]\)"):
        load_state_dict_strict(model, broken, expert="e", source="f.pt")


# ------------------------------------------------------------------------------------------ siglip
def _open_clip_snapshot(tmp_path: Path, arch_name: str = "siglip.tiny") -> tuple[Path, object]:
    """A hub-style open_clip directory (open_clip_config.json + open_clip_model.safetensors) of the
    tiny arch, as `huggingface-cli download` lays out the real ones."""
    import open_clip

    from astrea.extract.experts import siglip

    arch = siglip._ARCHS[arch_name]
    siglip._register_tiny_timm()
    ref = open_clip.create_model(arch.model_name, pretrained=None, **arch.overrides)
    cfg = dict(open_clip.get_model_config(arch.model_name))
    cfg.update(arch.overrides)
    d = tmp_path / "snap"
    d.mkdir()
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {
        "size": list(arch.preprocess["size"]), "mean": list(arch.preprocess["mean"]),
        "std": list(arch.preprocess["std"]), "interpolation": arch.preprocess["interpolation"],
        "resize_mode": arch.preprocess["resize_mode"]}}))
    return d, ref


def test_siglip_config_only_directory_is_refused_not_built_at_random(tmp_path):
    d, ref = _open_clip_snapshot(tmp_path)
    with pytest.raises(WeightsUnavailableError, match="open_clip_config.json but no checkpoint"):
        ExpertConfig("siglip", arch="siglip.tiny", weights=str(d), grid=4).build()
    ckpt = d / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(ckpt))
    e = ExpertConfig("siglip", arch="siglip.tiny", weights=str(d), grid=4).build()
    assert e.spec.weights_sha256 == state_dict_sha256(ref.visual)
    assert e.spec.weights_file_sha256 == _sha(ckpt)


def test_siglip_damaged_checkpoint_is_refused_naming_the_keys(tmp_path):
    d, ref = _open_clip_snapshot(tmp_path)
    ckpt = d / "open_clip_model.safetensors"
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    victim = sorted(k for k in sd if k.startswith("visual."))[3]
    save_file(sd, str(ckpt))
    _damage_safetensors(ckpt, drop=victim, add="visual.mystery")
    for weights in (str(d), str(ckpt)):  # the snapshot directory and the file alone
        with pytest.raises(WeightsUnavailableError, match="do not load into arch 'siglip.tiny'") as err:
            ExpertConfig("siglip", arch="siglip.tiny", weights=weights, grid=4).build()
        assert victim in str(err.value) and "visual.mystery" in str(err.value)


def test_siglip_timm_damaged_checkpoint_is_refused_naming_the_key(tmp_path):
    import timm

    from astrea.extract.experts import siglip

    arch = siglip._ARCHS["siglip.dinov2_tiny"]
    ref = timm.create_model(arch.model_name, pretrained=False, num_classes=0, **arch.overrides)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    victim = sorted(sd)[4]
    del sd[victim]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsUnavailableError, match="1 missing keys") as err:
        ExpertConfig("siglip", arch="siglip.dinov2_tiny", weights=str(tmp_path), grid=4).build()
    assert victim in str(err.value)


# ------------------------------------------------------------------------------ transformers snapshots
@pytest.mark.parametrize("name,arch", [("grounding_dino", "grounding_dino.tiny"), ("sam", "sam.tiny")])
def test_snapshot_missing_or_extra_parameter_is_refused(name, arch, tmp_path):
    """transformers' from_pretrained would initialise a missing parameter at random (unseeded) and only
    log it; the loader refuses the snapshot, naming the parameter."""
    e = ExpertConfig(name, arch=arch, seed=3).build()
    e.model.save_pretrained(tmp_path)
    e.processor.save_pretrained(tmp_path)
    ckpt = tmp_path / "model.safetensors"
    loaded = ExpertConfig(name, arch=arch, weights=str(tmp_path)).build()
    assert loaded.spec.weights_sha256 == e.spec.weights_sha256
    assert loaded.spec.weights_file_sha256 == _sha(ckpt) and e.spec.weights_file_sha256 == ""
    assert loaded.spec.fingerprint() == ExpertSpec.from_dict(loaded.spec.to_dict()).fingerprint()
    victim = sorted(load_file(str(ckpt)))[7]
    _damage_safetensors(ckpt, drop=victim)
    with pytest.raises(WeightsUnavailableError, match="missing keys") as err:
        ExpertConfig(name, arch=arch, weights=str(tmp_path)).build()
    assert victim.split(".")[-2] in str(err.value)  # transformers may name it with its model prefix
    e.model.save_pretrained(tmp_path)
    _damage_safetensors(ckpt, add="mystery.weight")
    with pytest.raises(WeightsUnavailableError, match=r"1 unexpected keys \(e.g. \['mystery.weight'\]\)"):
        ExpertConfig(name, arch=arch, weights=str(tmp_path)).build()


# ------------------------------------------------------------------------------------------ sam2
def test_sam2_unexpected_key_is_refused_and_file_hash_recorded(tmp_path):
    e = ExpertConfig("sam2", arch="sam2.hiera_tiny_256").build()
    sd = {k: v.clone() for k, v in e.model.state_dict().items()}
    path = tmp_path / "ok.pt"
    torch.save({"model": sd}, path)
    loaded = ExpertConfig("sam2", arch="sam2.hiera_tiny_256", weights=str(path)).build()
    assert loaded.spec.weights_file_sha256 == files_sha256([path]) == _sha(path)
    sd["mystery"] = torch.zeros(1)
    torch.save({"model": sd}, tmp_path / "extra.pt")
    with pytest.raises(WeightsUnavailableError, match=r"1 unexpected keys \(e.g. \['mystery'\]\)"):
        ExpertConfig("sam2", arch="sam2.hiera_tiny_256", weights=str(tmp_path / "extra.pt")).build()


# ------------------------------------------------------------------------------------------ spec
def test_file_hash_is_outside_the_fingerprint_and_old_specs_read():
    """Fingerprints written before the field existed stay the same (values computed at the commit
    before it), and an expert.json without the field still reads."""
    rand = ExpertSpec(expert="siglip", arch="siglip.tiny", weights="random", weights_sha256="ab" * 32,
                      preprocessing={"size": [112, 112]}, grid=4, token_dim=64, pooled_dim=64, seed=3, config={"x": 1},
                      codec="zstd")  # zarr's codec before it became a field
    real = ExpertSpec(expert="sam2", arch="sam2.hiera_tiny", weights="/w/sam2.pt", weights_sha256="cd" * 32,
                      preprocessing={}, grid=8, token_dim=256, pooled_dim=256, codec="zstd")
    assert (rand.fingerprint(), real.fingerprint()) == ("3640e4b27fe7", "94bc1f8b6a05")
    import dataclasses

    assert dataclasses.replace(real, weights_file_sha256="ef" * 32).fingerprint() == "94bc1f8b6a05"
    old = real.to_dict()
    assert "weights_file_sha256" not in old  # empty: left out, as a store written before the field has it
    assert ExpertSpec.from_dict(old).weights_file_sha256 == ""
    hashed = dataclasses.replace(real, weights_file_sha256="ef" * 32)
    assert ExpertSpec.from_dict(hashed.to_dict()).weights_file_sha256 == "ef" * 32
