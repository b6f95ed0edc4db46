"""How much of the bare model speed `astrea extract` keeps, and what a second actor buys.

In one run, on the same synthetic images and the same expert:
  1. bare forward: the expert's forward over preprocessed tensors already in memory (no decode, no Ray,
     no store), same batch size and torch threads as one actor;
  2. full `astrea extract` (Ray Data: read -> decode/preprocess tasks -> actor -> ordered writer ->
     commit), 1 actor, steady-state images/s (first to last result) and end-to-end (incl. start-up);
  3. the same with 2 actors.
Prints a table and the ratio full / bare (target >= 0.85).

    python benchmarks/extract.py                                  # siglip small, CPU
    python benchmarks/extract.py --expert sam2 --images 64
    python benchmarks/extract.py --real --device cuda --batch-size 32 --images 2048   # on a GPU
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np


def write_images(root: Path, n: int, per_shard: int, seed: int = 0) -> Path:
    """An img2dataset-layout WebDataset directory of n random JPEGs (varied sizes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for s in range((n + per_shard - 1) // per_shard):
        keys = [f"{s * per_shard + i:09d}" for i in range(min(per_shard, n - s * per_shard))]
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for k in keys:
                h, w = int(rng.integers(256, 640)), int(rng.integers(256, 640))
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
                for name, data in ((f"{k}.jpg", buf.getvalue()), (f"{k}.txt", f"image {k}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        pq.write_table(pa.table({"key": keys, "caption": [f"image {k}" for k in keys], "status": ["success"] * len(keys)}),
                       root / f"{s:05d}.parquet")
        (root / f"{s:05d}_stats.json").write_text(json.dumps({"count": len(keys), "successes": len(keys)}))
    return root


def bare_forward(cfg, source: Path, batch_size: int, device: str, threads: int) -> float:
    import torch

    from astrea.data import open_source
    from astrea.extract.experts.common import decode_image

    torch.set_num_threads(threads)
    expert = cfg.build({}).to(device)
    pixels, prompts_needed = [], bool(getattr(expert, "prerequisites", ()))
    for shard in open_source(str(source)).shards():
        for smp in shard:
            pixels.append(expert.preprocess(decode_image(smp.image)))
    x = torch.stack(pixels)
    batches = [x[i:i + batch_size] for i in range(0, len(x), batch_size)]
    expert.forward(batches[0], [{}] * len(batches[0]) if prompts_needed else None)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for b in batches:
        expert.forward(b.to(device, non_blocking=True), [{}] * len(b) if prompts_needed else None)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return len(x) / (time.perf_counter() - t)


def full_extract(args, source: Path, workers: int) -> dict:
    from astrea.extract import ExtractConfig, run

    store = Path(tempfile.mkdtemp(prefix="astrea-bench-store-"))
    cfg = ExtractConfig(experts=[args.expert], data=str(source), store=str(store), small=not args.real,
                        weights={"*": "random"}, batch_size=args.batch_size, workers=workers, device=args.device,
                        cpus_per_worker=args.threads, without_prerequisites=True, progress=False,
                        num_gpus=1 if args.device.startswith("cuda") else 0)
    report = run(cfg)
    return report["experts"][0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--expert", default="siglip")
    ap.add_argument("--real", action="store_true", help="real-size architecture (random weights) instead of --small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--per-shard", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per actor (= CPUs per actor) and for bare")
    ap.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local Ray cluster "
                    "(default: enough for 2 actors + decoding)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import logging

    import ray

    from astrea.extract.experts.registry import ExpertConfig, default_variant

    src = write_images(Path(tempfile.mkdtemp(prefix="astrea-bench-src-")) / "bench", args.images, args.per_shard)
    cfg = ExpertConfig(args.expert, arch=default_variant(args.expert, not args.real), weights="random",
                       device=args.device, compute_dtype="bfloat16" if args.device.startswith("cuda") else "float32")
    bare = bare_forward(cfg, src, args.batch_size, args.device, args.threads)
    num_cpus = args.num_cpus or max(2 * args.threads + 2, os.cpu_count() or 2)
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        one = full_extract(args, src, 1)
        two = full_extract(args, src, 2)
    finally:
        ray.shutdown()
    print(f"\nexpert {args.expert} ({cfg.arch}, random weights), {args.images} images, batch {args.batch_size}, "
          f"device {args.device}, {args.threads} thread(s)/actor, machine: {os.cpu_count()} cores, "
          f"Ray cluster {num_cpus} logical CPUs")
    print(f"{'run':<34}{'images/s':>10}{'ratio to bare':>15}{'wall s':>9}{'start-up s':>12}")
    print(f"{'bare forward (tensors preloaded)':<34}{bare:>10.2f}{1.0:>15.2f}{'':>9}{'':>12}")
    for name, r in (("astrea extract, 1 actor", one), ("astrea extract, 2 actors", two)):
        ips = r.get("images_per_s_streaming", r["images_per_s"])
        print(f"{name:<34}{ips:>10.2f}{ips / bare:>15.2f}{r['seconds']:>9.1f}{r.get('seconds_to_first_result', 0):>12.1f}")
    print("(extract images/s = steady state, first to last result; wall includes model loads and Ray start-up)")


if __name__ == "__main__":
    main()
