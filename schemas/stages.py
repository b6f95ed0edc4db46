"""The stage table: which pre-alignment stages exist, in which order, and what each one means.

Paper 3.1 aligns the experts coarse -> fine, one stage each: caption (SigLIP), classification (RAM++),
detection (Grounding-DINO), segmentation (SAM2); the main stage (MoE + MoCo, paper 3.2) comes last.
Each stage adds one target task to the instruction, and the later experts are prompted at extraction
by the earlier ones' stored outputs (tags prompt the detector, boxes the segmenter).

This is the only place that says so. It lives in schemas/, the lowest layer both sides import:
extract reads it for ``--expert all``, the extraction order and each expert's prerequisites; train
for the default ``stages``, ``stage_experts`` and ``target_sources``, the task of each stage, what
``all`` expands to and the instruction words; the CLI for ``astrea experts ls``.
tests/test_stage_table.py checks the table and that no other module writes the mapping again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import MappingProxyType

from astrea.registry import UnknownNameError

# train: every pre-alignment stage no earlier stage trained, at once (Tab. 6); extract: every default expert
ALL = "all"
MAIN = "main"  # the MoE / MoCo main stage (a plug-in stage of the trainer), after the pre-alignment stages
# ``target_sources.<task>: dataset``: the task's labels come from the dataset's own annotations (the
# store rows' ``labels``: COCO's boxes and masks, the sample's drawn objects), not from an expert
DATASET = "dataset"


@dataclass(frozen=True)
class StageDef:
    """One pre-alignment stage."""

    name: str  # as ``--stages`` and ``stage_experts`` spell it
    expert: str  # default store expert (expert registry name); ``stage_experts.<name>`` may name another
    task: str  # the target task the stage adds (a task line of the rendered target)
    instruction: str  # the word the instruction uses for the task (the paper's wording)
    # Expert whose stored ``outputs`` hold the task's labels (default ``target_sources.<task>``);
    # None: the dataset's own caption.
    target_source: str | None
    # Stages whose expert's stored outputs prompt this stage's expert at extraction (extracted first).
    prerequisites: tuple[str, ...] = ()
    # Other registered experts that serve this stage (paper Tab. 5), not part of ``--expert all``.
    alternatives: tuple[str, ...] = ()


# Coarse -> fine: the order of the table is the paper's stage order and the extraction order.
PRE_ALIGNMENT: tuple[StageDef, ...] = (
    StageDef("caption", "siglip", "caption", "caption", None),
    StageDef("classification", "ram_plus", "tags", "recognition", "ram_plus"),
    StageDef("detection", "grounding_dino", "boxes", "detection", "grounding_dino", prerequisites=("classification",)),
    StageDef("segmentation", "sam2", "masks", "segmentation", "sam2", prerequisites=("detection",),
             alternatives=("sam",)),
)

_BY_NAME = MappingProxyType({s.name: s for s in PRE_ALIGNMENT})
_BY_TASK = MappingProxyType({s.task: s for s in PRE_ALIGNMENT})

PRE_ALIGNMENT_STAGES: tuple[str, ...] = tuple(_BY_NAME)
EXPERT_ORDER: tuple[str, ...] = tuple(s.expert for s in PRE_ALIGNMENT)  # what ``--expert all`` extracts
TASKS: tuple[str, ...] = tuple(_BY_TASK)
# Every expert the table names (defaults and alternatives) -> the stage it serves.
STAGE_OF_EXPERT = MappingProxyType({e: s.name for s in PRE_ALIGNMENT for e in (s.expert, *s.alternatives)})


def stage(name: str) -> StageDef:
    """The pre-alignment stage ``name``; an unknown name is refused with the valid ones."""
    if name not in _BY_NAME:
        raise UnknownNameError("pre-alignment stage", name, list(PRE_ALIGNMENT_STAGES))
    return _BY_NAME[name]


def stage_of_task(task: str) -> StageDef:
    if task not in _BY_TASK:
        raise UnknownNameError("task", task, list(TASKS))
    return _BY_TASK[task]


def is_pre_alignment(name: str) -> bool:
    return name in _BY_NAME


def default_stages() -> list[str]:
    """All pre-alignment stages, then the main stage (the paper's order)."""
    return [*PRE_ALIGNMENT_STAGES, MAIN]


def default_stage_experts() -> dict[str, str]:
    """Stage -> the store expert that serves it (a fresh dict: configs merge and edit it)."""
    return {s.name: s.expert for s in PRE_ALIGNMENT}


def default_target_sources() -> dict[str, str]:
    """Task -> the store expert whose outputs hold its labels, for the tasks read from expert outputs."""
    return {s.task: s.target_source for s in PRE_ALIGNMENT if s.target_source is not None}


def reads_outputs(task: str) -> bool:
    """Whether the task's labels come from an expert's stored outputs (not from the dataset's caption)."""
    return stage_of_task(task).target_source is not None


def target_expert(task: str, sources: dict[str, str]) -> str | None:
    """The store expert whose outputs hold ``task``'s labels under ``sources`` (``target_sources``);
    None when no expert does: the caption, or a task read from the dataset's annotations."""
    if not reads_outputs(task):
        return None
    src = sources[task]
    return None if src == DATASET else src


def expand(stages: Iterable[str]) -> list[str]:
    """The pre-alignment stages of a stage order, in that order: ``all`` stands for every one of them,
    other stages (``main``, plug-ins) are left out, a repeat is kept once."""
    out: list[str] = []
    for s in stages:
        names = PRE_ALIGNMENT_STAGES if s == ALL else (s,) if s in _BY_NAME else ()
        out += [n for n in names if n not in out]
    return out


def expert_prerequisites(expert: str) -> tuple[str, ...]:
    """Experts whose stored outputs prompt ``expert`` at extraction: the default experts of the
    prerequisite stages of the stage it serves (() for an expert the table does not name)."""
    s = STAGE_OF_EXPERT.get(expert)
    return tuple(_BY_NAME[p].expert for p in _BY_NAME[s].prerequisites) if s else ()


__all__ = [
    "ALL", "DATASET", "EXPERT_ORDER", "MAIN", "PRE_ALIGNMENT", "PRE_ALIGNMENT_STAGES", "STAGE_OF_EXPERT", "TASKS", "StageDef",
    "default_stage_experts", "default_stages", "default_target_sources", "expand", "expert_prerequisites",
    "is_pre_alignment", "reads_outputs", "stage", "stage_of_task", "target_expert",
]
