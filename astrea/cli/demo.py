"""CLI for `astrea demo` (thin: parse, then call astrea.demo.run). Defaults come from DemoConfig."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from astrea.cli._common import user_errors
from astrea.demo import DemoConfig

_D = DemoConfig()


def register(app: typer.Typer) -> None:
    @app.command("demo")
    @user_errors
    def demo(
        out: Annotated[str, typer.Option("--out", help="Directory for the sample data, the store, the run and report.md.")] = _D.out,
        images: Annotated[int, typer.Option(help="Images in the generated sample dataset (plus 2 deliberately broken ones).")] = _D.images,
        shards: Annotated[int, typer.Option(help="Source shards (= store units) in the sample dataset.")] = _D.shards,
        steps: Annotated[int, typer.Option(help="Optimizer steps per training stage.")] = _D.steps,
        batch_size: Annotated[int, typer.Option("--batch-size", help="Images per extraction batch and per training step.")] = _D.batch_size,
        grid: Annotated[int, typer.Option(help="Token grid G of the demo store (G*G tokens per expert; the paper uses 24).")] = _D.grid,
        text_warmup_steps: Annotated[int, typer.Option(
            "--text-warmup-steps",
            help="Text-only warm-up of the tiny LLM on the sample's training-split targets before pre-alignment "
                 "(0: a purely random LLM, which learns no image dependence).")] = _D.text_warmup_steps,
        freeze_llm: Annotated[bool, typer.Option("--freeze-llm", help="Keep the (warmed-up) LLM frozen in every stage (default: it trains with the stages).")] = _D.freeze_llm,
        lora: Annotated[bool, typer.Option("--lora", help="Train LoRA adapters on a frozen LLM instead of the whole LLM.")] = _D.lora,
        targets: Annotated[str, typer.Option(
            help="Where the detection and segmentation targets come from: 'dataset' (the sample's own boxes "
                 "and masks) or 'experts' (the random-weight Grounding-DINO / SAM2 predictions, noise-like).")] = _D.targets,
        fmt: Annotated[str, typer.Option("--format", help="Store format: zarr or wds.")] = _D.format,
        address: Annotated[Optional[str], typer.Option(help="Existing Ray cluster to run on (default: a local one).")] = None,
        no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars (logs only).")] = False,
    ) -> None:
        """Run the whole pipeline on the embedded sample: data -> 4 experts -> training -> eval -> report.

        Everything uses RANDOM weights (real architectures at small sizes, a tiny random LLM given a
        text-only warm-up), on CPU, in a few minutes. The report (OUT/report.md) compares every stage's
        held-out loss with true and with permuted images, and shows the commands for real weights on GPUs.
        """
        from astrea.demo import run

        run(DemoConfig(out=out, images=images, shards=shards, steps=steps, batch_size=batch_size, grid=grid,
                       text_warmup_steps=text_warmup_steps, freeze_llm=freeze_llm, lora=lora, targets=targets, format=fmt,
                       address=address,
                       progress=not no_progress))
