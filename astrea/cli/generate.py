"""CLI for 'generate' (thin: parse, then call astrea.generate.run_generate)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from astrea.cli._common import user_errors
from astrea.cli._defaults import unset_option

# the options set GenerateConfig; None = not given (GenerateConfig's default, shown in --help)
G = "astrea.generate:GenerateConfig."

HELP = """Answer a prompt about one image with a trained run, streaming the answer to the terminal.

The image comes from the feature store (--key KEY, dataset --data, default the run's) or from a file
(--image PATH): then the run's experts are rebuilt from the specs the store records for the fingerprints in
RUN/run.json and run online, giving the features extraction would have stored. The prompt is rendered as
training rendered a conversation (the LLM's chat template where it has one). Greedy by default;
--temperature > 0 samples (with --top-p, --seed).

Examples:\n
  astrea generate runs/it --key 000010003 --prompt "What colour is the circle?"\n
  astrea generate runs/it --image photo.jpg --prompt "Describe the image." --temperature 0.7
"""


def register(app: typer.Typer) -> None:
    app.command("generate", help=HELP, no_args_is_help=True)(generate)


@user_errors
def generate(
    run: Path = typer.Argument(..., help="Run directory (the --out of `astrea train`).", show_default=False),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The question or instruction."),
    key: Optional[str] = typer.Option(None, "--key", "-k", help="Image key in the store."),
    image: Optional[Path] = typer.Option(None, "--image", help="Image file (experts run online)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Dataset in the store [the run's]."),
    store: Optional[Path] = typer.Option(None, "--store", help="The store's path if it moved since training."),
    max_new_tokens: Optional[int] = unset_option(G + "max_new_tokens", "--max-new-tokens", help="Tokens generated at most."),
    temperature: Optional[float] = unset_option(G + "temperature", "--temperature", help="0: greedy; > 0: sample."),
    top_p: Optional[float] = unset_option(G + "top_p", "--top-p", help="Nucleus sampling mass (with --temperature)."),
    seed: Optional[int] = unset_option(G + "seed", "--seed", help="Sampling seed."),
    device: Optional[str] = unset_option(G + "device", "--device", help="auto | cpu | cuda | cuda:N."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Weights file or checkpoint directory [the run's newest]."),
) -> None:
    from astrea.generate import GenerateConfig, run_generate

    given = {k: v for k, v in {"device": device, "max_new_tokens": max_new_tokens, "temperature": temperature,
                               "top_p": top_p, "seed": seed}.items() if v is not None}
    cfg = GenerateConfig(run=str(run), prompt=prompt, key=key or "", image=str(image) if image else "",
                         data=data or "", store=str(store) if store else "",
                         weights=str(weights) if weights else "", **given)
    out = run_generate(cfg, on_text=lambda piece: typer.echo(piece, nl=False))
    typer.echo("")
    if out["random_weights"]:
        typer.echo("(RANDOM WEIGHTS: the LLM and/or the experts had random weights; the answer tests the pipeline)",
                   err=True)
