"""One run builder (train/build.py) for training, eval and generate; eval reads stages through methods.

The first two tests read the source: the run's parts (stages, the store's specs, the LLM, the Astrea model)
are constructed in train/build.py alone, so a change there reaches training, eval and generate together,
and eval never asks which class a stage is. The last one runs those stage methods on the real tiny model.
"""

from __future__ import annotations

import ast
from pathlib import Path

import torch

from astrea.train.config import TrainConfig
from astrea.train.data import Collator
from astrea.train.llm import build_llm
from astrea.train.model import AstreaModel
from astrea.train.stages import build_stages
from tests.train.test_main_stage import DIMS, P, records

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ("astrea", "train", "extract", "shards", "schemas")
# what building a run means; sweep.py builds stages only to check a variant's config before it runs
CONSTRUCTORS = {"build_llm": {"train/build.py"}, "AstreaModel": {"train/build.py"},
                "resolve_experts": {"train/build.py"}, "build_stages": {"train/build.py", "train/sweep.py"}}


def _calls(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            f = node.func
            names.add(f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else "")
    return names


def test_only_the_builder_constructs_the_run():
    found: dict[str, set[str]] = {name: set() for name in CONSTRUCTORS}
    for folder in PACKAGE:
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            for name in _calls(path) & set(CONSTRUCTORS):
                found[name].add(rel)
    assert found["AstreaModel"], "the scan found no constructor call at all (wrong root?)"
    stray = {name: sorted(where - CONSTRUCTORS[name]) for name, where in found.items() if where - CONSTRUCTORS[name]}
    assert not stray, f"the run is built outside train/build.py: {stray}"
    for user in ("train/runner.py", "train/loaded_run.py"):
        assert {"plan_run", "build_model"} <= _calls(ROOT / user), user


def test_eval_reads_stages_through_their_methods_only():
    tree = ast.parse((ROOT / "train/eval.py").read_text())
    checked = [ast.unparse(n.args[1]) for n in ast.walk(tree)
               if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "isinstance" and len(n.args) == 2]
    assert checked and not [c for c in checked if "Stage" in c], checked  # numbers are checked; stages never
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert "MainStage" not in imported and "AlignStage" not in imported
    private = sorted({n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr.startswith("_")
                      and not n.attr.startswith("__")})
    assert not private, f"eval reads private attributes {private}"
    # the main stage's own config sections and MoE output are its business
    attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not attrs & {"moe_cfg", "main_cfg", "moco_cfg", "last_output", "extras"}


def _built(**sections):
    cfg = TrainConfig.from_dict({"store": "x", "data": "x", "out": "x",
                                 "stages": ["caption", "classification", "main"],
                                 "moe": {"top_k": 2}, "moco": {"queue_size": 16, "embed_dim": 8}, **sections})
    torch.manual_seed(0)
    model = AstreaModel(build_llm(cfg.llm), DIMS, cfg)
    stages = build_stages(cfg)
    for s in stages:
        s.build(model)
    model.eval()
    return cfg, model, stages


def _batch(model, stage):
    return Collator(stage.render, model.tokenizer, stage.required_experts(), 256)(records(5))


@torch.no_grad()
def test_the_stage_methods_eval_reads():
    from astrea.train.stages import Routing

    cfg, model, (cap, cls, main) = _built()
    # a pre-alignment stage does not route; its residual context is the experts aligned before it
    assert cap.routing() is None and cls.routing() is None and not cls.has_retrieval(model)
    assert cls.context_experts == [cfg.stage_experts["caption"]] and cap.context_experts == []
    b = _batch(model, cls)
    ent = cls.residual_entropy(model, b)
    assert list(ent) == [cfg.stage_experts["classification"]] and ent[cfg.stage_experts["classification"]].shape == (5,)
    assert cap.residual_entropy(model, _batch(model, cap)) == {}
    assert cls.retrieval_embeddings(model, b, cls.visual_tokens(model, b)) is None
    # the main stage routes over the experts aligned before it, in their order, and embeds captions
    experts = [cfg.stage_experts["caption"], cfg.stage_experts["classification"]]
    assert main.routing() == Routing(experts, 2)
    b = _batch(model, main)
    visual = main.visual_tokens(model, b)
    probs = main.routing_probs()
    assert probs.shape == (5, P, 2) and torch.allclose(probs.sum(-1), torch.ones(5, P))
    v, t, captions = main.retrieval_embeddings(model, b, visual)
    assert captions == b["captions"] and v.shape == t.shape == (5, cfg.moco.embed_dim)
    # one task alone, as eval asks it: the same text whichever stage renders it
    rec = records(1)[0]
    assert main.render_task("caption")(rec) == cap.render_task("caption")(rec)
    _, model, stages = _built(moco={"enabled": False})
    assert not stages[-1].has_retrieval(model)
    assert stages[-1].retrieval_embeddings(model, b, visual) is None
