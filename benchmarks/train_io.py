"""What the feature store buys the trainer, measured in one run (CPU by default, random weights).

1. Reader: samples/s ``JoinedDataset`` delivers with the four experts joined (and after collate).
2. Consumer: samples/s one training step consumes (segmentation stage: all four experts read, three as
   residual context, cumulative targets), with the batch already in memory.
3. Step time from the store (read + collate + step) vs the same step with the four small random-weight
   experts run online on the images (decode + preprocess + forward x4 + collate + step).

    .venv/bin/python benchmarks/train_io.py [--images 32] [--batch 8] [--grid 8] [--device cpu]
    .venv/bin/python benchmarks/train_io.py --real-widths [--images 512] [--units 16] [--workers 0,1,2]

``--real-widths``: the reader alone at the real experts' sizes (four experts, 576 tokens of 1152 + 512 +
256 + 256 channels, float16: 2.39 MiB per sample), one reader process and through a DataLoader with
workers, for the store's default layout (zarr raw) and the previous one (zarr zstd); prints a markdown
table with samples/s and MB/s, to set against what a training step consumes (docs/train.md).

The experts are the project's small variants (DEFAULT_SMALL) with random weights: real architectures,
far smaller than the paper's, so the online cost here is a lower bound of the real one.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _images(n: int, seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        arr = rng.integers(0, 256, size=(96, 128, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG")
        out.append(buf.getvalue())
    return out


def _experts(grid: int, device: str):
    from astrea.extract.experts.registry import ExpertConfig, default_variant
    from astrea.schemas.stages import EXPERT_ORDER

    experts = {}
    for name in EXPERT_ORDER:
        cfg = ExpertConfig(name, arch=default_variant(name, small=True), weights="random", grid=grid, device=device)
        experts[name] = cfg.build().to(device)
    return experts


def _run_experts(experts, images: list[bytes]) -> list[dict]:
    """Decode, preprocess and run the four experts in order (each prompted by its prerequisite)."""
    from astrea.extract.experts.common import decode_image

    pil = [decode_image(b) for b in images]
    recs = [{"experts": {}} for _ in images]
    for name, ex in experts.items():
        pixels = torch.stack([ex.preprocess(im) for im in pil])
        prompts = None
        if ex.prerequisites:
            prompts = [{p: r["experts"][p]["outputs"] for p in ex.prerequisites if p in r["experts"]} for r in recs]
        for r, o in zip(recs, ex.forward(pixels, prompts), strict=True):
            r["experts"][name] = {"tokens": o.tokens.astype(np.float16), "pooled": o.pooled.astype(np.float16), "outputs": o.outputs}
    return recs


def _write_store(root: Path, experts, images: list[bytes], per_unit: int) -> None:
    from astrea.shards import Store

    store = Store(root)
    recs = _run_experts(experts, images)
    for name, ex in experts.items():
        edir = store.expert_dir("bench", ex.spec, create=True)
        for u in range(0, len(images), per_unit):
            w = edir.open_unit(f"{u // per_unit:05d}")
            for i in range(u, min(u + per_unit, len(images))):
                e = recs[i]["experts"][name]
                w.add(f"k{i:06d}", e["tokens"], e["pooled"], e["outputs"], caption=f"random image {i}")
            w.commit()


WIDTHS = {"siglip": 1152, "ram_plus": 512, "grounding_dino": 256, "sam2": 256}  # stored token widths


def _real_width_store(root: Path, images: int, units: int, grid: int, codec: str, scale: int) -> float:
    """Four experts at real widths (divided by ``scale`` for smoke runs), float16, ``units`` units; random
    features (the reader's cost does not depend on the values). -> MB per sample."""
    from astrea.schemas import ExpertSpec
    from astrea.shards import Store

    rng = np.random.default_rng(0)
    per = max(1, images // units)
    mb = 0.0
    for name, width in WIDTHS.items():
        d = max(1, width // scale)
        spec = ExpertSpec(expert=name, arch="synthetic", weights="random", weights_sha256="0" * 64, preprocessing={},
                          grid=grid, token_dim=d, pooled_dim=d, codec=codec)
        edir = Store(root).expert_dir("bench", spec, create=True)
        pool = rng.normal(0, 1, (8, grid * grid, d)).astype(np.float16)
        for u in range(units):
            with edir.open_unit(f"{u:05d}") as w:
                for i in range(u * per, (u + 1) * per):
                    w.add(f"k{i:07d}", pool[i % 8], pool[i % 8, 0], {"i": i}, caption=f"image {i}")
                w.commit()
        mb += (grid * grid * d + d) * 2 / 1e6
    return mb


def stack_batch(recs: list[dict]) -> dict:
    """Collate in the DataLoader worker: one tensor per expert array for the whole batch (a few large
    tensors cross to the main process instead of eight per sample)."""
    names = list(recs[0]["experts"])
    return {"keys": [r["key"] for r in recs],
            "tokens": {n: torch.from_numpy(np.stack([r["experts"][n]["tokens"] for r in recs])) for n in names},
            "pooled": {n: torch.from_numpy(np.stack([r["experts"][n]["pooled"] for r in recs])) for n in names},
            "outputs": {n: [r["experts"][n]["outputs"] for r in recs] for n in names}}


def reader_at_real_widths(args: argparse.Namespace) -> None:
    from astrea.shards import JoinedDataset, Store

    workers = [int(x) for x in args.workers.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for codec in ("raw", "zstd"):
            root = Path(tmp) / codec
            mb = _real_width_store(root, args.images, args.units, args.grid, codec, args.scale)
            n_total = (args.images // args.units) * args.units
            settings = [(nw, None) for nw in workers] + [(nw, args.batch) for nw in workers if nw]
            for nw, batch in settings if codec == "raw" else [(0, None)]:
                ds = JoinedDataset(Store(root), "bench", list(WIDTHS), shuffle=True, seed=0)
                best = float("inf")
                for rep in range(args.repeat + 1):  # the first pass: worker start-up, page cache
                    ds.set_epoch(rep)
                    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=nw,
                                                         collate_fn=stack_batch if batch else None)
                    t = time.perf_counter()
                    n = sum(len(b["keys"]) if batch else 1 for b in loader)
                    if rep:
                        best = min(best, time.perf_counter() - t)
                assert n == n_total, (n, n_total)
                rows.append((codec, nw, batch, n / best, n * mb / best))
    print(f"{n_total} samples in {args.units} units, four experts of {args.grid * args.grid} tokens x "
          f"{'+'.join(str(max(1, w // args.scale)) for w in WIDTHS.values())} float16 (+ pooled): {mb / 1.048576:.2f} MiB "
          f"per sample; JoinedDataset(shuffle=True), every row verified; best of {args.repeat} epochs, "
          f"torch threads {torch.get_num_threads()}\n")
    print("| layout | reader | samples/s | MB/s |")
    print("|---|---|---:|---:|")
    for codec, nw, batch, sps, mbs in rows:
        layout = "Zarr raw (default)" if codec == "raw" else "Zarr zstd (previous default)"
        reader = "one process (no workers)" if nw == 0 else f"DataLoader, {nw} worker{'s' if nw > 1 else ''}"
        reader += f", batches of {batch} stacked in the worker" if batch else (", one sample at a time" if nw else "")
        print(f"| {layout} | {reader} | {sps:.0f} | {mbs:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=None, help="default 32 (512 with --real-widths)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--grid", type=int, default=None, help="default 8 (24 with --real-widths)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--real-widths", action="store_true", help="the reader alone at the real experts' sizes")
    ap.add_argument("--units", type=int, default=16, help="--real-widths: units (>= readers)")
    ap.add_argument("--workers", default="0,1,2", help="--real-widths: DataLoader worker counts to try")
    ap.add_argument("--repeat", type=int, default=2, help="--real-widths: timed epochs (best kept)")
    ap.add_argument("--batch-in-workers", dest="wbatch", type=int, default=16,
                    help="--real-widths: also time DataLoader workers that stack batches of this size")
    ap.add_argument("--scale", type=int, default=1, help="--real-widths: divide the widths (smoke tests)")
    ap.add_argument("--dir", default=None, help="--real-widths: where to write the store (default: a temp dir)")
    args = ap.parse_args()
    if args.real_widths:
        args.images, args.grid, args.batch = args.images or 512, args.grid or 24, args.wbatch
        reader_at_real_widths(args)
        return
    args.images, args.grid = args.images or 32, args.grid or 8

    from astrea.shards import JoinedDataset, Store
    from astrea.train.config import TrainConfig
    from astrea.train.data import Collator
    from astrea.train.llm import build_llm
    from astrea.train.model import AstreaModel
    from astrea.train.stages import build_stages

    dev = torch.device(args.device)
    images = _images(args.images)
    t = time.perf_counter()
    experts = _experts(args.grid, args.device)
    print(f"built 4 small random-weight experts in {time.perf_counter() - t:.1f}s")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store"
        t = time.perf_counter()
        _write_store(root, experts, images, per_unit=max(args.images // 4, 1))
        print(f"extracted {args.images} images into the store in {time.perf_counter() - t:.1f}s")
        names = list(experts)
        specs = {n: e.spec for n, e in experts.items()}

        # 1. reader alone, then reader + collate
        t = time.perf_counter()
        n = sum(1 for _ in JoinedDataset(Store(root), "bench", names, shuffle=True))
        read_sps = n / (time.perf_counter() - t)

        cfg = TrainConfig(store=str(root), data="bench", out=tmp, stages=["caption", "classification", "detection", "segmentation"])
        llm = build_llm(cfg.llm)
        model = AstreaModel(llm, {k: s.token_dim for k, s in specs.items()}, cfg).to(dev)
        stage = build_stages(cfg, specs)[-1]
        model.requires_grad_(False)
        for m in stage.trainable_modules(model):
            m.requires_grad_(True)
        collate = Collator(stage.render, llm.tokenizer, stage.required_experts(), cfg.dataset.max_text_tokens)
        recs = list(JoinedDataset(Store(root), "bench", names, shuffle=False))
        t = time.perf_counter()
        batches = [collate(recs[i : i + args.batch]) for i in range(0, len(recs), args.batch)]
        collate_sps = len(recs) / (time.perf_counter() - t + 1e-9 + n / read_sps)

        def step(b) -> None:
            b = {**b, "tokens": {k: v.to(dev).float() for k, v in b["tokens"].items()}}
            v = stage.visual_tokens(model, b)
            loss, _ = model.lm_loss(v, b["input_ids"].to(dev), b["attention_mask"].to(dev), b["labels"].to(dev))
            loss.backward()
            model.zero_grad(set_to_none=True)

        step(batches[0])  # warm-up
        t = time.perf_counter()
        for i in range(args.steps):
            step(batches[i % len(batches)])
        step_s = (time.perf_counter() - t) / args.steps
        consume_sps = args.batch / step_s

        # C_i on the fly: what the frozen earlier projectors cost inside that step
        b0 = {k: v.to(dev).float() for k, v in batches[0]["tokens"].items()}
        t = time.perf_counter()
        with torch.no_grad():
            for _ in range(args.steps):
                for e in stage.context_experts:
                    model.project(e, b0[e])
        context_frac = (time.perf_counter() - t) / args.steps / step_s

        # 3. from the store (read + collate + step) vs online experts (+ collate + step)
        t = time.perf_counter()
        it = iter(JoinedDataset(Store(root), "bench", names, shuffle=True))
        for _ in range(args.steps):
            buf = [next(it) for _ in range(args.batch)]
            step(collate(buf))
        store_step_s = (time.perf_counter() - t) / args.steps
        t = time.perf_counter()
        for i in range(args.steps):
            chunk = [images[(i * args.batch + j) % len(images)] for j in range(args.batch)]
            recs_online = _run_experts(experts, chunk)
            for j, r in enumerate(recs_online):
                r.update(key=f"o{j}", caption=f"random image {j}")
            step(collate(recs_online))
        online_step_s = (time.perf_counter() - t) / args.steps

    res = {
        "device": str(dev), "torch_threads": torch.get_num_threads(), "grid": args.grid, "batch": args.batch,
        "reader_samples_per_s": round(read_sps, 1),
        "reader_plus_collate_samples_per_s": round(collate_sps, 1),
        "train_step_consumes_samples_per_s": round(consume_sps, 1),
        "reader_headroom_x": round(collate_sps / consume_sps, 2),
        "context_Ci_on_the_fly_fraction_of_step": round(context_frac, 4),
        "step_s_from_store": round(store_step_s, 3),
        "step_s_experts_online": round(online_step_s, 3),
        "store_speedup_x": round(online_step_s / store_step_s, 1),
    }
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
