"""What the main stage costs on top of a pre-alignment step, measured in one run (random weights).

Times one optimizer step (forward + backward + AdamW + the stage's after_step) of
1. the segmentation pre-alignment stage (the heaviest one: projector + residual attention over three
   earlier experts), and
2. the main stage (four aligned grids, router + adapters, MoCo with its text forward and queue),
on the same random Llama-style LLM and the same synthetic batch (the paper's 576 tokens per expert,
the experts' real token widths). Prints ms/step, samples/s, peak GPU memory and the ratio.

    python benchmarks/main_stage_step.py [--hidden 2048] [--layers 8] [--batch 16] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

WIDTHS = {"siglip": 1152, "ram_plus": 512, "grounding_dino": 256, "sam2": 256}  # tokens' D_e as stored


def _records(n: int, tokens: int, seed: int = 0) -> list[dict]:
    from astrea.train.targets import encode_rle

    rng = np.random.default_rng(seed)
    mask = np.zeros((16, 16), dtype=bool)
    mask[3:10, 2:12] = True
    outputs = {
        "siglip": {},
        "ram_plus": {"tags": ["dog", "grass", "ball", "tree"], "scores": [0.9, 0.8, 0.7, 0.6]},
        "grounding_dino": {"boxes": [[0.1, 0.2, 0.5, 0.6], [0.4, 0.1, 0.9, 0.8]], "labels": ["dog", "ball"], "scores": [0.7, 0.6]},
        "sam2": {"masks": [{"rle": encode_rle(mask), "score": 0.9, "area": int(mask.sum()), "box": [0.1, 0.2, 0.7, 0.6], "label": "dog"}]},
    }
    return [
        {
            "key": f"{i:06d}",
            "caption": f"a dog with a ball on the grass, photo number {i}",
            "labels": {},
            "experts": {
                e: {"tokens": rng.standard_normal((tokens, d), dtype=np.float32), "pooled": rng.standard_normal(d, dtype=np.float32), "outputs": outputs[e]}
                for e, d in WIDTHS.items()
            },
        }
        for i in range(n)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=576)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    from astrea.train.config import TrainConfig
    from astrea.train.data import Collator
    from astrea.train.llm import build_llm
    from astrea.train.model import AstreaModel
    from astrea.train.stages import build_stages

    dev = torch.device(args.device)
    cfg = TrainConfig.from_dict({
        "store": "-", "data": "-", "out": "-",
        "llm": {"hidden_size": args.hidden, "layers": args.layers, "heads": max(args.hidden // 128, 1),
                "intermediate_size": args.hidden * 11 // 4},
        "moco": {"queue_size": 4096},
    })
    torch.manual_seed(0)
    llm = build_llm(cfg.llm)
    model = AstreaModel(llm, WIDTHS, cfg)
    stages = {s.name: s for s in build_stages(cfg)}
    for s in stages.values():
        s.build(model)
    if dev.type == "cuda":
        model.llm.to(torch.bfloat16)
    model.to(dev)
    recs = _records(args.batch, args.tokens)
    results = {}
    for name in ("segmentation", "main"):
        stage = stages[name]
        batch = Collator(stage.render, model.tokenizer, stage.required_experts(), 384)(recs)
        b = {**batch, **{k: batch[k].to(dev) for k in ("input_ids", "attention_mask", "labels")}}
        b["tokens"] = {e: t.to(dev) for e, t in batch["tokens"].items()}
        model.requires_grad_(False)
        for m in stage.trainable_modules(model):
            m.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), weight_decay=0.05)
        model.train()
        model.llm.eval()
        ac = torch.autocast(dev.type, dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)

        def step() -> float:
            with ac:
                visual = stage.visual_tokens(model, b)
                loss, _ = model.lm_loss(visual, b["input_ids"], b["attention_mask"], b["labels"])
                extras = stage.extra_losses(model, b, visual)
            total = loss + sum(extras.values()) if extras else loss
            total.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            stage.after_step(model)
            return float(total.detach())

        for _ in range(3):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            last = step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / args.steps
        results[name] = {
            "ms_per_step": round(dt * 1000, 2),
            "samples_per_s": round(args.batch / dt, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None,
            "trainable_params_M": round(sum(p.numel() for p in params) / 1e6, 2),
            "loss": round(last, 4),
        }
    results["main_over_segmentation"] = round(results["main"]["ms_per_step"] / results["segmentation"]["ms_per_step"], 2)
    dev_name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(json.dumps({"device": dev_name, "args": vars(args), "random_weights": True, **results}, indent=2))


if __name__ == "__main__":
    main()
