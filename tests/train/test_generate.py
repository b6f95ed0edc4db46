"""`astrea generate` (issue 16.2): answers about an image from the store (a key) or from a file, whose
features are computed online by the run's experts rebuilt from their stored specs, bit for bit the stored ones.

The store here is extracted for real (sample data, small experts with random weights, local Ray), one image
per batch so that every image's stored row is reproducible alone.
"""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
from typer.testing import CliRunner

import astrea.api as api
from astrea.cli import app
from astrea.shards import JoinedDataset, Store
from astrea.extract.online import online_features

EXPERTS = ["siglip", "ram_plus"]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    work = tmp_path_factory.mktemp("generate")
    data = api.sample_dataset(work / "sample", images=3, shards=1, seed=0, bad=False, register=False)
    api.extract(experts=EXPERTS, data=data, store=work / "store", dataset="sample", small=True,
                weights={"*": "random"}, grid=4, batch_size=1, progress=False)
    records = list(JoinedDataset(Store(work / "store"), "sample", EXPERTS, shuffle=False))
    with tarfile.open(data / "00000.tar") as tf:  # the image files exactly as the source holds them
        for r in records:
            (work / f"{r['key']}.jpg").write_bytes(tf.extractfile(f"{r['key']}.jpg").read())
    api.train(store=str(work / "store"), data="sample", out=str(work / "run"), stages=["caption", "classification"],
              steps=2, batch_size=2, progress=False, **{"llm.text_warmup_steps": 0, "dataset.heldout_fraction": 0.0})
    return work, records


def test_online_features_are_the_stored_features(extracted):
    work, records = extracted
    st = Store(work / "store")
    fps = {e.spec.expert: e.spec.fingerprint() for e in st.experts("sample")}
    for r in records:
        online = online_features(str(work / "store"), "sample", EXPERTS, work / f"{r['key']}.jpg", fps, device="cpu")
        for e in EXPERTS:
            stored = r["experts"][e]
            assert online[e]["tokens"].dtype == stored["tokens"].dtype
            assert np.array_equal(online[e]["tokens"], stored["tokens"]), (r["key"], e)
            assert np.array_equal(online[e]["pooled"], stored["pooled"]), (r["key"], e)
            assert online[e]["outputs"] == stored["outputs"], (r["key"], e)


def test_generate_from_a_key_and_from_the_same_image_file(extracted):
    work, records = extracted
    key = records[0]["key"]
    runner = CliRunner()
    by_key = runner.invoke(app, ["generate", str(work / "run"), "--key", key, "--prompt", "What is it?",
                                 "--max-new-tokens", "12", "--device", "cpu"])
    assert by_key.exit_code == 0, by_key.output
    by_file = runner.invoke(app, ["generate", str(work / "run"), "--image", str(work / f"{key}.jpg"),
                                  "--prompt", "What is it?", "--max-new-tokens", "12", "--device", "cpu"])
    assert by_file.exit_code == 0, by_file.output
    streamed = api.generate(work / "run", "What is it?", key=key, max_new_tokens=12, device="cpu")
    # greedy decoding of identical features: the same answer, streamed to the terminal as generated
    assert by_key.stdout.splitlines()[0] == by_file.stdout.splitlines()[0] == streamed["answer"]
    assert "RANDOM WEIGHTS" in by_key.output
    pieces: list[str] = []
    a = api.generate(work / "run", "What is it?", key=key, max_new_tokens=12, temperature=1.0, seed=3,
                     device="cpu", on_text=pieces.append)
    b = api.generate(work / "run", "What is it?", key=key, max_new_tokens=12, temperature=1.0, seed=3, device="cpu")
    assert a["answer"] == b["answer"] == "".join(pieces)  # sampling is seeded


def test_generate_refuses_two_images_or_none(extracted):
    work, records = extracted
    runner = CliRunner()
    both = runner.invoke(app, ["generate", str(work / "run"), "--key", records[0]["key"], "--image",
                               str(work / f"{records[0]['key']}.jpg"), "--prompt", "x"])
    assert both.exit_code == 2 and "exactly one image" in both.output
    missing = runner.invoke(app, ["generate", str(work / "run"), "--key", "nope", "--prompt", "x"])
    assert missing.exit_code == 2 and "'nope' is not in" in missing.output
