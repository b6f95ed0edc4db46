"""`astrea report` on the shared tiny run: PNGs that open, a markdown that embeds them and says 'random'."""

from __future__ import annotations

import json

from PIL import Image
from typer.testing import CliRunner

from astrea.cli import app
from astrea.train.report import plot_losses, plot_routing, report
from tests.train.test_eval import run_copy  # noqa: F401 - fixture


def test_report_writes_plots_and_markdown(run_copy):  # noqa: F811
    path = report(run_copy, eval_kwargs={"max_samples": 6, "batch_size": 3})
    md = path.read_text()
    for png in ("loss.png", "routing.png"):
        assert f"]({png})" in md
        with Image.open(run_copy / png) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    assert "RANDOM WEIGHTS" in md and "tiny-random" in md
    assert (run_copy / "eval.json").is_file()  # eval ran first because it was missing
    assert "| main |" in md and "image -> text" in md and "Routing" in md


def test_report_cli_without_eval(run_copy):  # noqa: F811
    r = CliRunner().invoke(app, ["report", str(run_copy), "--no-eval"])
    assert r.exit_code == 0, r.output
    md = (run_copy / "report.md").read_text()
    assert "No evaluation" in md and (run_copy / "loss.png").is_file()
    assert not (run_copy / "routing.png").exists()


def test_plots_from_plain_rows(tmp_path):
    rows = [
        {"kind": "heldout", "stage": "caption", "step": 0, "global_step": 0, "loss_reg": 5.0},
        *({"kind": "train", "stage": "caption", "step": i, "global_step": i, "loss_reg": 5 - 0.1 * i} for i in range(1, 5)),
        *({"kind": "train", "stage": "main", "step": i, "global_step": 4 + i, "loss_reg": 4.0, "loss_moco": 0.2} for i in range(1, 4)),
    ]
    assert plot_losses(rows, tmp_path / "l.png") and (tmp_path / "l.png").stat().st_size > 1000
    assert not plot_losses([], tmp_path / "none.png")
    routing = {
        "experts": ["a", "b"], "top_k": 1,
        "overall": {"tokens": 4, "mass": [0.5, 0.5]},
        "per_task": {"caption": {"tokens": 2, "mass": [1.0, 0.0]}, "tags": {"tokens": 0, "mass": [0.0, 0.0]}},
    }
    assert plot_routing(routing, tmp_path / "r.png")
    json.dumps(routing)
