"""`astrea demo` at its smallest size: every step runs and the report is written and honest."""

from __future__ import annotations

import json

import pytest

from astrea.demo import DemoConfig, run


def test_demo_targets_choice_is_checked_and_reaches_the_run():
    with pytest.raises(ValueError, match="targets='gt'.*dataset, experts"):
        DemoConfig(targets="gt").validate()
    assert DemoConfig().train_overrides("i.json")["target_sources"] == {"boxes": "dataset", "masks": "dataset"}
    assert DemoConfig(targets="experts").train_overrides("i.json")["target_sources"] == {}


def test_demo_smallest(tmp_path):
    report = run(DemoConfig(out=str(tmp_path / "demo"), images=6, shards=2, steps=2, batch_size=2, grid=4,
                            progress=False))
    text = report.read_text()
    assert text.startswith("# astrea demo report")
    assert "RANDOM" in text.split("\n## ", 1)[0]  # the random-weights warning comes first
    for expert in ("siglip", "ram_plus", "grounding_dino", "sam2"):
        assert f"| {expert} |" in text
    # the two deliberately broken sample members are counted per expert, not hidden
    assert "empty file" in text and "undecodable" in text
    assert "astrea extract --expert all" in text  # the real-weights commands
    # the permuted-image control per stage, and what the LLM is
    assert "## Does the model use the image?" in text and "L_reg, permuted images" in text
    assert "| caption |" in text.split("## Does the model use the image?")[1]
    assert "text only, no images" in text
    assert "targets\nfrom the sample's annotations (`--targets dataset`)" in text
    # the paper's order ends with the instruction-tuned main stage answering a question about an image
    gen = text.split("## Instruction tuning and `astrea generate`")[1].split("\n## ")[0]
    assert "astrea generate" in gen and "| question | answer generated | answer drawn |" in gen
    assert "Instructions: held-out answers" in text
    demo = json.loads((tmp_path / "demo" / "demo.json").read_text())
    run_dir = tmp_path / "demo" / "runs" / "001"
    assert demo["run"] == str(run_dir)
    for f in ("report.md", "eval.json", "loss.png", "routing.png", "summary.json"):
        assert (run_dir / f).is_file(), f
    # a rerun reuses sample and store and trains into a new run directory
    run(DemoConfig(out=str(tmp_path / "demo"), images=6, shards=2, steps=1, batch_size=2, grid=4, progress=False))
    assert (tmp_path / "demo" / "runs" / "002" / "report.md").is_file()
