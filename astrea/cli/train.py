"""CLI for 'train' (thin: parse, then call astrea.train.run)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from astrea.cli._common import user_errors
from astrea.cli._defaults import bound_overrides, unset_option

# the config the options set: None = not given (the --config file, else TrainConfig's default, shown in --help)
T = "astrea.train.config:TrainConfig."

HELP = """Train Astrea's light parts against an LLM by streaming the feature store (never runs an expert).

Examples:\n
  astrea train --from-shards ./store --data sample --out runs/pre --llm tiny-random --steps 50\n
  astrea train --from-shards ./store --data laion --out runs/pre --stages caption,classification\n
  astrea train --config train.yaml --set optim.lr=2e-4 --set residual.reading=attn\n
  astrea train --from-shards ./store --data laion --out runs/pre --resume\n
  astrea train --from-shards ./store --data coco --out runs/it --stages main --set init_from=runs/pre --instructions llava_v1_5_mix665k.json\n
  torchrun --nproc-per-node 8 -m astrea.train --config train.yaml     (or --workers 8 [--address ...])

Stages run in the order given (default: caption,classification,detection,segmentation, then main when
installed; 'all' trains every remaining pre-alignment expert at once, e.g. --stages caption,all).
A config file (YAML/TOML) sets any field; flags override it; the resolved config is saved as RUN/config.yaml.
"""


def register(app: typer.Typer) -> None:
    app.command("train", help=HELP, no_args_is_help=True)(train)


@user_errors
def train(
    from_shards: Optional[Path] = typer.Option(None, "--from-shards", help="Feature store directory \\[default: config file, else ASTREA_HOME config 'store']."),
    data: Optional[str] = unset_option(T + "data", "--data", "-d", shown=False, help="Dataset name inside the store."),
    out: Optional[Path] = unset_option(T + "out", "--out", "-o", shown=False, help="Run directory (checkpoints, metrics, summary)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML/TOML file with TrainConfig fields."),
    stages: Optional[str] = unset_option(T + "stages", "--stages", help="Comma-separated stage order, e.g. caption,classification or caption,all."),
    steps: Optional[int] = unset_option(T + "steps", "--steps", help="Optimizer steps per stage."),
    batch_size: Optional[int] = unset_option(T + "batch_size", "--batch-size", "-b", help="Samples per micro-batch per process."),
    grad_accum: Optional[int] = unset_option(T + "optim.grad_accum", "--grad-accum", help="Micro-batches per optimizer step."),
    lr: Optional[float] = unset_option(T + "optim.lr", "--lr", help="Peak learning rate."),
    llm: Optional[str] = unset_option(T + "llm.name", "--llm", help="Causal LM: hub id, local directory, or tiny-random (random weights, tests/demo)."),
    lora: Optional[bool] = unset_option(T + "llm.lora", "--lora/--no-lora", help="Train LoRA adapters on the LLM (peft)."),
    device: Optional[str] = unset_option(T + "device", "--device", help="auto | cpu | cuda | cuda:N."),
    resume: bool = typer.Option(False, "--resume", help="Continue RUN from its latest checkpoint (exactly where it stopped)."),
    save_every: Optional[int] = unset_option(T + "save_every", "--save-every", help="Checkpoint every N steps (0: stage ends only)."),
    workers: Optional[int] = unset_option(T + "workers", "--workers", help="Ray Train workers (data parallel)."),
    address: Optional[str] = unset_option(T + "address", "--address", shown=False, help="Ray cluster address for --workers (auto, ray://host:10001)."),
    seed: Optional[int] = unset_option(T + "seed", "--seed", help="Seed for shuffling, init and residual draws."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    top_k: Optional[int] = unset_option(T + "moe.top_k", "--top-k", help="Main stage: experts mixed per token, 1..4 (Tab. 3; = --set moe.top_k=K)."),
    no_residual: bool = typer.Option(False, "--no-residual", help="No random residual attention (Tab. 4; = --set residual.enabled=false)."),
    no_moco: bool = typer.Option(False, "--no-moco", help="Main stage without MoCo (Tab. 4; = --set moco.enabled=false)."),
    instructions: list[Path] = typer.Option([], "--instructions", help="Main stage: LLaVA-format instruction JSON/JSONL joined with the store by image (repeatable; = instructions.files)."),
    set_: list[str] = typer.Option([], "--set", help="Any config field, dotted: --set residual.p=0.3 --set stage_experts.caption=clip."),
) -> None:
    from astrea.train import run
    from astrea.train.config import TrainConfig, shorthand_overrides
    from astrea.train.errors import TrainError

    overrides: dict[str, object] = {
        **bound_overrides(train, locals()),  # every unset_option above, to the field it names
        "store": str(from_shards) if from_shards else None,
        "resume": True if resume else None,
        "progress": False if no_progress else None,
        # the negated ablation flags go through the table the sweep's variant fields use (--top-k is bound
        # to the same field as that table's top_k: tests/cli/test_defaults.py checks)
        **shorthand_overrides({"no_residual": no_residual or None, "no_moco": no_moco or None}),
        "instructions.files": [str(p) for p in instructions] or None,
    }
    for item in set_:
        if "=" not in item:
            raise TrainError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set optim.lr=2e-4")
        key, value = item.split("=", 1)
        overrides[key.strip()] = _parse_value(value)
    cfg = TrainConfig.load(config, overrides)
    if not cfg.store:
        from astrea.config import default_store

        cfg.store = str(default_store())
    summary = run(cfg)
    typer.echo(format_summary(summary))


def _parse_value(text: str) -> object:
    """YAML scalars/lists/maps from --set (``0.3``, ``true``, ``[a, b]``); plain text otherwise."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def format_summary(summary: dict) -> str:
    if not summary:
        return "training finished (no summary: see the workers' logs)"
    llm = summary["llm"]
    rnd = " (RANDOM WEIGHTS: outputs are meaningless)" if llm.get("random_weights") else ""
    if llm.get("random_weights") and llm.get("text_warmup"):
        w = llm["text_warmup"]
        tok = llm.get("tokenizer") or {}
        fitted = f"; BPE tokenizer of {tok['vocab']} fitted on them" if tok.get("kind") == "fitted" else ""
        rnd = (f" (RANDOM init, then a text-only warm-up: {w['steps']} steps on {w['texts']} training-split "
               f"target texts, no images{fitted})")
    lines = [f"run {summary['run']}: LLM {llm['source']}{rnd}, {summary['world_size']} process(es)"]
    if any(summary.get("experts_random_weights", {}).values()):
        lines.append("experts with RANDOM WEIGHTS: " + ", ".join(n for n, r in summary["experts_random_weights"].items() if r))
    lines.append(f"{'stage':<15}{'steps':>6}{'held-out L_reg before':>23}{'after':>9}{'permuted':>10}"
                 f"{'image gain':>12}{'samples/s':>11}{'data wait':>11}")

    def f(v: object, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, int | float) else "-"

    for s in summary["stages"]:
        after, perm = s.get("heldout_after"), s.get("heldout_permuted_after")
        gain = perm - after if isinstance(after, int | float) and isinstance(perm, int | float) else None
        lines.append(
            f"{s['name']:<15}{s['steps']:>6}{f(s['heldout_before'], '.4f'):>23}{f(after, '.4f'):>9}"
            f"{f(perm, '.4f'):>10}{f(gain, '+.4f'):>12}"
            f"{f(s['samples_per_s'], '.1f'):>11}{f(s['data_wait_fraction'], '.1%'):>11}"
        )
    lines.append("permuted: the same held-out texts with each image's features swapped for another image's; "
                 "image gain = permuted - after (about 0: the image is not used)")
    for s in summary["stages"]:
        t = (s.get("extra") or {}).get("targets") or {}
        cut, dropped = t.get("cut_tasks") or {}, t.get("dropped_items") or {}
        if cut or dropped:
            what = []
            if dropped:
                what.append("items dropped to fit: " + ", ".join(f"{k} {v}" for k, v in dropped.items()))
            if cut:
                what.append("targets cut (content lost): " + ", ".join(f"{k} {v}" for k, v in cut.items()))
            lines.append(f"{s['name']}: {t.get('targets', 0)} targets vs dataset.max_text_tokens, " + "; ".join(what))
    for s in summary["stages"]:
        ins = (s.get("extra") or {}).get("instructions")
        if ins:
            lines.append(f"{s['name']}: instructions: {ins['records']} records, {ins['matched']} joined to {ins['images']} "
                         f"store images, {ins['text_only']} text-only, {ins['unmatched']} skipped (image not in the store)")
    store = summary.get("store") or {}
    if store.get("damaged_rows_skipped"):
        lines.append(f"store: {store['damaged_rows_skipped']} damaged row(s) skipped (dataset.skip_damaged): "
                     + "; ".join(store.get("damaged", [])[:3]) + (" ..." if store["damaged_rows_skipped"] > 3 else ""))
    if store.get("units_not_joined"):
        nj = store["units_not_joined"]
        shown = "; ".join(f"{u} ({', '.join(f'{e}: {why}' for e, why in v.items())})" for u, v in list(nj.items())[:3])
        lines.append(f"store: {len(nj)} unit(s) not read (not committed for every expert): {shown}"
                     + (" ..." if len(nj) > 3 else ""))
    drops = summary.get("target_render_drops") or {}
    if drops:
        lines.append("expert outputs dropped from targets: " + ", ".join(f"{k} x{v}" for k, v in drops.items()))
    return "\n".join(lines)
