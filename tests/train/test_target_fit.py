"""Issue 13 (5): box and mask targets stay whole at the default ``dataset.max_text_tokens``.

The tiny random LLM's tokenizer spends one token per byte (the binding case). Targets are cumulative,
so the segmentation stage's text holds caption, tags, boxes and masks lines; none may be cut, and
whatever has to give way to the limit is dropped as whole items and counted.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from astrea.train.config import TrainConfig
from astrea.train.data import Collator
from astrea.train.stages import build_stages
from astrea.train.targets import decode_rle, encode_rle
from astrea.train.tokenizer import byte_level_tokenizer

SEG = ["caption", "classification", "detection", "segmentation"]


def _scenes(n_objects: int, count: int) -> list[tuple[str, dict]]:
    """Scenes of the sample dataset generator (astrea/data/sample.py) with ``n_objects`` shapes."""
    from astrea.data.sample import _scene

    rng, out = np.random.default_rng(0), []
    while len(out) < count:
        _, caption, labels = _scene(rng)
        if len(labels["classes"]) == n_objects:
            out.append((caption, labels))
    return out


def _record(caption: str, labels: dict) -> dict:
    """A store record whose experts said exactly what the scene holds (what the trainer streams)."""
    tok = {"tokens": np.zeros((4, 4), np.float32), "pooled": np.zeros(4, np.float32)}
    cls = labels["classes"]
    return {
        "key": caption, "caption": caption, "labels": labels,
        "experts": {
            "siglip": {**tok, "outputs": {}},
            "ram_plus": {**tok, "outputs": {"tags": labels["tags"], "scores": [0.9] * len(labels["tags"])}},
            "grounding_dino": {**tok, "outputs": {"boxes": labels["boxes"], "labels": cls, "scores": [0.9] * len(cls)}},
            "sam2": {**tok, "outputs": {"masks": labels["masks"]}},
        },
    }


def _noisy_record(n: int = 30, label_chars: int = 60) -> dict:
    """What the demo store's random-weight experts write: many detections with long garbage labels."""
    rng = np.random.default_rng(1)
    tok = {"tokens": np.zeros((4, 4), np.float32), "pooled": np.zeros(4, np.float32)}
    labels = ["".join(rng.choice(list("abcdefghij. "), label_chars)) for _ in range(n)]
    boxes = [sorted(rng.random(2).tolist()) for _ in range(n)]
    boxes = [[b[0], b[0], b[1], b[1]] for b in boxes]
    masks = []
    for lab in labels:
        m = rng.random((64, 64)) > 0.3
        masks.append({"rle": encode_rle(m), "score": 0.5, "area": int(m.sum()), "label": lab})
    return {
        "key": "noisy", "caption": "a yellow triangle, a green triangle and a red square on a light blue background",
        "experts": {
            "siglip": {**tok, "outputs": {}},
            "ram_plus": {**tok, "outputs": {"tags": [f"tag{i}" for i in range(12)], "scores": [0.5] * 12}},
            "grounding_dino": {**tok, "outputs": {"boxes": boxes, "labels": labels, "scores": [0.5] * n}},
            "sam2": {**tok, "outputs": {"masks": masks}},
        },
    }


def _collate(records: list[dict], stage: str = "segmentation"):
    """Renders and tokenises like the trainer, at the default config; returns the batch's target texts
    as the LLM sees them (the label tokens, EOS removed) and the collator."""
    cfg = TrainConfig.from_dict({"store": "x", "data": "x", "out": "x", "stages": SEG})
    st = next(s for s in build_stages(cfg) if s.name == stage)
    tok = byte_level_tokenizer()
    c = Collator(st.render, tok, ["siglip"], cfg.dataset.max_text_tokens)
    b = c(records)
    texts = []
    for row in b["labels"].tolist():
        ids = [t for t in row if t >= 0 and t != tok.eos_token_id]
        texts.append(tok.decode(ids))
    return texts, c


def test_three_object_scene_keeps_every_line_and_its_masks_decode():
    scenes = _scenes(3, 6)
    texts, c = _collate([_record(cap, lab) for cap, lab in scenes])
    for (cap, lab), text in zip(scenes, texts, strict=True):
        lines = dict(line.split(": ", 1) for line in text.split("\n"))
        assert list(lines) == ["caption", "tags", "boxes", "masks"], text
        assert lines["caption"] == cap
    assert c.truncated == 0

    from astrea.train.targets import mask_iou, parse_boxes, parse_masks

    for (cap, lab), text in zip(scenes, texts, strict=True):
        lines = dict(line.split(": ", 1) for line in text.split("\n"))
        boxes = parse_boxes(lines["boxes"])
        assert [b[0] for b in boxes] == lab["classes"]
        for (_, got), want in zip(boxes, lab["boxes"], strict=True):
            assert got == pytest.approx(want, abs=0.5 / 99 + 1e-9)
        truth = [decode_rle(m["rle"]) for m in lab["masks"]]
        masks = parse_masks(lines["masks"], truth[0].shape)
        assert 2 <= len(masks) <= 3  # at most one mask may give way to the limit, and is then counted
        for (label, got), want, name in zip(masks, truth, lab["classes"], strict=False):
            assert label == name and mask_iou(got, want) >= 0.72
    assert sum(c.dropped_items.values()) == sum(3 - len(parse_masks(t.split("\n")[3], (256, 256))) for t in texts)


