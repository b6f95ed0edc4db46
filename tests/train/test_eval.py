"""`astrea eval` on a tiny real run: a store written here, the real trainer, the tiny random LLM."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from astrea.cli import app
from astrea.train.eval import EvalConfig, evaluate, recall_at_k, retrieval_metrics
from tests.train.test_main_stage import DIMS, records

TINY_TRAIN = {
    "data": "tiny",
    "stages": ["main"],  # main-only: fastest real run that has every part this test reads
    "steps": 2,
    "batch_size": 6,
    "progress": False,
    "save_every": 0,
    "dataset": {"heldout_fraction": 0.3, "heldout_max": 8, "prefetch": 0},
    "moco": {"queue_size": 8, "embed_dim": 8, "text_encoder": "embeddings"},
}


def write_store(root: Path, n: int = 24, caption=None) -> Path:
    """The tiny store; ``caption(i)`` replaces the i-th record's caption (e.g. to make captions repeat)."""
    from astrea.schemas import ExpertSpec
    from astrea.shards import Store

    store = Store(root)
    recs = records(n)
    for i, r in enumerate(recs):
        if caption is not None:
            r["caption"] = caption(i)
    for name, d in DIMS.items():
        spec = ExpertSpec(expert=name, arch="test", weights="random", weights_sha256="0" * 64, preprocessing={},
                          grid=2, token_dim=d, pooled_dim=d, dtype="float32")
        w = store.expert_dir("tiny", spec, create=True).open_unit("00000")
        for r in recs:
            e = r["experts"][name]
            w.add(r["key"], e["tokens"], e["pooled"], e["outputs"], caption=r["caption"])
        w.commit()
    return root


def train_tiny(root: Path, **overrides) -> Path:
    from astrea.train.runner import run
    from astrea.train.config import TrainConfig

    store = root / "store"
    if not store.is_dir():
        write_store(store)
    cfg = {**TINY_TRAIN, "store": str(store), "out": str(root / overrides.pop("name", "run")), **overrides}
    run(TrainConfig.from_dict(cfg))
    return Path(cfg["out"])


def tiny_run(tmp_path_factory) -> Path:
    """One trained tiny run per test session (shared by the eval/report tests; copy it before writing)."""
    base = tmp_path_factory.getbasetemp() / "astrea_main_tiny"
    done = base / "run" / "summary.json"
    if not done.is_file():
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        train_tiny(base)
    return base / "run"


@pytest.fixture
def run_copy(tmp_path_factory, tmp_path) -> Path:
    src = tiny_run(tmp_path_factory)
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def test_recall_at_k_hand_cases():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.3, 0.2, 0.1]])
    # the match ranks first in row 0, second in row 1, third in row 2
    assert recall_at_k(sim, (1, 2)) == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(2 / 3)}
    assert recall_at_k(torch.zeros(4, 4), (1,))["R@1"] == 0.0  # ties never count as hits
    e = torch.nn.functional.normalize(torch.randn(6, 5), dim=-1)
    m = retrieval_metrics(e, e)
    assert m["image_to_text"]["R@1"] == 1.0 and m["gallery"] == 6 and m["chance"]["R@1"] == pytest.approx(1 / 6)


def test_eval_writes_metrics_for_every_part(run_copy):
    m = evaluate(EvalConfig(run=str(run_copy), max_samples=8, batch_size=4))
    saved = json.loads((run_copy / "eval.json").read_text())
    assert saved == json.loads(json.dumps(m))
    h = m["heldout"]
    assert set(h["main"]) == {"caption", "tags", "boxes", "masks"}
    assert all(isinstance(v, float) and v > 0 for v in h["main"].values())
    assert h["samples"]["main/caption"] > 0
    ro = m["routing"]
    assert ro["experts"] == ["siglip", "ram_plus", "grounding_dino", "sam2"] and ro["top_k"] == 3
    for st in [ro["overall"], *ro["per_task"].values()]:
        assert sum(st["mass"]) == pytest.approx(1.0)
        assert 0.0 <= st["entropy"] <= st["max_entropy"] + 1e-9
        assert 1.0 - 1e-9 <= st["load_balance"] <= 4.0
    r = m["retrieval"]
    assert r["gallery"] == h["samples"]["main/caption"]
    assert 0.0 <= r["image_to_text"]["R@1"] <= r["image_to_text"]["R@5"] <= 1.0
    assert any("RANDOM WEIGHTS" in n for n in m["notes"])
    md = (run_copy / "eval.md").read_text()
    assert "R@1" in md and "grounding_dino" in md and "RANDOM WEIGHTS" in md


