"""Issue 13 (6): retrieval where captions repeat, and `astrea eval` reporting targets lost to the limit."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from astrea.train.eval import EvalConfig, evaluate, recall_at_k, retrieval_metrics
from tests.train.test_eval import run_copy, tiny_run  # noqa: F401 - fixtures

CAPS = ["a red circle", "a blue square", "a red circle", "a green triangle", "a blue square", "a red circle"]


def _perfect(captions: list[str], dim: int = 8) -> torch.Tensor:
    """One unit vector per distinct caption: images and texts of a caption embed identically."""
    torch.manual_seed(0)
    classes = list(dict.fromkeys(captions))
    e = torch.nn.functional.normalize(torch.randn(len(classes), dim), dim=-1)
    return e[[classes.index(c) for c in captions]]


def test_repeated_captions_are_matches_not_misses():
    e = _perfect(CAPS)
    # without the texts only the diagonal matches: identical captions tie with it and count as misses
    assert recall_at_k(e @ e.t(), (1,))["R@1"] == pytest.approx(1 / 6)
    m = retrieval_metrics(e, e, CAPS)
    assert m["image_to_text"] == {"R@1": 1.0, "R@5": 1.0}
    assert m["text_to_image"] == {"R@1": 1.0, "R@5": 1.0}
    assert m["gallery"] == 6 and m["unique_captions"] == 3
    # chance with ties: a query whose caption appears m times among 6 hits at 1 with probability m/6
    assert m["chance"]["R@1"] == pytest.approx((3 * 3 + 2 * 2 + 1 * 1) / 36)
    cl = m["class_level"]
    assert cl["classes"] == 3 and cl["image_to_text"]["R@1"] == 1.0 and cl["text_to_image"]["R@1"] == 1.0
    assert cl["chance"]["R@1"] == pytest.approx(1 / 3) and cl["chance"]["R@5"] == 1.0


def test_ties_with_a_different_text_still_count_against_the_match():
    flat = torch.ones(6, 4)
    m = retrieval_metrics(flat, flat, CAPS)
    assert m["image_to_text"]["R@1"] == 0.0 and m["text_to_image"]["R@1"] == 0.0
    assert m["class_level"]["image_to_text"]["R@1"] == 0.0
    # query 0 ("a red circle"): its 3 copies are matches, the other 3 texts tie with them -> rank 3
    sim = torch.zeros(1, 6)
    assert recall_at_k(sim, (3, 4), query_groups=CAPS[:1], gallery_groups=CAPS) == {"R@3": 0.0, "R@4": 1.0}


def test_class_level_ranks_unique_captions():
    """Six copies of a wrong caption outscore image 0's own: 7th among items, 2nd among captions."""
    caps = ["x"] + ["y"] * 6 + ["z"]
    cols = torch.tensor([[c == k for c in caps] for k in ("x", "y", "z")], dtype=torch.float32)  # [3, 8]
    sim = torch.stack([0.5 * cols[0] + 0.9 * cols[1] + 0.1 * cols[2]] + [cols[1]] * 6 + [cols[2]])  # [8, 8]
    m = retrieval_metrics(sim, torch.eye(8), caps)
    assert m["image_to_text"] == {"R@1": 7 / 8, "R@5": 7 / 8}  # image 0: six non-matching texts ahead
    assert m["class_level"]["image_to_text"] == {"R@1": 7 / 8, "R@5": 1.0}  # only one caption ahead
    assert m["class_level"]["classes"] == 3
    # each caption's best image group is its own (x: image 0 at 0.5 beats 0 elsewhere)
    assert m["text_to_image"]["R@1"] == 1.0 and m["class_level"]["text_to_image"] == {"R@1": 1.0, "R@5": 1.0}


def test_unique_captions_keep_the_old_numbers():
    e = torch.nn.functional.normalize(torch.randn(6, 5), dim=-1)
    m = retrieval_metrics(e, e, [f"c{i}" for i in range(6)])
    assert m["image_to_text"]["R@1"] == 1.0 and m["chance"]["R@1"] == pytest.approx(1 / 6)
    assert m["chance"]["R@5"] == pytest.approx(5 / 6) and m["class_level"] is None
    assert retrieval_metrics(e, e)["chance"] == m["chance"]


def test_eval_reports_targets_cut_per_stage_and_task(run_copy):  # noqa: F811
    cfg_path = run_copy / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["dataset"]["max_text_tokens"] = 12  # the caption prompt alone is about that long: captions get cut
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    m = evaluate(EvalConfig(run=str(run_copy), max_samples=8, batch_size=4))
    t = m["targets"]
    assert t["max_text_tokens"] == 12 and t["format"] == "compact"
    cap = t["stages"]["main/caption"]
    assert cap["targets"] > 0 and cap["cut_tasks"]["caption"] == cap["targets"]
    assert any("main/caption: caption" in n for n in m["notes"])
    assert json.loads((run_copy / "eval.json").read_text())["targets"]["stages"]["main/caption"] == cap
    md = (run_copy / "eval.md").read_text()
    assert "Held-out targets vs max_text_tokens" in md and f"| main/caption | {cap['targets']} | caption" in md
    assert m["retrieval"]["unique_captions"] == m["retrieval"]["gallery"]


def test_eval_retrieval_on_repeated_held_out_captions(tmp_path):
    """End to end: a store whose captions repeat; eval passes the texts, so class-level R@k appears."""
    from tests.train.test_eval import TINY_TRAIN, write_store

    write_store(tmp_path / "store", caption=lambda i: f"a photo of thing {i % 3}")
    from astrea.train.config import TrainConfig
    from astrea.train.runner import run

    out = tmp_path / "run"
    run(TrainConfig.from_dict({**TINY_TRAIN, "steps": 1, "store": str(tmp_path / "store"), "out": str(out),
                               "dataset": {**TINY_TRAIN["dataset"], "heldout_fraction": 0.5}}))
    r = evaluate(EvalConfig(run=str(out), max_samples=16, batch_size=8))["retrieval"]
    assert r["gallery"] >= 4 and r["unique_captions"] <= 3
    assert r["class_level"]["classes"] == r["unique_captions"]
    assert r["chance"]["R@1"] > 1 / r["gallery"]  # ties raise chance above 1/gallery
    assert "Class level" in (out / "eval.md").read_text()
