"""What the feature store buys the trainer, measured in one run (CPU by default, random weights).

1. Reader: samples/s ``JoinedDataset`` delivers with the four experts joined (and after collate).
2. Consumer: samples/s one training step consumes (segmentation stage: all four experts read, three as
   residual context, cumulative targets), with the batch already in memory.
3. Step time from the store (read + collate + step) vs the same step with the four small random-weight
   experts run online on the images (decode + preprocess + forward x4 + collate + step).

    .venv/bin/python benchmarks/train_io.py [--images 32] [--batch 8] [--grid 8] [--device cpu]

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
    from astrea.extract.experts.registry import EXPERT_ORDER, ExpertConfig, default_variant

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--grid", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()

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
