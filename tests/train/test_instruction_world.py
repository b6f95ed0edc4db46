"""Instruction tuning from the store works end to end (issue 16): the main stage (MoE + MoCo) trained on a
LLaVA-format instruction set about a store's images answers held-out questions from the image.

The instruction world (astrea.train.worlds) asks two questions per image whose answers are carried by the
features only (one by the caption expert, one by the classification expert). After CPU training, held-out
greedy answers must be right far more often with the true image than with another held-out image's
features (the permuted-image control, same run, same questions), and the answers' L_reg lower.
"""

from __future__ import annotations

import pytest

from astrea.train import TrainConfig, run
from astrea.train.eval import EvalConfig, evaluate
from astrea.train.worlds import instruction_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return instruction_world(tmp_path_factory.mktemp("instruction_world"), images=240, per_unit=80)


def test_instruction_tuned_main_stage_answers_from_the_image(world, tmp_path):
    w, instructions = world
    out = tmp_path / "run"
    summary = run(TrainConfig.load(None, {
        "store": str(w.store), "data": w.dataset, "out": str(out), "stages": ["main"], "steps": 200,
        "batch_size": 16, "optim.lr": 3e-3, "llm.freeze": False, "llm.text_warmup_steps": 0,
        "residual.enabled": False, "progress": False, "save_every": 0, "dataset.heldout_fraction": 0.2,
        "instructions.files": [str(instructions)],
        # MoCo on; its text side reads input embeddings: with the whole (random) LLM trained here, the "llm"
        # text encoder's gradient would pull the LLM towards the captions and away from the answers
        "main.train_projectors": True, "moco": {"mu": 0.1, "text_encoder": "embeddings"},
    }))
    (stage,) = summary["stages"]
    assert stage["extra"]["instructions"] == {"records": 252, "matched": 240, "images": 240, "text_only": 8,
                                              "unmatched": 4}
    assert stage["extra"]["targets"]["task_targets"] == {"instruction": stage["extra"]["targets"]["targets"]}
    m = evaluate(EvalConfig(run=str(out), instructions=[str(instructions)]))["instructions"]
    assert m["answers"] == 2 * m["conversations"] >= 60  # every turn of every held-out conversation scored
    assert m["accuracy"] >= 0.6, m
    assert m["accuracy"] > m["accuracy_permuted"] + 0.4, m
    assert m["lreg"] < m["lreg_permuted"] - 0.2, m
