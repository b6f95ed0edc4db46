"""Do Astrea's mechanisms work? One table, controls in the same run, several seeds (issue 13.7).

Each row trains through the real pipeline (store written with the store's writer -> `astrea.train.run` ->
`astrea eval`) on a generated world (astrea.train.worlds), CPU, tiny LLM:

1. **Image use** (every row): held-out L_reg with the true images and with each image's features replaced
   by another held-out image's (`heldout_permuted`); the gain is what the visual path contributes.
2. **Task routing** (routing world, main stage): held-out routing mass of each task's informative expert,
   for the instruction-reading router (default), the mean-prompt-embedding router, a router with no task
   signal, and uniform routing (no router).
3. **Residual attention** (residual world, caption -> classification): classification-stage held-out
   L_reg with the random residual attention and with `residual.enabled=false`, and the attention entropy
   (benchmarks/residual_world.py has the at_eval readings and p = 1 as well).

    .venv/bin/python benchmarks/learning.py [--seeds 0,1,2] [--only routing|residual] [--steps 300]

Random-weight tiny LLM; the worlds are generated, so the numbers say the mechanisms work as built,
not how well Astrea does on real images.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROUTERS = {  # variant -> moe overrides
    "instruction (default)": {},
    "mean prompt embedding": {"router_context": "embedding"},
    "no task signal": {"router_context": "none"},
    "uniform (no router)": {"router": "uniform"},
}


def _train_eval(store: Path, dataset: str, out: Path, over: dict[str, Any]) -> dict[str, Any]:
    from astrea.train import TrainConfig, run
    from astrea.train.eval import EvalConfig, evaluate

    base = {"store": str(store), "data": dataset, "out": str(out), "batch_size": 16, "optim.lr": 3e-3,
            "llm.freeze": False, "llm.text_warmup_steps": 0, "progress": False, "save_every": 0,
            "dataset.heldout_fraction": 0.2}
    run(TrainConfig.load(None, {**base, **over}))
    return evaluate(EvalConfig(run=str(out)))


def routing(seeds: list[int], steps: int, tmp: Path) -> list[dict[str, Any]]:
    from astrea.train.worlds import TASK_EXPERT, routing_world

    rows = []
    for seed in seeds:
        world = routing_world(tmp / f"routing{seed}", images=320, seed=seed)
        for name, moe in ROUTERS.items():
            t = time.perf_counter()
            m = _train_eval(world.store, world.dataset, tmp / f"r{seed}-{len(rows)}", {
                "stages": ["main"], "steps": steps, "seed": seed, "residual.enabled": False,
                "moco.enabled": False, "main.train_projectors": True, "moe": moe,
            })
            ro = m["routing"]
            mass = {t_: ro["per_task"][t_]["mass"][ro["experts"].index(e)] for t_, e in TASK_EXPERT.items()}
            rows.append({"seed": seed, "router": name, "mass": mass, "min_mass": min(mass.values()),
                         "lreg": m["heldout"]["main_mean"], "lreg_permuted": m["heldout_permuted"]["main_mean"],
                         "seconds": time.perf_counter() - t})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def residual(seeds: list[int], steps: int, tmp: Path) -> list[dict[str, Any]]:
    """benchmarks/residual_world.py's on/off runs (its defaults: caption 100 steps, classification 600)."""
    from astrea.train.worlds import residual_world

    rows = []
    for seed in seeds:
        world = residual_world(tmp / f"residual{seed}", images=480, seed=seed)
        for name, over in (("residual", {}), ("no residual", {"residual.enabled": False})):
            t = time.perf_counter()
            m = _train_eval(world.store, world.dataset, tmp / f"s{seed}-{len(rows)}", {
                "stages": ["caption", "classification"], "steps": 2 * steps, "stage_steps": {"caption": steps // 3},
                "seed": seed, "llm.seed": seed, **over,
            })
            att = ((m.get("residual_attention") or {}).get("classification") or {}).get("ram_plus") or {}
            lines = (m["heldout"].get("lines") or {}).get("classification") or {}
            rows.append({"seed": seed, "variant": name, "lreg": m["heldout"]["stages"]["classification"],
                         "lreg_permuted": m["heldout_permuted"]["stages"]["classification"],
                         "tags_nats": lines.get("tags"), "entropy": att.get("entropy"), "max_entropy": att.get("log_P"),
                         "seconds": time.perf_counter() - t})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _f(v: Any, fmt: str = ".3f") -> str:
    return format(v, fmt) if isinstance(v, int | float) else "-"


def table(rout: list[dict[str, Any]], res: list[dict[str, Any]]) -> str:
    lines = []
    if rout:
        lines += ["Task routing (routing world, main stage): held-out routing mass of the informative expert",
                  "", "| seed | router | caption->siglip | tags->ram_plus | boxes->grounding_dino | masks->sam2 | "
                  "min | L_reg | L_reg permuted |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rout:
            m = r["mass"]
            lines.append(f"| {r['seed']} | {r['router']} | {_f(m['caption'])} | {_f(m['tags'])} | {_f(m['boxes'])} | "
                         f"{_f(m['masks'])} | **{_f(r['min_mass'])}** | {_f(r['lreg'])} | {_f(r['lreg_permuted'])} |")
        lines.append("")
        for name in ROUTERS:
            mins = [r["min_mass"] for r in rout if r["router"] == name]
            lines.append(f"- {name}: min informative mass over tasks, mean over seeds {_f(statistics.mean(mins))} "
                         f"(worst seed {_f(min(mins))})")
        lines.append("")
    if res:
        lines += ["Residual attention (residual world, classification stage; `residual.at_eval: all`)", "",
                  "| seed | variant | L_reg | L_reg permuted | tags line, nats/sample | attention entropy (log P) |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in res:
            lines.append(f"| {r['seed']} | {r['variant']} | {_f(r['lreg'], '.4f')} | {_f(r['lreg_permuted'], '.4f')} | "
                         f"{_f(r['tags_nats'])} | {_f(r['entropy'])} ({_f(r['max_entropy'])}) |")
        seeds = sorted({r["seed"] for r in res})
        gaps = []
        for s in seeds:
            on = next(r["lreg"] for r in res if r["seed"] == s and r["variant"] == "residual")
            off = next(r["lreg"] for r in res if r["seed"] == s and r["variant"] == "no residual")
            gaps.append(off - on)
        lines += ["", f"- no residual - residual, per seed: {', '.join(_f(g) for g in gaps)} "
                      f"(mean {_f(statistics.mean(gaps))}, min {_f(min(gaps))})", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--only", choices=("routing", "residual"), default=None)
    ap.add_argument("--json", default="", help="also write the rows here")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rout = routing(seeds, a.steps, tmp) if a.only in (None, "routing") else []
        res = residual(seeds, a.steps, tmp) if a.only in (None, "residual") else []
    print()
    print(table(rout, res))
    if a.json:
        Path(a.json).write_text(json.dumps({"routing": rout, "residual": res}, indent=2))


if __name__ == "__main__":
    main()
