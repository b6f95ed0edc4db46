"""The stage table (astrea/schemas/stages.py): its invariants, that extract and train read it, and that
no other module of the package writes the stage -> expert vocabulary again (a scan of the source)."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
from pathlib import Path

import pytest

from astrea.extract.experts.registry import EXPERTS
from astrea.registry import UnknownNameError
from astrea.schemas import stages as st

_ROOT = Path(__file__).resolve().parents[1]
_TABLE = _ROOT / "schemas" / "stages.py"


# -- the table ---------------------------------------------------------------------------------------
def test_order_is_the_papers():
    assert st.PRE_ALIGNMENT_STAGES == ("caption", "classification", "detection", "segmentation")
    assert st.EXPERT_ORDER == ("siglip", "ram_plus", "grounding_dino", "sam2")
    assert st.TASKS == ("caption", "tags", "boxes", "masks")
    assert st.default_stages() == [*st.PRE_ALIGNMENT_STAGES, st.MAIN]
    for field in ("name", "expert", "task", "instruction"):
        values = [getattr(s, field) for s in st.PRE_ALIGNMENT]
        assert len(set(values)) == len(values), field


def test_every_expert_is_registered_and_serves_one_stage():
    named = [e for s in st.PRE_ALIGNMENT for e in (s.expert, *s.alternatives)]
    assert len(set(named)) == len(named)
    for e in named:
        assert e in EXPERTS.names(), e
    for s in st.PRE_ALIGNMENT:
        assert s.target_source is None or s.target_source in EXPERTS.names()
    assert dict(st.STAGE_OF_EXPERT) == {e: s.name for s in st.PRE_ALIGNMENT for e in (s.expert, *s.alternatives)}


def test_prerequisites_precede():
    names = list(st.PRE_ALIGNMENT_STAGES)
    for i, s in enumerate(st.PRE_ALIGNMENT):
        for p in s.prerequisites:
            assert p in names[:i], (s.name, p)
        for e in (s.expert, *s.alternatives):
            for pe in st.expert_prerequisites(e):
                assert st.EXPERT_ORDER.index(pe) < i, (e, pe)
    assert st.expert_prerequisites("grounding_dino") == ("ram_plus",)
    assert st.expert_prerequisites("sam") == st.expert_prerequisites("sam2") == ("grounding_dino",)
    assert st.expert_prerequisites("clip") == ()  # an expert the table does not name


def test_frozen_and_unknown_names_listed():
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.PRE_ALIGNMENT[0].expert = "clip"  # type: ignore[misc]
    with pytest.raises(TypeError):
        st.STAGE_OF_EXPERT["clip"] = "caption"  # type: ignore[index]
    assert st.default_stage_experts() is not st.default_stage_experts()  # callers get their own dict
    with pytest.raises(UnknownNameError) as e:
        st.stage("detectoin")
    assert "'detection'" in str(e.value) and all(n in str(e.value) for n in st.PRE_ALIGNMENT_STAGES)
    from astrea.train.stages import stage_class

    with pytest.raises(UnknownNameError) as e:
        stage_class("detectoin")
    assert all(n in str(e.value) for n in (*st.PRE_ALIGNMENT_STAGES, st.ALL))


def test_expand():
    assert st.expand(["caption", st.ALL, st.MAIN]) == list(st.PRE_ALIGNMENT_STAGES)
    assert st.expand(["segmentation", "detection", st.MAIN, "detection"]) == ["segmentation", "detection"]
    assert st.expand([st.MAIN]) == []


# -- everyone reads it -------------------------------------------------------------------------------
def test_extract_and_train_read_the_table():
    from astrea.extract.config import ExtractConfig
    from astrea.train.config import TrainConfig
    from astrea.train.templates import TASK_WORD
    from astrea.train.worlds import TASK_EXPERT

    assert ExtractConfig(experts=[st.ALL], data="x").expert_names() == list(st.EXPERT_ORDER)
    assert ExtractConfig(experts=["sam2,siglip", "sam"], data="x").expert_names() == ["siglip", "sam2", "sam"]
    cfg = TrainConfig()
    assert cfg.stages == st.default_stages()
    assert cfg.stage_experts == {s.name: s.expert for s in st.PRE_ALIGNMENT}
    assert cfg.target_sources == {"tags": "ram_plus", "boxes": "grounding_dino", "masks": "sam2"}
    assert TASK_WORD == {s.task: s.instruction for s in st.PRE_ALIGNMENT}
    assert TASK_EXPERT == {s.task: s.expert for s in st.PRE_ALIGNMENT}


def test_expert_classes_read_their_prerequisites_from_the_table():
    from astrea.extract.experts import grounding_dino, sam, sam2

    assert grounding_dino.GroundingDinoExpert.prerequisites == st.expert_prerequisites("grounding_dino")
    assert sam2.Sam2Expert.prerequisites == st.expert_prerequisites("sam2")
    assert sam.SamExpert.prerequisites == sam.PREREQUISITES == st.expert_prerequisites("sam")


# -- nobody else writes it ---------------------------------------------------------------------------
def _vocabulary():
    pairs = set()
    for s in st.PRE_ALIGNMENT:
        for e in (s.expert, *s.alternatives):
            pairs |= {(s.name, e), (e, s.name), (s.task, e)}
        pairs |= {(s.name, s.task), (s.task, s.name)}
    experts = {e for s in st.PRE_ALIGNMENT for e in (s.expert, *s.alternatives)}
    return pairs, set(st.PRE_ALIGNMENT_STAGES), experts, set(st.TASKS)


def _str(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def redeclarations(source: str, filename: str = "<src>") -> list[str]:
    """Places in ``source`` that write the stage vocabulary: a dict literal, or a call's adjacent
    arguments, pairing a stage with its expert or task (or a task with its source expert); a
    tuple/list/set literal naming two or more stages, stage experts or tasks (an order); a
    ``*prereq*`` name bound to a literal naming an expert."""
    pairs, stage_names, experts, tasks = _vocabulary()
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values, strict=True):
                if k is not None and (_str(k), _str(v)) in pairs:
                    found.append(f"{where}: mapping {_str(k)!r}: {_str(v)!r}")
        elif isinstance(node, ast.Call):
            args = [_str(a) for a in node.args]
            if any(pair in pairs for pair in zip(args, args[1:])):
                found.append(f"{where}: row {[a for a in args if a]}")
        elif isinstance(node, ast.Tuple | ast.List | ast.Set):
            words = {_str(e) for e in node.elts} - {None}
            if any(len(words & vocab) >= 2 for vocab in (stage_names, experts, tasks)):
                found.append(f"{where}: order {sorted(words)}")
        elif isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [ast.unparse(t) for t in targets]
            if any("prereq" in n.lower() for n in names):
                words = {_str(e) for e in ast.walk(node.value)} - {None}
                if words & experts:
                    found.append(f"{where}: prerequisites {sorted(words & experts)}")
    return found


def _package_files() -> list[Path]:
    spec = importlib.util.spec_from_file_location("import_graph", _ROOT / "tools" / "import_graph.py")
    ig = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ig)
    return sorted(set(ig.modules().values()))


def test_no_module_but_the_table_declares_the_vocabulary():
    files = _package_files()
    assert len(files) > 50 and _TABLE in files  # the scan sees the package (a wrong root would pass vacuously)
    found = [f for p in files if p != _TABLE for f in redeclarations(p.read_text(), str(p.relative_to(_ROOT)))]
    assert found == [], "the stage vocabulary belongs in astrea/schemas/stages.py:\n" + "\n".join(found)
    assert len(redeclarations(_TABLE.read_text())) >= len(st.PRE_ALIGNMENT)  # the scan recognises the table


def test_the_scan_sees_the_old_declarations():
    """The shapes the vocabulary had before the table (train/config.py, extract/run.py, the registry,
    train/templates.py, the expert classes) are found; an unrelated dict or tuple is not."""
    old = '''
PRE_ALIGNMENT_STAGES = ("caption", "classification", "detection", "segmentation")
DEFAULT_STAGE_EXPERTS = {"caption": "siglip", "detection": "grounding_dino"}
DEFAULT_TARGET_SOURCES = {"tags": "ram_plus"}
PREREQUISITES = {"grounding_dino": ("ram_plus",), "sam2": ("grounding_dino",)}
EXPERT_ORDER = ["siglip", "ram_plus"]
STAGE_OF_EXPERT = {"sam": "segmentation"}
STAGE_TASK = {"classification": "tags"}
class X:
    prerequisites = ("ram_plus",)
row = Stage("detection", "grounding_dino", "boxes")
TASKS = ("caption", "tags", "boxes", "masks")
ok = {"tags": ", ", "caption": "", "siglip": 2}, ("caption", "all"), ["sam2"]
'''
    found = redeclarations(old)
    assert sorted({int(f.split(":")[1]) for f in found}) == [2, 3, 4, 5, 6, 7, 8, 10, 11, 12], found
