"""``--codec`` reaches the spec: raw by default, zstd on request (another fingerprint), checked per format."""

from __future__ import annotations

import pytest

from astrea.extract import ExtractConfig
from astrea.extract.config import ExtractConfigError
from astrea.extract.experts.registry import ExpertConfig


def test_codec_goes_into_the_spec_and_the_fingerprint():
    raw = ExpertConfig("siglip", arch="siglip.tiny", grid=2).build().spec
    zstd = ExpertConfig("siglip", arch="siglip.tiny", grid=2, codec="zstd").build().spec
    assert (raw.codec, zstd.codec) == ("raw", "zstd") and raw.fingerprint() != zstd.fingerprint()


def test_extract_config_passes_and_checks_the_codec(tmp_path):
    cfg = ExtractConfig(experts=["siglip"], data=str(tmp_path), small=True, codec="zstd")
    names = cfg.validate()
    assert [c.codec for c in cfg.expert_configs(names, "cpu", "float32")] == ["zstd"]
    with pytest.raises(ExtractConfigError, match="codec='zstd' is not valid; choose one of \\['raw'\\]"):
        ExtractConfig(experts=["siglip"], data=str(tmp_path), small=True, format="wds", codec="zstd").validate()
