"""Task routing emerges end to end (issue 13.3, paper Fig. 2): store -> trainer -> LLM -> eval.

The routing world (astrea.train.worlds) carries each task's answer in one expert's features only. After
CPU training of the main stage through the LLM, the held-out routing mass of each task's informative
expert must reach 0.6. The same check must fail for the two controls in the same conditions: a router
with no task signal (``router_context: none``, Eq. 9 read literally) and no router at all (uniform).
"""

from __future__ import annotations

import pytest

from astrea.train import TrainConfig, run
from astrea.train.eval import EvalConfig, evaluate
from astrea.train.worlds import TASK_EXPERT, routing_world

THRESHOLD = 0.6


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return routing_world(tmp_path_factory.mktemp("routing_world"), images=320, seed=0)


def train_and_eval(world, out, **moe) -> dict:
    cfg = TrainConfig.load(None, {
        "store": str(world.store), "data": world.dataset, "out": str(out), "stages": ["main"], "steps": 300,
        "batch_size": 16, "optim.lr": 3e-3, "llm.freeze": False, "llm.text_warmup_steps": 0,
        "residual.enabled": False, "progress": False, "save_every": 0, "dataset.heldout_fraction": 0.2,
        "moco.enabled": False, "main.train_projectors": True, "moe": moe,
    })
    run(cfg)
    return evaluate(EvalConfig(run=str(out)))


def informative_mass(metrics: dict) -> dict[str, float]:
    """task -> held-out routing mass of the expert that carries that task's answer."""
    ro = metrics["routing"]
    return {t: ro["per_task"][t]["mass"][ro["experts"].index(e)] for t, e in TASK_EXPERT.items()}


def routes_by_task(metrics: dict) -> bool:
    return all(m >= THRESHOLD for m in informative_mass(metrics).values())


def test_router_sends_each_task_to_the_expert_that_answers_it(world, tmp_path):
    m = train_and_eval(world, tmp_path / "run")
    mass = informative_mass(m)
    assert routes_by_task(m), f"informative-expert mass per task {mass}; want >= {THRESHOLD} each"
    # and the answers do come from the image: permuted features cost loss on every task
    for task, lreg in m["heldout"]["main"].items():
        assert m["heldout_permuted"]["main"][task] > lreg + 0.05, (task, lreg, m["heldout_permuted"]["main"][task])


def test_without_a_task_signal_routing_cannot_follow_the_task(world, tmp_path):
    m = train_and_eval(world, tmp_path / "run", router_context="none")
    masses = [st["mass"] for st in m["routing"]["per_task"].values()]
    assert all(x == pytest.approx(masses[0], abs=1e-6) for x in masses)  # the same mixture for every task
    assert not routes_by_task(m), informative_mass(m)


def test_uniform_routing_fails_the_same_check(world, tmp_path):
    m = train_and_eval(world, tmp_path / "run", router="uniform")
    assert not routes_by_task(m), informative_mass(m)
    assert all(v == pytest.approx(0.25) for v in informative_mass(m).values())
