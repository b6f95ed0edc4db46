"""Do stage targets fit ``dataset.max_text_tokens``? Measured on a real store, per stage, per text format.

For every pre-alignment stage (cumulative targets: caption, + tags, + boxes, + masks) and every record
of the store's dataset, renders the target as the trainer does and tokenises prompt + target + EOS
with the run's tokenizer (``tiny-random``: one token per byte, the binding case), then reports:

- ``whole``: the fraction of targets whose every task line keeps all its content (nothing cut);
- ``all items``: the fraction that also kept every object/tag (no item dropped to fit);
- ``cut <task>``: targets whose <task> line lost content to the cut; ``dropped <task>``: items dropped;
- target tokens (mean / max) as rendered, before fitting; text tokens into the LLM (BOS + prompt +
  target + EOS, after fitting and cutting; never above the limit).

Two settings: ``before`` = the pre-issue-13 text (``dataset.target_format=decimal``, no fitting, cut at
the limit) and ``after`` = the defaults (``compact``, ``fit_targets``). ``--labels`` renders the
dataset's own labels (the sample's scenes: 1-3 shapes with exact boxes and masks) in place of the
stored expert outputs, i.e. what well-behaved experts would say.

    .venv/bin/python benchmarks/targets_fit.py --store demo_out/store --data sample [--labels]

``--iou N`` instead (no store needed) decodes the masks of N generated scenes of the sample dataset
back from their text and prints the IoU with the true masks per shape, for the compact code (4x4 and
8x8) and the decimal polygon:

    .venv/bin/python benchmarks/targets_fit.py --iou 300
"""

from __future__ import annotations

import argparse
from typing import Any

from astrea.schemas.stages import PRE_ALIGNMENT_STAGES, TASKS
from astrea.train.config import TrainConfig
from astrea.train.data import Collator
from astrea.train.stages import build_stages

SETTINGS = {
    "before": {"dataset.target_format": "decimal", "dataset.fit_targets": False},
    "after": {},
}


def labels_as_outputs(rec: dict[str, Any]) -> dict[str, Any]:
    """A record whose expert outputs are replaced by the dataset's labels (where it has them)."""
    lab = rec.get("labels") or {}
    classes = lab.get("classes") or []
    out = {k: dict(v) for k, v in rec["experts"].items()}
    out["ram_plus"] = {**out.get("ram_plus", {}), "outputs": {"tags": list(lab.get("tags") or classes)}}
    out["grounding_dino"] = {**out.get("grounding_dino", {}), "outputs": {
        "boxes": list(lab.get("boxes") or []), "labels": list(classes), "scores": [1.0] * len(classes)}}
    out["sam2"] = {**out.get("sam2", {}), "outputs": {"masks": list(lab.get("masks") or [])}}
    return {**rec, "experts": out}


def measure(store: str, data: str, setting: dict[str, Any], *, labels: bool, llm: str, max_text_tokens: int) -> list[dict]:
    from astrea.shards import JoinedDataset, Store
    from astrea.train.llm import build_llm

    cfg = TrainConfig.load(None, {"store": store, "data": data, "out": "unused", "llm.name": llm,
                                  "stages": list(PRE_ALIGNMENT_STAGES),
                                  "dataset.max_text_tokens": max_text_tokens, **setting})
    tok = build_llm(cfg.llm).tokenizer
    stages = build_stages(cfg)
    experts = list(dict.fromkeys(e for s in stages for e in s.required_experts()))
    recs = list(JoinedDataset(Store(store), data, experts, shuffle=False))
    if labels:
        recs = [labels_as_outputs(r) for r in recs]
    rows = []
    for s in stages:
        c = Collator(s.render, tok, s.required_experts(), cfg.dataset.max_text_tokens, fit_targets=cfg.dataset.fit_targets)
        lengths, used, whole, all_items = [], [], 0, 0
        for rec in recs:
            r = s.render(rec)
            if r is None:
                continue
            before = (c.truncated, sum(c.dropped_items.values()))
            lengths.append(c.n_tokens(r.target))
            p, t, _ = c.encode(r)
            used.append(len(p) + len(t))
            whole += c.truncated == before[0]
            all_items += c.truncated == before[0] and sum(c.dropped_items.values()) == before[1]
        n = len(lengths)
        rows.append({"stage": s.name, "targets": n, "whole": whole / n if n else None,
                     "all_items": all_items / n if n else None, "cut": dict(c.cut_tasks),
                     "dropped": dict(c.dropped_items),
                     "tokens_mean": sum(lengths) / n if n else None, "tokens_max": max(lengths, default=None),
                     "used_max": max(used, default=None)})
    return rows


