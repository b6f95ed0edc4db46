"""int8 storage (per-token scale) against float16, and float8 e4m3 (per-token scale) as the alternative.

Three parts, one run:

1. **Accuracy over the sample**: the four experts (small variants, RANDOM weights) extracted from the
   embedded sample dataset in float32 (`astrea extract --dtype float32`), then every token stored as
   float16, int8 and float8-e4m3 (per-token scale): min / mean per-token cosine to float32. Plus two
   synthetic 576x1152 maps: Gaussian, and Gaussian with 2 outlier channels x50 (trained ViTs have such
   channels; random-weight features do not), where a per-token absmax scale hurts int8 most.
2. **Bytes**: the float32 store converted (`astrea shards convert`) to float16 and to int8, in zarr and
   wds: data bytes int8 / float16 per format; and units at the real width (576x1152, store_io's
   synthetic features) written both ways.
3. **Learning**: a caption stage trained on the routing world (astrea.train.worlds) from its float16
   store and from the same store converted to int8, same seeds; held-out L_reg of each.

    .venv/bin/python benchmarks/int8_storage.py [--seeds 0,1,2] [--steps 150] [--store DIR]

``--store``: a float32 extraction to reuse (else one is made in a temp dir: ~1-3 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

EXPERTS = ("siglip", "ram_plus", "grounding_dino", "sam2")


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    live = (na > 0) & (nb > 0)
    return np.sum(a[live] * b[live], 1) / (na[live] * nb[live])


def roundtrips(x: np.ndarray) -> dict[str, np.ndarray]:
    from astrea.shards.dtypes import from_storage, to_storage

    return {"float16": x.astype(np.float16).astype(np.float32),
            "int8": from_storage(to_storage(x, "int8"), "int8"),
            "float8_e4m3": from_storage(to_storage(x, "float8_e4m3"), "float8_e4m3")}


def extract_sample(root: Path) -> Path:
    from astrea.extract import ExtractConfig, run

    run(ExtractConfig(experts=["all"], data="sample", store=str(root), small=True, weights={"*": "random"},
                      dtype="float32", progress=False, num_cpus=2))
    return root


def accuracy(store_root: Path) -> list[dict[str, Any]]:
    from astrea.shards import Store

    store = Store(store_root)
    rows = []
    for name in EXPERTS:
        edir = store.resolve("sample", name)
        toks = [r.tokens for u in edir.committed_units() for r in edir.iter_unit(u) if r.status == "ok"]
        x = np.stack(toks).astype(np.float32)
        row: dict[str, Any] = {"features": f"sample, {name} small (RANDOM weights)", "tokens": int(np.prod(x.shape[:-1])),
                               "dim": int(x.shape[-1])}
        for dt, y in roundtrips(x).items():
            c = _cos(x, y)
            row[dt] = (float(c.min()), float(c.mean()))
        rows.append(row)
    rng = np.random.default_rng(0)
    gauss = rng.normal(size=(8, 576, 1152)).astype(np.float32)
    outl = gauss.copy()
    outl[..., [17, 900]] *= 50.0
    for label, x in (("synthetic Gaussian 576x1152", gauss), ("synthetic, 2 outlier channels x50", outl)):
        row = {"features": label, "tokens": int(np.prod(x.shape[:-1])), "dim": 1152}
        for dt, y in roundtrips(x).items():
            c = _cos(x, y)
            row[dt] = (float(c.min()), float(c.mean()))
        rows.append(row)
    return rows


def bytes_table(store_root: Path, tmp: Path) -> list[dict[str, Any]]:
    from astrea.shards import Store
    from astrea.shards.convert import ConvertConfig

    out = []
    for fmt in ("zarr", "wds"):
        for name in EXPERTS:
            size = {}
            for dt in ("float16", "int8"):
                dst = tmp / f"bytes-{fmt}-{dt}"
                rep = ConvertConfig(store=store_root, dataset="sample", expert=name, dtype=dt, format=fmt,
                                    out=dst).build().run()
                edir = Store(dst).resolve("sample", name)
                size[dt] = sum(edir.stats(u)["data_bytes"] for u in edir.committed_units())
                assert rep.converted or rep.skipped
            out.append({"format": fmt, "expert": name, "float16": size["float16"], "int8": size["int8"],
                        "ratio": size["int8"] / size["float16"]})
    return out


def real_width_bytes(tmp: Path, n: int = 16) -> list[dict[str, Any]]:
    """Units of 576x1152 tokens (store_io's smooth low-rank synthetic features, and the same with 2 outlier
    channels x50) written as float16 and int8 in both formats: data bytes and token cosine."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from store_io import spec_for, synthetic_features

    from astrea.shards import Store

    tokens, pooled = synthetic_features(n, 24, 1152)
    outl = tokens.copy()
    outl[..., [17, 900]] *= 50.0
    rows = []
    for label, t in (("smooth low-rank + noise", tokens), ("same, 2 outlier channels x50", outl)):
        for fmt in ("zarr", "wds"):
            size = {}
            for dt in ("float16", "int8"):
                root = tmp / f"rw-{len(rows)}-{dt}"
                edir = Store(root).expert_dir("bench", spec_for(fmt, dt, 24, 1152), create=True)
                with edir.open_unit("00000") as w:
                    for i in range(n):
                        w.add(f"k{i:05d}", t[i], pooled[i], {})
                    size[dt] = w.commit()["data_bytes"]
                back = np.stack([r.tokens for r in edir.iter_unit("00000")]).astype(np.float32)
                if dt == "int8":
                    c = _cos(t, back)
            rows.append({"features": label, "format": fmt, "float16": size["float16"], "int8": size["int8"],
                         "ratio": size["int8"] / size["float16"], "raw_ratio": (1152 + 4) / (2 * 1152),
                         "int8_cos": (float(c.min()), float(c.mean()))})
    return rows


