"""Image gain of every pre-alignment stage on a demo store, for several training settings and seeds, in one run.

For each setting and seed, trains on the same store with ``astrea demo``'s own training settings
(``DemoConfig.train_overrides``: 300 steps per stage, batch 4, lr 1e-3, the whole LLM trained after a
400-step text-only warm-up, detection and segmentation targets from the sample's annotations, the main
stage instruction-tuned), then runs ``astrea eval`` and prints per pre-alignment stage: held-out L_reg
with true and permuted images, the image gain per target token, and the image gain per *target* (nats
per whole target text, summed over its tokens), which does not depend on how the text is cut into
tokens. A last table gives each setting's mean and spread over the seeds.

A setting is ``demo`` or ``demo`` plus changes joined by ``+`` (comma-separated ``--settings``):
  experts    detection / segmentation targets from the random-weight Grounding-DINO / SAM2 predictions
             (``astrea demo --targets experts``; before this setting existed, the only targets)
  steps100   100 steps per stage (the demo's count before it moved to 300)
  prealign   the 4 pre-alignment stages only: no main stage after them
  bytes      the byte tokenizer instead of the fitted BPE

Eval scores each pre-alignment stage's own visual path with the *final* LLM; when the main stage trains
the LLM after them that is the LLM the main stage left, which is what ``prealign`` isolates.

    astrea demo --out demo_out            # once, for its store (or any store of the sample)
    .venv/bin/python benchmarks/image_gain.py --store demo_out/store \
        --instructions demo_out/sample/instructions.json --settings demo,demo+experts --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

PRE_ALIGNMENT = ["caption", "classification", "detection", "segmentation"]
CHANGES = {
    "experts": {"target_sources": {}},
    "steps100": {"steps": 100},
    "prealign": {"stages": PRE_ALIGNMENT, "instructions.files": [], "instructions.with_targets": False},
    "bytes": {"llm.tokenizer": "bytes"},
}


def overrides(setting: str, instructions: str) -> dict:
    from astrea.demo import DemoConfig

    base, *changes = setting.split("+")
    if base != "demo":
        raise SystemExit(f"setting {setting!r}: start with 'demo' (then +{' +'.join(CHANGES)})")
    out = {**DemoConfig().train_overrides(instructions), "progress": False}
    for c in changes:
        if c not in CHANGES:
            raise SystemExit(f"setting {setting!r}: unknown change {c!r}; choose from {', '.join(CHANGES)}")
        out.update(CHANGES[c])
    return out


def one(store: str, data: str, extra: dict, out: Path, seed: int) -> dict:
    from astrea.train import TrainConfig
    from astrea.train import run as train_run
    from astrea.train.eval import EvalConfig, evaluate

    t = time.monotonic()
    train_run(TrainConfig.load(None, {**extra, "store": store, "data": data, "out": str(out), "seed": seed}))
    e = evaluate(EvalConfig(run=str(out)))
    rows = {}
    h, hp = e["heldout"], e["heldout_permuted"]
    for stage, true in h["stages"].items():
        perm = hp["stages"][stage]
        lines, plines = h["lines"][stage], hp["lines"][stage]
        rows[stage] = (true, perm, perm - true, sum(plines.values()) - sum(lines.values()))
    return {"rows": rows, "seconds": time.monotonic() - t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--data", default="sample")
    ap.add_argument("--settings", default="demo,demo+experts")
    ap.add_argument("--instructions", required=True, help="the sample's instructions.json (demo_out/sample/)")
    ap.add_argument("--seeds", default="0")
    a = ap.parse_args()
    settings, seeds = a.settings.split(","), [int(s) for s in a.seeds.split(",")]
    extras = {s: overrides(s, a.instructions) for s in settings}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for s in settings:
            for seed in seeds:
                results[s, seed] = one(a.store, a.data, extras[s], Path(tmp) / f"{s}-{seed}", seed)
    print(f"\nstore {a.store}; gains: permuted - true (nats)\n")
    print("| setting | seed | stage | L_reg true | L_reg permuted | gain / token | gain / target | train+eval s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for (s, seed), r in results.items():
        for stage, (t, p, g, gt) in r["rows"].items():
            print(f"| {s} | {seed} | {stage} | {t:.4f} | {p:.4f} | {g:.4f} | {gt:.2f} | {r['seconds']:.0f} |")
    print(f"\nmean (min..max) over seeds {a.seeds}, gain per token\n")
    print("| setting | " + " | ".join(PRE_ALIGNMENT) + " |")
    print("|---|" + "---:|" * len(PRE_ALIGNMENT))
    for s in settings:
        cells = []
        for stage in PRE_ALIGNMENT:
            g = [results[s, seed]["rows"][stage][2] for seed in seeds if stage in results[s, seed]["rows"]]
            cells.append(f"{statistics.mean(g):.3f} ({min(g):.3f}..{max(g):.3f})" if g else "-")
        print(f"| {s} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
