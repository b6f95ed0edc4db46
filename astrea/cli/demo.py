"""CLI for `astrea demo` (thin: parse, then call astrea.demo.run)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from astrea.cli._common import user_errors


def register(app: typer.Typer) -> None:
    @app.command("demo")
    @user_errors
    def demo(
        out: Annotated[str, typer.Option("--out", help="Directory for the sample data, the store, the run and report.md.")] = "demo_out",
        images: Annotated[int, typer.Option(help="Images in the generated sample dataset (plus 2 deliberately broken ones).")] = 24,
        shards: Annotated[int, typer.Option(help="Source shards (= store units) in the sample dataset.")] = 2,
        steps: Annotated[int, typer.Option(help="Optimizer steps per training stage.")] = 30,
        batch_size: Annotated[int, typer.Option("--batch-size", help="Images per extraction batch and per training step.")] = 4,
        grid: Annotated[int, typer.Option(help="Token grid G of the demo store (G*G tokens per expert; the paper uses 24).")] = 24,
        fmt: Annotated[str, typer.Option("--format", help="Store format: zarr or wds.")] = "zarr",
        address: Annotated[Optional[str], typer.Option(help="Existing Ray cluster to run on (default: a local one).")] = None,
        no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars (logs only).")] = False,
    ) -> None:
        """Run the whole pipeline on the embedded sample: data -> 4 experts -> training -> eval -> report.

        Everything uses RANDOM weights (real architectures at small sizes, a tiny random LLM), on CPU,
        in a few minutes. The report (OUT/report.md) shows the commands for real weights on GPUs.
        """
        from astrea.demo import DemoConfig, run

        run(DemoConfig(out=out, images=images, shards=shards, steps=steps, batch_size=batch_size, grid=grid,
                       format=fmt, address=address, progress=not no_progress))