def test_eval_cli_and_clear_errors(run_copy, tmp_path):
    r = CliRunner().invoke(app, ["eval", str(run_copy), "--max-samples", "4", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "Routing" in r.output and (run_copy / "eval.json").is_file()
    r = CliRunner().invoke(app, ["eval", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "not a training run" in r.output
    # the store changed under the run: refused, naming the expert and both fingerprints
    store = Path(yaml.safe_load((run_copy / "config.yaml").read_text())["store"])
    moved = tmp_path / "other_store"
    write_store(moved)
    info = json.loads((run_copy / "run.json").read_text())
    info["experts"]["sam2"] = "0123456789ab"
    (run_copy / "run.json").write_text(json.dumps(info))
    r = CliRunner().invoke(app, ["eval", str(run_copy), "--store", str(moved)])
    assert r.exit_code == 2 and "sam2" in r.output and "0123456789ab" in r.output, r.output
    assert store.is_dir()


def test_a_run_saved_with_the_legacy_extras_form_evaluates_the_same(run_copy, tmp_path):
    """Runs written before the typed main-stage sections have `extras:` in config.yaml; eval still reads
    them (one FutureWarning) and measures what the typed form measures."""
    typed = evaluate(EvalConfig(run=str(run_copy), max_samples=8, batch_size=4))
    d = yaml.safe_load((run_copy / "config.yaml").read_text())
    legacy = tmp_path / "legacy"
    shutil.copytree(run_copy, legacy)
    d["extras"] = {"top_k": d["moe"].pop("top_k"), "no_moco": not d["moco"].pop("enabled"),
                   "mu": d["moco"].pop("mu"), **d.pop("main"), "moe": d.pop("moe"), "moco": d.pop("moco")}
    (legacy / "config.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    with pytest.warns(FutureWarning, match="extras"):
        old = evaluate(EvalConfig(run=str(legacy), max_samples=8, batch_size=4))
    assert old["heldout"] == typed["heldout"] and old["routing"] == typed["routing"]
    assert old["retrieval"] == typed["retrieval"]


@pytest.mark.parametrize("cmd", ["eval", "report", "sweep"])
def test_help(cmd):
    r = CliRunner().invoke(app, [cmd, "--help"])
    assert r.exit_code == 0 and "Usage" in r.output


def test_main_only_run_starts_from_the_pre_alignment_weights(tmp_path_factory, tmp_path):
    """`--stages main --set init_from=PRE`: the main stage mixes PRE's projectors, which it keeps frozen."""
    from safetensors.torch import load_file

    pre = tiny_run(tmp_path_factory)
    shutil.copytree(pre.parent / "store", tmp_path / "store")
    run = train_tiny(tmp_path, name="main_only", init_from=str(pre), steps=1)
    a = load_file(str(pre / "stages" / "main" / "model.safetensors"))
    b = load_file(str(run / "stages" / "main" / "model.safetensors"))
    frozen = [k for k in a if k.startswith(("projectors.", "residuals."))]
    assert frozen and all(torch.equal(a[k], b[k]) for k in frozen)
    trained = [k for k in a if k.startswith("extras.moe.router")]
    assert trained and any(not torch.equal(a[k], b[k]) for k in trained)
    # the same (warmed-up) tiny LLM as PRE's, not a fresh one warmed on this run's texts
    la, lb = (load_file(str(r / "llm" / "model.safetensors")) for r in (pre, run))
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
    assert json.loads((run / "run.json").read_text())["llm"].get("text_warmup") == \
        json.loads((pre / "run.json").read_text())["llm"].get("text_warmup")
