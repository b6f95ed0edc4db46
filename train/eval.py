"""`astrea eval RUN`: held-out metrics of a finished (or interrupted) training run.

Writes ``RUN/eval.json`` and ``RUN/eval.md``:

- ``heldout.stages[<stage>]``: held-out L_reg (Eq. 1, mean per target token) of every pre-alignment stage,
  with its own cumulative targets and visual path, using the run's final weights;
- ``heldout.main[<task>]``: the main stage's held-out L_reg per task type (caption, tags, boxes, masks),
  every held-out image asked every task; ``heldout.main_mean`` weights tasks by their target tokens;
- ``retrieval``: image->text and text->image R@1 / R@5 with the MoCo online embeddings over the held-out
  images that have a caption (``gallery`` of them; chance is k / gallery);
- ``routing``: per-expert routing mass overall and per task type, mean router entropy (nats; the
  maximum is log k) and load balance (1 = even, n = all on one expert).

The held-out split is the run's own (hash of the key, ``dataset.heldout_fraction``), and the store must
still hold the exact expert fingerprints the run trained on (checked before anything is computed).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from astrea.train.errors import TrainError

EVAL_JSON = "eval.json"
EVAL_MD = "eval.md"


@dataclass
class EvalConfig:
    run: str
    # held-out images scored, read once and kept in memory (features of every expert) for all stages/tasks;
    # the run's dataset.heldout_max is not a cap here
    max_samples: int = 256
    batch_size: int = 16
    device: str = "auto"
    store: str = ""  # the store moved since training: its new path
    weights: str = ""  # a stage weights file / checkpoint dir; default: the run's newest weights

    def validate(self) -> None:
        if self.max_samples < 1:
            raise TrainError(f"eval max_samples={self.max_samples} must be >= 1")
        if self.batch_size < 1:
            raise TrainError(f"eval batch_size={self.batch_size} must be >= 1")


@dataclass
class LoadedRun:
    """A run rebuilt for evaluation: config, model with its trained weights, stages, run.json."""

    cfg: Any
    model: Any
    stages: list[Any]
    info: dict[str, Any]
    weights: str
    device: torch.device


def load_run(run: str | Path, *, device: str = "auto", store: str = "", weights: str = "") -> LoadedRun:
    from safetensors.torch import load_file

    from astrea.train.config import TrainConfig
    from astrea.train.llm import TINY, build_llm
    from astrea.train.model import AstreaModel
    from astrea.train.runner import _device
    from astrea.train.stages import build_stages
    from astrea.train.store_check import resolve_experts

    run_dir = Path(run)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise TrainError(f"{run_dir} is not a training run (no config.yaml); give the --out directory of `astrea train`")
    cfg = TrainConfig.load(cfg_path)
    if store:
        cfg.store = store
    info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    stages = build_stages(cfg)
    needed: dict[str, str] = {}
    for s in stages:
        for e in s.required_experts():
            needed.setdefault(e, f"stage {s.name}")
    # the features the run trained on, exactly: same fingerprints as recorded in run.json
    expected = {**info.get("experts", {}), **cfg.expected_fingerprints}
    specs = resolve_experts(cfg.store, cfg.data, list(needed), {e: expected[e] for e in needed if e in expected}, needed_by=needed)
    for s in stages:
        s.ctx.specs = dict(specs)
    llm_dir = run_dir / "llm"
    llm = build_llm(cfg.llm, from_dir=llm_dir if (cfg.llm.name == TINY and llm_dir.is_dir()) else None)
    model = AstreaModel(llm, {n: s.token_dim for n, s in specs.items()}, cfg)
    for s in stages:
        s.build(model)
    wpath = _weights_file(run_dir, cfg.stages, weights)
    sd = {k: v for k, v in load_file(str(wpath)).items() if not k.startswith("stage.")}
    try:
        model.load_astrea_state_dict(sd, strict=True)
    except (KeyError, ValueError) as e:
        raise TrainError(f"{wpath} does not fit the model the run's config.yaml builds: {e.args[0] if e.args else e}") from None
    dev = _device(device)
    model.to(dev)
    model.eval()
    return LoadedRun(cfg, model, stages, info, str(wpath), dev)


def _weights_file(run_dir: Path, stages: list[str], weights: str) -> Path:
    if weights:
        p = Path(weights)
        p = p / "model.safetensors" if p.is_dir() else p
        if not p.is_file():
            raise TrainError(f"--weights {weights}: no such weights file (or directory with model.safetensors)")
        return p
    for name in reversed(stages):  # the last finished stage holds every part trained so far
        p = run_dir / "stages" / name / "model.safetensors"
        if p.is_file():
            return p
    from astrea.train.checkpoint import CheckpointDir

    latest = CheckpointDir(run_dir).latest()
    if latest is not None and (latest / "model.safetensors").is_file():
        return latest / "model.safetensors"
    raise TrainError(f"{run_dir} has no trained weights yet (no stages/*/model.safetensors, no checkpoint)")


# -- metrics ----------------------------------------------------------------------------------------
def recall_at_k(sim: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """R@k of the diagonal for a square similarity [N, N] (row i's match is column i).

    Ties count against the match (rank = number of columns scoring >= the match, minus one), so a
    constant similarity gives chance-or-worse, never a perfect score."""
    n = sim.shape[0]
    diag = sim.diagonal()[:, None]
    rank = (sim >= diag).sum(1) - 1  # 0 = the match is strictly first
    return {f"R@{k}": float((rank < k).float().mean()) for k in ks if n > 0}


def retrieval_metrics(q_v: torch.Tensor, q_t: torch.Tensor) -> dict[str, Any]:
    sim = q_v.float() @ q_t.float().t()
    n = sim.shape[0]
    return {
        "gallery": n,
        "image_to_text": recall_at_k(sim),
        "text_to_image": recall_at_k(sim.t()),
        "chance": {"R@1": 1 / n if n else math.nan, "R@5": min(5, n) / n if n else math.nan},
    }


def heldout_records(open_epoch: Any, fraction: float, max_samples: int) -> list[dict[str, Any]]:
    """The first ``max_samples`` held-out records of an unshuffled pass (the trainer's split and order)."""
    from astrea.train.data import is_heldout

    out = []
    for rec in open_epoch(0, False):
        if is_heldout(rec["key"], fraction):
            out.append(rec)
            if len(out) >= max_samples:
                break
    return out


class _LossSum:
    def __init__(self) -> None:
        self.loss, self.tokens, self.samples = 0.0, 0, 0

    def add(self, loss: torch.Tensor, n: torch.Tensor, samples: int) -> None:
        self.loss += float(loss) * int(n)
        self.tokens += int(n)
        self.samples += samples

    def value(self) -> float | None:
        return self.loss / self.tokens if self.tokens else None


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out = dict(batch)
    for k in ("input_ids", "attention_mask", "labels"):
        out[k] = batch[k].to(device)
    for k in ("tokens", "pooled"):
        out[k] = {e: t.to(device).float() for e, t in batch[k].items()}
    return out


@torch.no_grad()
def evaluate(ecfg: EvalConfig) -> dict[str, Any]:
    """Compute the metrics, write RUN/eval.json and RUN/eval.md, and return the metrics."""
    from astrea.train.data import Collator, StoreReadLog, store_opener
    from astrea.train.metrics import dumps_strict
    from astrea.train.main_stage import MainStage
    from astrea.train.moe import RoutingStats

    ecfg.validate()
    lr = load_run(ecfg.run, device=ecfg.device, store=ecfg.store, weights=ecfg.weights)
    cfg, model = lr.cfg, lr.model
    frac = cfg.dataset.heldout_fraction
    if frac <= 0:
        raise TrainError(f"the run has dataset.heldout_fraction={frac}: it kept no held-out images to evaluate on")

    # One pass over the store collects the held-out records with every expert any stage reads; each stage
    # and task then collates them from memory (8 passes over a large store would read it 8 times).
    union = list(dict.fromkeys(e for s in lr.stages for e in s.required_experts()))
    store_log = StoreReadLog(skip_damaged=cfg.dataset.skip_damaged)
    held = heldout_records(store_opener(cfg.store, cfg.data, union, seed=cfg.seed, rank=0, world_size=1, log=store_log),
                           frac, ecfg.max_samples)

    def scored(stage, render):
        collate = Collator(render, model.tokenizer, stage.required_experts(), cfg.dataset.max_text_tokens)
        for i in range(0, len(held), ecfg.batch_size):
            b = collate(held[i : i + ecfg.batch_size])
            if b is not None:
                yield b

    def lreg(stage, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        visual = stage.visual_tokens(model, batch)
        loss, n = model.lm_loss(visual, batch["input_ids"], batch["attention_mask"], batch["labels"])
        return loss, n, visual

    out: dict[str, Any] = {
        "run": str(lr.cfg.out or ecfg.run),
        "weights": lr.weights,
        "llm": lr.info.get("llm", {"source": cfg.llm.name}),
        "experts_random_weights": lr.info.get("experts_random_weights", {}),
        "heldout_fraction": frac,
        "heldout": {"stages": {}, "main": {}, "main_mean": None, "samples": {}},
        "retrieval": None,
        "routing": None,
        "notes": [],
        "store": store_log.to_dict(),
    }
    for stage in lr.stages:
        if isinstance(stage, MainStage):
            continue
        acc = _LossSum()
        for b in scored(stage, stage.render):
            b = _to_device(b, lr.device)
            loss, n, _ = lreg(stage, b)
            acc.add(loss, n, len(b["keys"]))
        out["heldout"]["stages"][stage.name] = acc.value()
        out["heldout"]["samples"][stage.name] = acc.samples

    main = next((s for s in lr.stages if isinstance(s, MainStage)), None)
    if main is None:
        out["notes"].append("the run has no main stage: no routing or retrieval metrics")
    else:
        names = list(main.experts)
        per_task = {t: RoutingStats(len(names), main.mc.top_k) for t in main.mc.tasks}
        total = _LossSum()
        q_v, q_t = [], []
        moco = model.extras["moco"] if "moco" in model.extras else None
        for task in main.mc.tasks:
            acc = _LossSum()
            for b in scored(main, main.render_task(task)):
                b = _to_device(b, lr.device)
                loss, n, visual = lreg(main, b)
                acc.add(loss, n, len(b["keys"]))
                total.add(loss, n, len(b["keys"]))
                per_task[task].add(main.last_output.probs)
                if task == "caption" and moco is not None:
                    rows = main.caption_rows(b)
                    if rows:
                        idx = torch.tensor(rows, device=lr.device)
                        text = main.text_features(model, [b["captions"][i] for i in rows], lr.device)
                        v, t = moco.embed(visual.float().mean(1).index_select(0, idx), text)
                        q_v.append(v.cpu())
                        q_t.append(t.cpu())
            out["heldout"]["main"][task] = acc.value()
            out["heldout"]["samples"][f"main/{task}"] = acc.samples
        out["heldout"]["main_mean"] = total.value()
        overall = RoutingStats(len(names), main.mc.top_k)
        for st in per_task.values():
            overall.tokens += st.tokens
            overall.mass += st.mass
            overall.selected += st.selected
            overall.entropy += st.entropy
        out["routing"] = {
            "experts": names,
            "top_k": main.mc.top_k,
            "overall": overall.summary(),
            "per_task": {t: st.summary() for t, st in per_task.items()},
        }
        if moco is None:
            out["notes"].append("trained with extras.no_moco: no MoCo embeddings, no retrieval metrics")
        elif q_v and sum(len(x) for x in q_v) >= 2:
            out["retrieval"] = retrieval_metrics(torch.cat(q_v), torch.cat(q_t))
        else:
            out["notes"].append("fewer than 2 held-out images with a caption: no retrieval metrics")
    if lr.info.get("llm", {}).get("random_weights") or any(out["experts_random_weights"].values()):
        out["notes"].append(
            "RANDOM WEIGHTS: the LLM and/or the experts had random weights; these numbers test the pipeline, "
            "they say nothing about the method's quality"
        )
    run_dir = Path(ecfg.run)
    (run_dir / EVAL_JSON).write_text(dumps_strict(out))
    (run_dir / EVAL_MD).write_text(eval_markdown(out))
    return out


# -- markdown ---------------------------------------------------------------------------------------
def _f(v: Any, fmt: str = ".4f") -> str:
    return format(v, fmt) if isinstance(v, int | float) and not (isinstance(v, float) and math.isnan(v)) else "-"


def eval_markdown(m: dict[str, Any], *, heading: str = "#") -> str:
    lines = [f"{heading} Evaluation of `{m['run']}`", ""]
    for note in m.get("notes", []):
        lines.append(f"> {note}")
    lines += ["", f"Weights: `{m['weights']}`; held-out fraction {m['heldout_fraction']}.", ""]
    h = m["heldout"]
    if h["stages"]:
        lines += [f"{heading}# Held-out L_reg per pre-alignment stage", "", "| stage | L_reg | images |", "|---|---:|---:|"]
        lines += [f"| {s} | {_f(v)} | {h['samples'].get(s, 0)} |" for s, v in h["stages"].items()]
        lines.append("")
    if h["main"]:
        lines += [f"{heading}# Main stage: held-out L_reg per task type", "", "| task | L_reg | images |", "|---|---:|---:|"]
        lines += [f"| {t} | {_f(v)} | {h['samples'].get('main/' + t, 0)} |" for t, v in h["main"].items()]
        lines += [f"| **all (token-weighted)** | {_f(h['main_mean'])} | |", ""]
    r = m.get("retrieval")
    if r:
        lines += [
            f"{heading}# Image-text retrieval (MoCo embeddings, gallery {r['gallery']})", "",
            "| direction | R@1 | R@5 |", "|---|---:|---:|",
            f"| image -> text | {_f(r['image_to_text'].get('R@1'), '.3f')} | {_f(r['image_to_text'].get('R@5'), '.3f')} |",
            f"| text -> image | {_f(r['text_to_image'].get('R@1'), '.3f')} | {_f(r['text_to_image'].get('R@5'), '.3f')} |",
            f"| chance | {_f(r['chance']['R@1'], '.3f')} | {_f(r['chance']['R@5'], '.3f')} |", "",
        ]
    ro = m.get("routing")
    if ro:
        names = ro["experts"]
        lines += [
            f"{heading}# Routing (top-{ro['top_k']} of {len(names)} experts)", "",
            "| prompts | " + " | ".join(names) + " | entropy | load balance |",
            "|---|" + "---:|" * (len(names) + 2),
        ]
        rows = [("all", ro["overall"])] + list(ro["per_task"].items())
        for t, st in rows:
            lines.append(
                f"| {t} | " + " | ".join(_f(x, ".3f") for x in st["mass"]) + f" | {_f(st['entropy'], '.3f')} | {_f(st['load_balance'], '.3f')} |"
            )
        lines += ["", "Entropy in nats (max log k); load balance 1 = even, n = all tokens on one expert.", ""]
    return "\n".join(lines) + "\n"