def mask_iou_table(scenes: int, seed: int = 123) -> None:
    import numpy as np

    from astrea.data.sample import _scene
    from astrea.train.targets import TargetOptions, TargetStats, decode_rle, mask_iou, masks_items, parse_masks

    rng = np.random.default_rng(seed)
    settings = {"compact 4x4": TargetOptions(), "compact 8x8": TargetOptions(mask_grid=8),
                "decimal polygon": TargetOptions(format="decimal")}
    vals: dict[tuple[str, str], list[float]] = {}
    nbytes: dict[str, list[int]] = {}
    for _ in range(scenes):
        _, _, lab = _scene(rng)
        truth = [decode_rle(m["rle"]) for m in lab["masks"]]
        for name, opts in settings.items():
            items = masks_items({"masks": lab["masks"]}, opts, TargetStats())
            nbytes.setdefault(name, []).extend(len(i) - len(c) for i, c in zip(items, lab["classes"], strict=True))
            for (_, m), t, c in zip(parse_masks("; ".join(items), truth[0].shape), truth, lab["classes"], strict=True):
                vals.setdefault((name, c.split()[1]), []).append(mask_iou(m, t))
    print(f"{scenes} scenes of the sample dataset (seed {seed}): IoU of the decoded mask with the true one, min / mean")
    print("| text | bytes per mask besides its label (mean) | circle | square | triangle |")
    print("|---|---:|---:|---:|---:|")
    for name in settings:
        cells = [f"{min(v):.3f} / {np.mean(v):.3f}" for v in (vals[(name, s)] for s in ("circle", "square", "triangle"))]
        print(f"| {name} | {np.mean(nbytes[name]):.1f} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store")
    ap.add_argument("--iou", type=int, default=0, help="decode N generated scenes' masks and print their IoU")
    ap.add_argument("--data", default="sample")
    ap.add_argument("--llm", default="tiny-random")
    ap.add_argument("--max-text-tokens", type=int, default=TrainConfig().dataset.max_text_tokens)
    ap.add_argument("--labels", action="store_true", help="render the dataset's labels instead of expert outputs")
    a = ap.parse_args()
    if a.iou:
        mask_iou_table(a.iou)
        return
    if not a.store:
        ap.error("--store is required (or --iou N)")
    print(f"store {a.store} dataset {a.data}, {'dataset labels' if a.labels else 'stored expert outputs'}, "
          f"llm {a.llm}, max_text_tokens {a.max_text_tokens}")
    print("| setting | stage | targets | whole (no line cut) | all items kept | target tokens mean / max "
          "| text tokens into the LLM, max | cut per task | items dropped per task |")
    print("|---|---|---:|---:|---:|---:|---:|---|---|")
    for name, setting in SETTINGS.items():
        for r in measure(a.store, a.data, setting, labels=a.labels, llm=a.llm, max_text_tokens=a.max_text_tokens):
            fmt = lambda d: ", ".join(f"{t} {d[t]}" for t in TASKS if d.get(t)) or "-"  # noqa: E731
            print(f"| {name} | {r['stage']} | {r['targets']} | {r['whole']:.2f} | {r['all_items']:.2f} | "
                  f"{r['tokens_mean']:.0f} / {r['tokens_max']} | {r['used_max']} | {fmt(r['cut'])} | {fmt(r['dropped'])} |")


if __name__ == "__main__":
    main()
