"""Per-expert forward throughput: images/s of each expert on preprocessed tensors (no decode, no Ray).

    python benchmarks/experts.py                          # small configs, CPU, fp32
    python benchmarks/experts.py --real --device cuda     # real sizes, bf16 (random weights) on a GPU

Random weights everywhere (no hub here): speed does not depend on the values. Dependent experts
(grounding_dino, sam2) run on their fallback prompts, as without a stored prerequisite.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def bench(name: str, *, real: bool, device: str, batch_size: int, images: int, threads: int | None) -> dict:
    import torch
    from PIL import Image

    from astrea.extract.experts.registry import ExpertConfig, default_variant

    if threads:
        torch.set_num_threads(threads)
    compute = "bfloat16" if device.startswith("cuda") else "float32"
    cfg = ExpertConfig(name, arch=default_variant(name, not real), weights="random", device=device,
                       compute_dtype=compute)
    t = time.perf_counter()
    expert = cfg.build({}).to(device)
    build_s = time.perf_counter() - t
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(min(images, 8))]
    t = time.perf_counter()
    pix = [expert.preprocess(imgs[i % len(imgs)]) for i in range(images)]
    pre_s = (time.perf_counter() - t) / images
    x = torch.stack(pix)
    prompts = bool(getattr(expert, "prerequisites", ()))
    batches = [x[i:i + batch_size] for i in range(0, images, batch_size)]
    expert.forward(batches[0], [{}] * len(batches[0]) if prompts else None)  # warm-up (lazy init, cudnn autotune)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t = time.perf_counter()
    for b in batches:
        expert.forward(b.to(device), [{}] * len(b) if prompts else None)
    sync()
    secs = time.perf_counter() - t
    return {"expert": name, "arch": cfg.arch, "compute": compute, "images_per_s": images / secs,
            "preprocess_ms": pre_s * 1e3, "build_s": build_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", default="siglip,ram_plus,grounding_dino,sam2")
    ap.add_argument("--real", action="store_true", help="real-size architectures (random init)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    import torch

    rows = []
    for name in args.experts.split(","):
        try:
            rows.append(bench(name, real=args.real, device=args.device, batch_size=args.batch_size,
                              images=args.images, threads=args.threads))
        except Exception as e:  # one expert failing to build must not hide the others' numbers
            rows.append({"expert": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"})
    print(f"\n{'real' if args.real else 'small'} configs, device {args.device}, batch {args.batch_size}, "
          f"{args.images} images, torch threads {torch.get_num_threads()}, random weights")
    print(f"{'expert':<16}{'arch':<26}{'compute':<10}{'images/s':>10}{'preprocess ms/img':>19}{'build s':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['expert']:<16}error: {r['error']}")
            continue
        print(f"{r['expert']:<16}{r['arch']:<26}{r['compute']:<10}{r['images_per_s']:>10.2f}"
              f"{r['preprocess_ms']:>19.2f}{r['build_s']:>9.1f}")


if __name__ == "__main__":
    main()
