"""Instruction templates: which tasks a stage asks for, and how prompt and target text look.

Each pre-alignment stage adds one task; its target holds the targets of every stage run so far
(paper 3.1.3: "caption, recognition", then + detection, then + segmentation). A rendered sample
(classification stage, i.e. caption + tags):

    prompt: "Instruction: caption, recognition.\\nAnswer:\\n"
    target: "caption: a dog runs on the grass\\ntags: dog, grass, ball</s>"

The visual tokens come before the prompt; only the target (and its EOS) carries loss.

Each task line is a list of items (the caption; tags; one item per object). When prompt + target would
not fit ``dataset.max_text_tokens``, :meth:`Rendered.fit` drops whole items, never a line or part of an
item: the last (lowest-ranked) item of the list line that costs the most tokens goes first, one at a
time, and every line keeps at least one item. Only when that is not enough is the target cut, and the
cut is counted per task (``astrea.train.data.Collator``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from astrea.schemas.stages import PRE_ALIGNMENT, TASKS, reads_outputs, target_expert
from astrea.train.targets import (
    NONE,
    TargetOptions,
    TargetStats,
    boxes_items,
    caption_text,
    dataset_outputs,
    masks_items,
    tags_items,
)

# The tasks (in stage order) and the word the instruction uses for each: the stage table's.
TASK_WORD = {s.task: s.instruction for s in PRE_ALIGNMENT}
SEPARATOR = {"caption": "", "tags": ", ", "boxes": "; ", "masks": "; "}

PROMPT = "Instruction: {tasks}.\nAnswer:\n"


@dataclass
class Rendered:
    prompt: str
    target: str
    task: str  # the stage's newest task (the main stage uses it to report routing per task type)
    # (task, items) per target line, in order; ``target`` is their text. Empty: the target is one
    # opaque string (a plug-in stage's own text) that fitting leaves alone.
    lines: list[tuple[str, list[str]]] = field(default_factory=list)

    def line_spans(self) -> list[tuple[str, int, int]]:
        """(task, start, end) character span of each task line in ``target``."""
        out, pos = [], 0
        for task, items in self.lines:
            n = len(line_text(task, items))
            out.append((task, pos, pos + n))
            pos += n + 1
        return out

    def fit(self, n_tokens: Callable[[str], int], room: int) -> tuple["Rendered", Counter]:
        """A copy whose target takes at most ``room`` tokens (``n_tokens(text)``), dropping whole items
        (see the module docstring); returns it and the items dropped per task. When even one item per
        line does not fit, the copy keeps one item per line and is still too long (the caller cuts it)."""
        dropped: Counter = Counter()
        if not self.lines or n_tokens(self.target) <= room:
            return self, dropped
        lines = [(t, list(items)) for t, items in self.lines]
        cost = [n_tokens(line_text(t, items)) for t, items in lines]
        while True:
            # separators (newlines) are cheap and tokenisers merge across lines: estimate, then check
            if sum(cost) + len(lines) - 1 <= room:
                target = "\n".join(line_text(t, items) for t, items in lines)
                if n_tokens(target) <= room:
                    break
            can = [i for i, (_, items) in enumerate(lines) if len(items) > 1]
            if not can:
                break
            i = max(can, key=lambda j: (cost[j], j))
            t, items = lines[i]
            items.pop()
            dropped[t] += 1
            cost[i] = n_tokens(line_text(t, items))
        target = "\n".join(line_text(t, items) for t, items in lines)
        return Rendered(self.prompt, target, self.task, lines), dropped


def line_text(task: str, items: list[str]) -> str:
    return f"{task}: {SEPARATOR[task].join(items) or NONE}"


def render(
    sample: dict[str, Any],
    tasks: list[str],
    sources: dict[str, str],
    opts: TargetOptions,
    stats: TargetStats,
) -> Rendered | None:
    """Prompt + cumulative target for ``tasks`` (in stage order); None when nothing can be said.

    ``sources`` maps task -> store expert whose ``outputs`` hold its labels (tags -> ram_plus, ...), or
    ``dataset`` for the row's own annotations (a row without them has no line for that task).
    A missing caption drops the caption line (unlabelled data still trains the other tasks).
    """
    lines, words = [], []
    for task in tasks:
        items = _task_items(sample, task, sources, opts, stats)
        if items is None:
            continue
        lines.append((task, items))
        words.append(TASK_WORD[task])
    if not lines:
        return None
    target = "\n".join(line_text(t, items) for t, items in lines)
    return Rendered(PROMPT.format(tasks=", ".join(words)), target, tasks[-1], lines)


def _task_items(
    sample: dict[str, Any], task: str, sources: dict[str, str], opts: TargetOptions, stats: TargetStats
) -> list[str] | None:
    """The task's items; [] renders as ``none``; None: the task has no line for this sample."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks are {list(TASKS)}")
    if not reads_outputs(task):  # the caption: the dataset's own text
        c = caption_text(sample.get("caption"))
        return None if c is None else [c]
    expert = target_expert(task, sources)
    if expert is None:  # target_sources.<task>: dataset
        outputs = dataset_outputs(sample.get("labels"), task, stats)
        if outputs is None:
            return None
    else:
        rec = sample.get("experts", {}).get(expert)
        outputs = rec.get("outputs") if isinstance(rec, dict) else None
        if not isinstance(outputs, dict):
            stats.drop(f"{task}: no outputs from {expert}")
            return None
    if task == "tags":
        return tags_items(outputs, opts, stats)
    if task == "boxes":
        return boxes_items(outputs, opts, stats)
    return masks_items(outputs, opts, stats)
