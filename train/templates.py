"""Instruction templates: which tasks a stage asks for, and how prompt and target text look.

Each pre-alignment stage adds one task; its target holds the targets of every stage run so far
(paper 3.1.3: "caption, recognition", then + detection, then + segmentation). A rendered sample
(classification stage, i.e. caption + tags):

    prompt: "Instruction: caption, recognition.\\nAnswer:\\n"
    target: "caption: a dog runs on the grass\\ntags: dog, grass, ball</s>"

The visual tokens come before the prompt; only the target (and its EOS) carries loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from astrea.train.targets import TargetOptions, TargetStats, boxes_text, caption_text, masks_text, tags_text

TASKS = ("caption", "tags", "boxes", "masks")
# The stage each task belongs to, and the word the instruction uses for it (the paper's wording).
STAGE_TASK = {"caption": "caption", "classification": "tags", "detection": "boxes", "segmentation": "masks"}
TASK_WORD = {"caption": "caption", "tags": "recognition", "boxes": "detection", "masks": "segmentation"}

PROMPT = "Instruction: {tasks}.\nAnswer:\n"


@dataclass
class Rendered:
    prompt: str
    target: str
    task: str  # the stage's newest task (the main stage uses it to report routing per task type)


def render(
    sample: dict[str, Any],
    tasks: list[str],
    sources: dict[str, str],
    opts: TargetOptions,
    stats: TargetStats,
) -> Rendered | None:
    """Prompt + cumulative target for ``tasks`` (in stage order); None when nothing can be said.

    ``sources`` maps task -> store expert whose ``outputs`` hold its labels (tags -> ram_plus, ...).
    A missing caption drops the caption line (unlabelled data still trains the other tasks).
    """
    lines, words = [], []
    for task in tasks:
        text = _task_text(sample, task, sources, opts, stats)
        if text is None:
            continue
        lines.append(f"{task}: {text}")
        words.append(TASK_WORD[task])
    if not lines:
        return None
    return Rendered(PROMPT.format(tasks=", ".join(words)), "\n".join(lines), tasks[-1])


def _task_text(
    sample: dict[str, Any], task: str, sources: dict[str, str], opts: TargetOptions, stats: TargetStats
) -> str | None:
    if task == "caption":
        return caption_text(sample.get("caption"))
    expert = sources[task]
    rec = sample.get("experts", {}).get(expert)
    outputs = rec.get("outputs") if isinstance(rec, dict) else None
    if not isinstance(outputs, dict):
        stats.drop(f"{task}: no outputs from {expert}")
        return None
    if task == "tags":
        return tags_text(outputs, opts, stats)
    if task == "boxes":
        return boxes_text(outputs, opts, stats)
    if task == "masks":
        return masks_text(outputs, opts, stats)
    raise ValueError(f"unknown task {task!r}; tasks are {list(TASKS)}")
