"""CLI for 'analysis': astrea eval | report | sweep (thin: parse, then call astrea.train.eval/report/sweep)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from astrea.cli._common import user_errors
from astrea.cli._defaults import unset_option

# eval/report options set EvalConfig; None = not given (EvalConfig's default, shown in --help)
EV = "astrea.train.eval:EvalConfig."

EVAL_HELP = """Held-out metrics of a training run; writes RUN/eval.json and RUN/eval.md.

Held-out L_reg per pre-alignment stage and, for the main stage, per task type (caption, tags, boxes, masks); image-text retrieval R@1/R@5 with the MoCo embeddings; per-expert routing mass overall and per task type, router entropy and load balance. Uses the run's own held-out split and checks that the store still holds the exact expert fingerprints the run trained on.

Examples:\n
  astrea eval runs/astrea --max-samples 512\n
  astrea eval runs/it --instructions heldout_questions.json
"""

REPORT_HELP = """Plots and a markdown summary of a training run: RUN/loss.png (loss per stage over steps, cf. paper Fig. 3), RUN/routing.png (routing mass per expert and task, cf. Fig. 2) and RUN/report.md. Runs `astrea eval` first when RUN/eval.json is missing (unless --no-eval). Says plainly when the LLM or the experts had random weights.

Example:\n
  astrea report runs/astrea
"""

SWEEP_HELP = """Train and evaluate a list of variants on one feature store; one comparison table.

CONFIG is a YAML file: `base:` (a train config), `set:` (overrides for all), `out:`, `eval:`, and `variants:`, each a `name` plus any of top_k, no_moco, no_residual, stage_experts, stage_order (default | reversed | all-at-once | a list) and `set:` (any dotted config field). Writes OUT/<variant>/ runs and OUT/sweep.md, OUT/sweep.csv, OUT/sweep.json. Rerunning reuses finished variants and resumes interrupted ones.

Example:\n
  astrea sweep ablations.yaml --from-shards ./store --data sample
"""


def register(app: typer.Typer) -> None:
    app.command("eval", help=EVAL_HELP, no_args_is_help=True)(eval_cmd)
    app.command("report", help=REPORT_HELP, no_args_is_help=True)(report_cmd)
    app.command("sweep", help=SWEEP_HELP, no_args_is_help=True)(sweep_cmd)


@user_errors
def eval_cmd(
    run: Path = typer.Argument(..., help="Run directory (the --out of `astrea train`).", show_default=False),
    max_samples: Optional[int] = unset_option(EV + "max_samples", "--max-samples", help="Held-out images scored (per task for the main stage)."),
    batch_size: Optional[int] = unset_option(EV + "batch_size", "--batch-size", "-b", help="Images per forward pass."),
    device: Optional[str] = unset_option(EV + "device", "--device", help="auto | cpu | cuda | cuda:N."),
    store: Optional[Path] = typer.Option(None, "--store", help="The store's path if it moved since training."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Weights file or checkpoint directory \\[default: the run's newest]."),
    instructions: list[Path] = typer.Option(
        [], "--instructions",
        help="LLaVA-format instruction JSON/JSONL: held-out answer accuracy and L_reg with the permuted-image control (repeatable).",
    ),
    max_new_tokens: Optional[int] = unset_option(EV + "max_new_tokens", "--max-new-tokens", help="Tokens generated per answer (--instructions)."),
    residual_at_eval: Optional[str] = typer.Option(
        None, "--residual-at-eval",
        help="Score the same weights with another residual.at_eval: expectation | average | all \\[default: the run's own].",
    ),
) -> None:
    from astrea.train.eval import EVAL_JSON, EVAL_MD, EvalConfig, evaluate

    given = _given(max_samples=max_samples, batch_size=batch_size, device=device, max_new_tokens=max_new_tokens)
    m = evaluate(
        EvalConfig(run=str(run), store=str(store) if store else "", weights=str(weights) if weights else "",
                   residual_at_eval=residual_at_eval or "", instructions=[str(p) for p in instructions], **given)
    )
    typer.echo((run / EVAL_MD).read_text())
    typer.echo(f"wrote {run / EVAL_JSON} and {run / EVAL_MD}" + (" (RANDOM WEIGHTS)" if any("RANDOM" in n for n in m["notes"]) else ""))


def _given(**options: object) -> dict[str, object]:
    """The options the user gave (None: not given, the config's default applies)."""
    return {k: v for k, v in options.items() if v is not None}


@user_errors
def report_cmd(
    run: Path = typer.Argument(..., help="Run directory (the --out of `astrea train`).", show_default=False),
    no_eval: bool = typer.Option(False, "--no-eval", help="Do not run `astrea eval` when RUN/eval.json is missing."),
    max_samples: Optional[int] = unset_option(EV + "max_samples", "--max-samples", help="Held-out images, when eval runs first."),
    device: Optional[str] = unset_option(EV + "device", "--device", help="Device, when eval runs first."),
) -> None:
    from astrea.train.report import report

    path = report(run, evaluate=not no_eval, eval_kwargs=_given(max_samples=max_samples, device=device))
    typer.echo(f"wrote {path}")


@user_errors
def sweep_cmd(
    config: Path = typer.Argument(..., help="Sweep YAML (base, set, out, eval, variants).", show_default=False),
    from_shards: Optional[Path] = typer.Option(None, "--from-shards", help="Feature store for every variant (overrides the file)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Dataset in the store (overrides the file)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Sweep directory (overrides `out:`)."),
    steps: Optional[int] = unset_option("astrea.train.config:TrainConfig.steps", "--steps", help="Optimizer steps per stage for every variant."),
    device: Optional[str] = unset_option("astrea.train.config:TrainConfig.device", "--device", help="Device for every variant."),
) -> None:
    from astrea.train.sweep import load_sweep, run_sweep

    overrides = {
        "store": str(from_shards) if from_shards else None,
        "data": data,
        "steps": steps,
        "device": device,
    }
    rows = run_sweep(config, overrides=overrides | ({"out": str(out)} if out else {}), echo=typer.echo)
    spec = load_sweep(config, overrides=overrides | ({"out": str(out)} if out else {}))
    typer.echo((spec.out / "sweep.md").read_text())
    failed = [r["variant"] for r in rows if str(r["status"]).startswith("failed")]
    if failed:
        typer.echo(f"error: {len(failed)} variant(s) failed: {', '.join(failed)}", err=True)
        raise typer.Exit(1)