def test_long_expert_outputs_drop_whole_items_never_a_line():
    """30 detections with long labels cannot all fit: objects are dropped (counted), no line is cut."""
    texts, c = _collate([_noisy_record()])
    lines = dict(line.split(": ", 1) for line in texts[0].split("\n"))
    assert list(lines) == ["caption", "tags", "boxes", "masks"]
    assert c.truncated == 0 and not c.cut_tasks

    from astrea.train.targets import parse_boxes, parse_masks

    n_boxes, n_masks = len(parse_boxes(lines["boxes"])), len(parse_masks(lines["masks"], (64, 64)))
    assert n_boxes >= 1 and n_masks >= 1
    assert c.dropped_items["boxes"] == 8 - n_boxes and c.dropped_items["masks"] == 8 - n_masks  # max_objects 8
    assert len(lines["caption"]) > 40  # the caption is never shortened


def test_compact_codes_round_trip_on_the_sample_shapes():
    from astrea.train.targets import TargetOptions, TargetStats, mask_iou, masks_items, parse_masks

    worst = {}
    for _, lab in _scenes(1, 12) + _scenes(2, 6) + _scenes(3, 4):
        items = masks_items({"masks": lab["masks"]}, TargetOptions(), TargetStats())
        truth = [decode_rle(m["rle"]) for m in lab["masks"]]
        got = parse_masks("; ".join(items), truth[0].shape)
        for (_, m), t, shape in zip(got, truth, [c.split()[1] for c in lab["classes"]], strict=True):
            worst[shape] = min(worst.get(shape, 1.0), mask_iou(m, t))
    assert set(worst) == {"circle", "square", "triangle"}
    assert min(worst.values()) >= 0.72, worst  # measured over 300 scenes: 0.746 (a triangle)


def test_decimal_format_is_still_selectable_and_parses():
    from astrea.train.targets import TargetOptions, TargetStats, boxes_text, mask_iou, masks_text, parse_boxes, parse_masks

    m = np.zeros((20, 20), bool)
    m[4:16, 2:12] = True
    out = {"boxes": [[0.1234, 0.2, 0.5, 0.8]], "labels": ["a cat"]}
    old = TargetOptions(format="decimal")
    assert boxes_text(out, old, TargetStats()) == "a cat [0.12,0.20,0.50,0.80]"
    assert boxes_text(out, TargetOptions(), TargetStats()) == "a cat [12,20,50,79]"
    assert parse_boxes("boxes: a cat [0.12,0.20,0.50,0.80]")[0][1] == pytest.approx([0.12, 0.2, 0.5, 0.8])
    poly = masks_text({"masks": [{"rle": encode_rle(m), "label": "cat"}]}, old, TargetStats())
    assert poly.startswith("cat (") and mask_iou(parse_masks(poly, (20, 20))[0][1], m) > 0.6
    cfg = TrainConfig.from_dict({"store": "x", "data": "x", "out": "x", "dataset": {"target_format": "decimal"}})
    assert build_stages(cfg)[0].ctx.target_options().format == "decimal"


def test_trainer_warns_with_counts_per_task_at_stage_start(toy_store, tmp_path, caplog):
    """A limit that leaves room for the caption but not the tags line (prompt 44 tokens + the longest
    caption line 27 + EOS fit in 76): the stage start says so, per task, and the run records it."""
    from astrea.train.metrics import read_metrics
    from astrea.train.runner import run_local

    out = tmp_path / "run"
    cfg = TrainConfig.load(None, {
        "store": str(toy_store), "data": "toy", "out": str(out), "stages": "caption,classification",
        "steps": 1, "batch_size": 6, "dataset.heldout_fraction": 0.2, "save_every": 0, "progress": False,
        "dataset.max_text_tokens": 76, "dataset.prefetch": 0,
        "llm.tokenizer": "bytes",  # the token counts above are bytes
    })
    with caplog.at_level(logging.WARNING):
        summary = run_local(cfg)
    warned = [r.getMessage() for r in caplog.records if "max_text_tokens" in r.getMessage()]
    assert len(warned) == 1 and "stage classification" in warned[0], warned
    cls = summary["stages"][1]["extra"]
    n = cls["target_check"]["targets"]  # every training record of the toy store (fewer than target_check)
    assert 20 < n <= cfg.dataset.target_check and f"tags {n}/{n}" in warned[0]
    assert cls["target_check"]["cut_tasks"] == {"tags": n} and cls["target_check"]["dropped_items"] == {"tags": n}
    assert cls["targets"]["cut_tasks"]["tags"] == cls["truncated_targets"] > 0
    assert summary["stages"][0]["extra"]["target_check"]["cut_tasks"] == {}
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "targets"]
    assert {r["stage"]: r.get("cut_tags", 0) for r in rows} == {"caption": 0, "classification": n}
    saved = json.loads((out / "summary.json").read_text())
    assert saved["stages"][1]["extra"]["target_check"]["cut_tasks"] == {"tags": n}


def test_the_stage_start_check_is_bounded(toy_store, tmp_path):
    from astrea.train.runner import run_local

    cfg = TrainConfig.load(None, {
        "store": str(toy_store), "data": "toy", "out": str(tmp_path / "run"), "stages": "caption",
        "steps": 1, "batch_size": 6, "save_every": 0, "progress": False, "dataset.target_check": 5,
    })
    assert run_local(cfg)["stages"][0]["extra"]["target_check"]["records"] == 5


def test_cli_summary_names_what_the_limit_took():
    from astrea.cli.train import format_summary

    stage = {"name": "segmentation", "steps": 1, "heldout_before": None, "heldout_after": None,
             "samples_per_s": None, "data_wait_fraction": None,
             "extra": {"targets": {"targets": 9, "cut_tasks": {"masks": 2}, "dropped_items": {"boxes": 5}}}}
    text = format_summary({"run": "r", "llm": {"source": "x"}, "world_size": 1, "stages": [stage]})
    assert "segmentation: 9 targets vs dataset.max_text_tokens, items dropped to fit: boxes 5; " \
           "targets cut (content lost): masks 2" in text
