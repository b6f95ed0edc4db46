"""CLI for 'extract' (thin: parse, then call astrea.extract.run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from astrea.cli._common import user_errors
from astrea.cli._defaults import field_option

# the config every option below sets; each option's default is read from its field
E = "astrea.extract.config:ExtractConfig."

HELP = """Run frozen experts over an image source into the feature store (a Ray job).

Examples:\n
  astrea extract --expert sam2 --data laion\n
  astrea extract --expert all --data sample --weights random --small\n
  astrea extract --expert sam2 --arch sam2=sam2.hiera_tiny --weights sam2=/ckpt/sam2.1_hiera_tiny.pt --data laion\n
  astrea extract --expert siglip --data /data/cc3m --address ray://head:10001 --workers 8

Each source shard becomes one store unit, committed atomically. Units already committed with the same
expert spec (fingerprint) are skipped, so rerunning a finished job does nothing and rerunning a killed
job does only what is missing. Images that cannot be used are recorded per key with a reason; the exit
code is 0 when the job ran (failed images are counted, not fatal), 1 when it ran but some unit could not be
written (listed; rerun to retry), 2 when it could not run.
"""


def register(app: typer.Typer) -> None:
    app.command("extract", help=HELP, no_args_is_help=True)(extract)


@user_errors
def extract(
    expert: list[str] = typer.Option(..., "--expert", "-e", help="Expert to run: siglip, ram_plus, grounding_dino, sam2, or all (repeatable; run in stage order)."),
    data: str = typer.Option(..., "--data", "-d", help="Image source: a catalog name (astrea data ls), or a path (img2dataset WebDataset dir, image folder)."),
    store: Optional[Path] = typer.Option(None, "--store", help="Feature store directory \\[default: config 'store', else ./store]."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Dataset name inside the store \\[default: the source's name]."),
    source_format: Optional[str] = typer.Option(None, "--source-format", help="Source format when it cannot be detected (see astrea data)."),
    arch: list[str] = typer.Option([], "--arch", help="Architecture variant, EXPERT=VARIANT or VARIANT for all (see astrea experts ls)."),
    weights: list[str] = typer.Option([], "--weights", "-w", help="random | hub id | local path; EXPERT=... for one expert \\[default: the variant's hub id; random for --small]."),
    small: bool = field_option(E + "small", "--small", help="Each expert's small test/demo variant (random weights; fast on CPU)."),
    option: list[str] = typer.Option([], "--option", help="Expert-specific setting EXPERT.KEY=VALUE (JSON value), e.g. grounding_dino.box_threshold=0.3."),
    fmt: str = field_option(E + "format", "--format", help="Unit format: zarr | wds."),
    codec: str = field_option(E + "codec", "--codec", help="Array codec of zarr units: raw (default: near raw-file speed) | zstd (~8% smaller at float16, ~30x the read CPU). Part of the fingerprint."),
    dtype: str = field_option(E + "dtype", "--dtype", help="Storage dtype of tokens and pooled: float16 | bfloat16 | float32 | int8 (per-token scale: 0.5x the bytes of float16, dequantised to float32 on read; docs/store.md)."),
    grid: int = field_option(E + "grid", "--grid", help="Tokens are resampled to GRID x GRID (24 -> 576 tokens)."),
    compute_dtype: str = field_option(E + "compute_dtype", "--compute-dtype", help="Model compute dtype: auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16."),
    seed: int = field_option(E + "seed", "--seed", help="Init seed for random weights."),
    device: str = field_option(E + "device", "--device", help="auto | cpu | cuda | cuda:N (auto: cuda when the actors hold GPUs)."),
    batch_size: int = field_option(E + "batch_size", "--batch-size", "-b", help="Images per forward pass on an inference actor."),
    image_timeout: float = field_option(E + "image_timeout_s", "--image-timeout", help="Deadline in seconds per image: a unit fails (reason in the report; a rerun retries it) and its worker is replaced when the worker makes no progress for IMAGE_TIMEOUT x --batch-size seconds (a source read or forward that hangs)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Inference actors \\[default: one per GPU of the cluster, 1 without GPUs]."),
    num_gpus: Optional[float] = typer.Option(None, "--num-gpus", help="GPUs per inference actor \\[default: 1 if the cluster has GPUs, else 0]."),
    cpus_per_task: float = field_option(E + "cpus_per_task", "--cpus-per-task", help="CPUs per decode/preprocess task."),
    cpus_per_worker: float = field_option(E + "cpus_per_worker", "--cpus-per-worker", help="CPUs per inference actor = its torch CPU threads (the forward on CPU; output conversion and writing on a GPU)."),
    address: Optional[str] = typer.Option(None, "--address", help="Existing Ray cluster (e.g. auto, ray://host:10001) \\[default: start a local one for the job]."),
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", help="CPUs of the local Ray cluster \\[default: all]."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Whole shards, in order, until they hold at least this many images (a unit is never partial)."),
    shards: Optional[str] = typer.Option(None, "--shards", help="Subset of source shards: names and inclusive ranges, e.g. 00000,00003-00005."),
    prerequisite: list[str] = typer.Option([], "--prerequisite", help="Which stored outputs prompt a dependent expert, e.g. ram_plus@1a2b3c4d5e6f \\[default: this run's, else the store's only one]."),
    without_prerequisites: bool = field_option(E + "without_prerequisites", "--without-prerequisites", help="Run grounding_dino / sam2 on their fallback prompts (default vocabulary / point grid) instead of stored tags / boxes."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    report_json: Optional[Path] = typer.Option(None, "--report", help="Also write the job report (JSON) here."),
) -> None:
    from astrea.extract import ExtractConfig, ExtractConfigError, format_summary, run
    from astrea.extract.config import parse_keyed, parse_options

    names = ExtractConfig(experts=list(expert), data=data).expert_names()
    prereqs: dict[str, str] = {}
    for p in prerequisite:
        name = p.split("@", 1)[0]
        if name in prereqs:
            raise ExtractConfigError(f"--prerequisite: given twice for {name!r}")
        prereqs[name] = p
    cfg = ExtractConfig(
        experts=names, data=data, store=str(store) if store else None, dataset=dataset,
        source_format=source_format, arch=parse_keyed(arch, field_name="--arch", experts=names),
        weights=parse_keyed(weights, field_name="--weights", experts=names),
        options=parse_options(option, experts=names), small=small, format=fmt, codec=codec, dtype=dtype, grid=grid,
        compute_dtype=compute_dtype, seed=seed, device=device, batch_size=batch_size,
        image_timeout_s=image_timeout, workers=workers,
        num_gpus=num_gpus, cpus_per_task=cpus_per_task, cpus_per_worker=cpus_per_worker, address=address,
        num_cpus=num_cpus, limit=limit, shards=shards, prerequisites=prereqs,
        without_prerequisites=without_prerequisites, progress=not no_progress,
    )
    report = run(cfg)
    typer.echo(format_summary(report))
    if report_json is not None:
        report_json.parent.mkdir(parents=True, exist_ok=True)
        report_json.write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    if report["status"] == "incomplete":
        # Some unit could not be written (e.g. an unreadable source shard): the job ran but is not
        # done; a rerun retries exactly those units.
        typer.echo("warning: some units were not written (listed above); rerun to retry them", err=True)
        raise typer.Exit(1)