def learning(seeds: list[int], steps: int, tmp: Path) -> list[dict[str, Any]]:
    from astrea.shards.convert import ConvertConfig
    from astrea.train import TrainConfig, run
    from astrea.train.eval import EvalConfig, evaluate
    from astrea.train.worlds import EXPERTS as WORLD_EXPERTS
    from astrea.train.worlds import routing_world

    rows = []
    for seed in seeds:
        world = routing_world(tmp / f"world{seed}", images=320, grid=4, dim=64, seed=seed)
        q = tmp / f"world{seed}-int8"
        for name in WORLD_EXPERTS:
            ConvertConfig(store=world.store, dataset=world.dataset, expert=name, dtype="int8", out=q).build().run()
        res = {}
        for dt, store in (("float16", world.store), ("int8", q)):
            t = time.perf_counter()
            out = tmp / f"run{seed}-{dt}"
            run(TrainConfig.load(None, {
                "store": str(store), "data": world.dataset, "out": str(out), "batch_size": 16, "optim.lr": 3e-3,
                "llm.freeze": False, "llm.text_warmup_steps": 0, "progress": False, "save_every": 0,
                "dataset.heldout_fraction": 0.2, "stages": ["caption"], "steps": steps, "seed": seed,
                "llm.seed": seed}))
            m = evaluate(EvalConfig(run=str(out)))
            res[dt] = {"lreg": m["heldout"]["stages"]["caption"],
                       "lreg_permuted": m["heldout_permuted"]["stages"]["caption"],
                       "seconds": time.perf_counter() - t}
        rows.append({"seed": seed, **{f"{dt}_{k}": v for dt, r in res.items() for k, v in r.items()},
                     "rel_diff": res["int8"]["lreg"] / res["float16"]["lreg"] - 1})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def report(acc: list[dict], byt: list[dict], real: list[dict], learn: list[dict]) -> str:
    lines = ["Per-token cosine to float32 (min / mean)", "",
             "| features | tokens x dim | float16 | int8 (per-token scale) | float8 e4m3 (per-token scale) |",
             "|---|---|---:|---:|---:|"]
    for r in acc:
        cells = " | ".join(f"{r[d][0]:.6f} / {r[d][1]:.6f}" for d in ("float16", "int8", "float8_e4m3"))
        lines.append(f"| {r['features']} | {r['tokens']} x {r['dim']} | {cells} |")
    lines += ["", "Data bytes, the sample's units converted from float32 (astrea shards convert)", "",
              "| format | expert | float16 bytes | int8 bytes | int8 / float16 |", "|---|---|---:|---:|---:|"]
    for r in byt:
        lines.append(f"| {r['format']} | {r['expert']} | {r['float16']:,} | {r['int8']:,} | {r['ratio']:.3f} |")
    lines += ["", "Data bytes at the real width: images of 576x1152 tokens (+ pooled 1152), one unit", "",
              "| features | format | float16 bytes | int8 bytes | int8 / float16 | raw arrays | int8 token cosine min / mean |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for r in real:
        lines.append(f"| {r['features']} | {r['format']} | {r['float16']:,} | {r['int8']:,} | {r['ratio']:.3f} | "
                     f"{r['raw_ratio']:.3f} | {r['int8_cos'][0]:.6f} / {r['int8_cos'][1]:.6f} |")
    if learn:
        lines += ["", "Caption stage on the routing world (grid 4, dim 64, 320 images), held-out L_reg", "",
                  "| seed | float16 | int8 | int8 / float16 - 1 | float16, permuted images | int8, permuted |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in learn:
            lines.append(f"| {r['seed']} | {r['float16_lreg']:.4f} | {r['int8_lreg']:.4f} | {100 * r['rel_diff']:+.2f}% | "
                         f"{r['float16_lreg_permuted']:.4f} | {r['int8_lreg_permuted']:.4f} |")
        d = [r["rel_diff"] for r in learn]
        lines.append(f"\n- int8 vs float16 held-out L_reg: mean {100 * statistics.mean(d):+.2f}%, "
                     f"largest |diff| {100 * max(abs(x) for x in d):.2f}% over {len(d)} seed(s)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--store", default="", help="a float32 extraction of the sample to reuse")
    ap.add_argument("--skip-learning", action="store_true")
    ap.add_argument("--real-images", type=int, default=16, help="images per unit in the real-width bytes part")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        store = Path(a.store) if a.store else extract_sample(tmp / "f32")
        acc = accuracy(store)
        byt = bytes_table(store, tmp)
        real = real_width_bytes(tmp, a.real_images)
        learn = [] if a.skip_learning else learning([int(s) for s in a.seeds.split(",") if s.strip()], a.steps, tmp)
    print()
    print(report(acc, byt, real, learn))
    if a.json:
        Path(a.json).write_text(json.dumps({"accuracy": acc, "bytes": byt, "real_width": real, "learning": learn},
                                           indent=2))


if __name__ == "__main__":
    main()
