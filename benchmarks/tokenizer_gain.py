"""Image gain on a demo store with the tiny LLM's two tokenizers, in one run: ``llm.tokenizer`` fitted vs bytes.

For each setting, trains the demo's stages (the demo's own settings: 100 steps per stage, batch 4, lr 1e-3,
the whole LLM trained after a 400-step text-only warm-up) on the same store with the same seed, then runs
``astrea eval`` and prints per pre-alignment stage: held-out L_reg with true and permuted images, the
image gain per target token, and the image gain per *target* (nats per whole target text, summed over its
tokens), which does not depend on how the text is cut into tokens.

    astrea demo --out demo_out            # once, for its store (or any store of the sample)
    .venv/bin/python benchmarks/tokenizer_gain.py --store demo_out/store [--settings fitted,bytes]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

DEMO = {"steps": 100, "batch_size": 4, "llm.freeze": False, "optim.lr": 1e-3, "dataset.heldout_fraction": 0.25,
        "save_every": 0, "llm.text_warmup_steps": 400, "llm.text_warmup_epochs": 20.0, "dataset.max_objects": 8}


def one(store: str, data: str, tokenizer: str, out: Path, seed: int) -> dict:
    from astrea.train import TrainConfig
    from astrea.train import run as train_run
    from astrea.train.eval import EvalConfig, evaluate

    t = time.monotonic()
    train_run(TrainConfig.load(None, {**DEMO, "store": store, "data": data, "out": str(out), "seed": seed,
                                      "llm.tokenizer": tokenizer}))
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
    ap.add_argument("--settings", default="fitted,bytes")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tok in a.settings.split(","):
            results[tok] = one(a.store, a.data, tok, Path(tmp) / tok, a.seed)
    print(f"\nstore {a.store}, seed {a.seed}; gains: permuted - true (nats)\n")
    print("| tokenizer | stage | L_reg true | L_reg permuted | gain / token | gain / target | train+eval s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for tok, r in results.items():
        for stage, (t, p, g, gt) in r["rows"].items():
            print(f"| {tok} | {stage} | {t:.4f} | {p:.4f} | {g:.4f} | {gt:.2f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
