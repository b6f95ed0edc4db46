"""Does the random residual attention (Eq. 2-4) do a job? Measured on the residual world, over seeds.

The residual world (``astrea.train.worlds.residual_world``, issue 13.4) is a real 2-expert store: the
classification expert's tokens (``ram_plus``) carry each cell's colour and position but not where the
object is; the caption expert's tokens (``siglip``) carry only where the object is. The classification
stage's target is cumulative: ``caption: an object`` and ``tags: <colour of the object's cell>`` (one of 4
words): only reading the classification expert's tokens where the caption expert points answers it
(``--where-in-caption``: the caption says "object in cell r c", see the world's doc). For each seed (the
world's seed, the run's ``seed`` and ``llm.seed``), runs ``[caption, classification]`` (caption
``--caption-steps`` 100, classification ``--steps`` 600; batch 16, lr 3e-3) with a trainable tiny LLM:

- ``off``: ``residual.enabled=false`` (``--no-residual``, Tab. 4);
- ``on``: the defaults (``p = 0.5``), scored with each ``residual.at_eval`` reading on the same weights:
  ``expectation`` (Eq. 3-4 as printed, ``w = p`` in Q), ``average`` (``E_w[f'(w)]`` over the draws),
  ``all`` (``w = 1``);
- ``p1`` (``--variants on,off,p1``): ``residual.p = 1`` (no randomness; train = eval).

and prints, per seed and as mean +- sd over seeds: the classification stage's held-out L_reg (nats per
target token, as ``astrea eval``), the nats per sample on its caption and tags lines (``heldout.lines``),
the residual attention entropy on held-out images over log P, and ``obj``: the mean attention mass on the
object's cell (uniform = 1/P; the world's answer key, stored in siglip's outputs, no target reads it).

    .venv/bin/python benchmarks/residual_world.py --out /tmp/rw --seeds 0,1,2

Runs already in ``OUT/runs`` with the same config are reused (only evaluated again).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from astrea.train import TrainConfig, run
from astrea.train.eval import EvalConfig, evaluate, load_run
from astrea.train.worlds import residual_world

READINGS = ("expectation", "average", "all")
VARIANTS = {"on": {}, "off": {"residual.enabled": False}, "p1": {"residual.p": 1.0}}


def config(world: Path, out: Path, seed: int, steps: int, caption_steps: int, over: dict[str, Any]) -> TrainConfig:
    return TrainConfig.load(None, {
        "store": str(world), "data": "residual", "out": str(out), "stages": ["caption", "classification"],
        "steps": steps, "stage_steps": {"caption": caption_steps}, "batch_size": 16, "optim.lr": 3e-3, "llm.freeze": False, "llm.text_warmup_steps": 0,
        "progress": False, "save_every": 0, "dataset.heldout_fraction": 0.2, "seed": seed, "llm.seed": seed,
        **over,
    })


def train(cfg: TrainConfig) -> float:
    out = Path(cfg.out)
    done = out / "stages" / "classification" / "model.safetensors"
    if done.is_file() and _trained_as(TrainConfig.load(out / "config.yaml")) == _trained_as(cfg):
        return 0.0
    shutil.rmtree(out, ignore_errors=True)
    t = time.time()
    run(cfg)
    return time.time() - t


def _trained_as(cfg: TrainConfig) -> dict[str, Any]:
    """The config minus what only eval reads (residual.at_eval): equal means the same training."""
    d = cfg.to_dict()
    d["residual"].pop("at_eval", None)
    return d


@torch.no_grad()
def object_mass(run_dir: Path, reading: str) -> float | None:
    """Mean attention mass of the classification expert's residual attention on the object's cell."""
    from astrea.train.data import store_opener
    from astrea.train.eval import heldout_records

    lr = load_run(run_dir, residual_at_eval=reading)
    if not lr.cfg.residual.enabled:
        return None
    held = heldout_records(store_opener(lr.cfg.store, lr.cfg.data, ["siglip", "ram_plus"], seed=0, rank=0, world_size=1),
                           lr.cfg.dataset.heldout_fraction, 256)
    tok = {e: torch.from_numpy(__import__("numpy").stack([h["experts"][e]["tokens"] for h in held])).float()
           for e in ("siglip", "ram_plus")}
    obj = torch.tensor([int(h["experts"]["siglip"]["outputs"]["world_object_cell"]) for h in held])
    mod, model = lr.model.residuals["ram_plus"], lr.model
    c, f = model.project("siglip", tok["siglip"]), model.project("ram_plus", tok["ram_plus"])
    draws = [(w, p) for w, p in mod.eval_draws(1, f.device) if w.sum() > 0]
    total = sum(p for _, p in draws)
    mass = torch.zeros(len(obj))
    for w, p in draws:
        q, k = mod.q(mod.gamma * w[0] * c), mod.k(f)
        a = (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).softmax(-1).mean(1)  # [B, P] mean over rows
        mass += p / total * a[torch.arange(len(obj)), obj]
    return float(mass.mean())


def scores(run_dir: Path, reading: str = "") -> dict[str, Any]:
    m = evaluate(EvalConfig(run=str(run_dir), residual_at_eval=reading))
    ra = m["residual_attention"].get("classification", {}).get("ram_plus")
    lines = m["heldout"]["lines"]["classification"]
    return {
        "lreg": m["heldout"]["stages"]["classification"],
        "lreg_perm": m["heldout_permuted"]["stages"]["classification"],
        "caption": lines.get("caption"), "tags": lines.get("tags"),
        "entropy": ra["entropy"] / ra["log_P"] if ra else None,
        "obj": object_mass(run_dir, reading) if ra else None,
    }


def fmt(v: Any, f: str = ".4f") -> str:
    return "-" if v is None else format(v, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=600, help="classification stage steps")
    ap.add_argument("--caption-steps", type=int, default=100)
    ap.add_argument("--colours", type=int, default=4)
    ap.add_argument("--where-in-caption", action="store_true", help="the caption says which cell (see the world's doc)")
    ap.add_argument("--variants", default="on,off")
    ap.add_argument("--images", type=int, default=480)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        world = out / f"world_s{seed}"
        if not (world / ".done").is_file():
            shutil.rmtree(world, ignore_errors=True)
            residual_world(world, images=args.images, seed=seed, colours=args.colours,
                           where_in_caption=args.where_in_caption)
            (world / ".done").write_text("ok\n")
        for v in args.variants.split(","):
            run_dir = out / "runs" / f"{v}_s{seed}"
            secs = train(config(world, run_dir, seed, args.steps, args.caption_steps, VARIANTS[v]))
            for reading in (READINGS if v != "off" else ("",)):
                r = {"seed": seed, "variant": v, "at_eval": reading or "-", "train_s": round(secs), **scores(run_dir, reading)}
                rows.append(r)
                print(json.dumps(r), flush=True)
    (out / "residual_world.json").write_text(json.dumps(rows, indent=2))
    print()
    print("| seed | variant | at_eval | L_reg | L_reg permuted | caption nats | tags nats | entropy / log P | obj mass |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['seed']} | {r['variant']} | {r['at_eval']} | {fmt(r['lreg'])} | {fmt(r['lreg_perm'])} | "
              f"{fmt(r['caption'], '.3f')} | {fmt(r['tags'], '.3f')} | {fmt(r['entropy'], '.3f')} | {fmt(r['obj'], '.3f')} |")
    print()
    print("| variant | at_eval | L_reg mean +- sd | margin over off (mean, min over seeds) | caption nats | tags nats | entropy / log P |")
    print("|---|---|---:|---:|---:|---:|---:|")
    off = {r["seed"]: r["lreg"] for r in rows if r["variant"] == "off"}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["at_eval"]), []).append(r)

    def ms(vals: list[float], f: str = ".4f") -> str:
        vals = [v for v in vals if v is not None]
        if not vals:
            return "-"
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{format(statistics.mean(vals), f)} +- {format(sd, f)}"

    for (v, reading), rs in groups.items():
        margins = [off[r["seed"]] - r["lreg"] for r in rs if r["seed"] in off]
        marg = f"{statistics.mean(margins):.4f}, {min(margins):.4f}" if margins and v != "off" else "-"
        print(f"| {v} | {reading} | {ms([r['lreg'] for r in rs])} | {marg} | {ms([r['caption'] for r in rs], '.3f')} | "
              f"{ms([r['tags'] for r in rs], '.3f')} | {ms([r['entropy'] for r in rs], '.3f')} |")


if __name__ == "__main__":
    main()
