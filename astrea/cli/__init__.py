"""The `astrea` command. Thin: each sub-module parses its options and calls one `run(...)` function.

Command table (module -> commands):
  data     astrea data sample|add|ls        astrea.data
  experts  astrea experts ls                astrea.extract.experts
  extract  astrea extract                   astrea.extract.run
  shards   astrea shards ls|info|verify     astrea.shards
  train    astrea train                     astrea.train
  analysis astrea eval|report|sweep        astrea.train
  generate astrea generate                  astrea.train.generate
  demo     astrea demo                      astrea.demo
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="astrea",
    help=(
        "Astrea: run four frozen vision experts (SigLIP, RAM++, Grounding-DINO, SAM2) once over an image "
        "set into a persistent feature store, then train Astrea's light parts (projectors, random residual "
        "attention, MoE router + adapters, MoCo) against an LLM by streaming that store.\n\n"
        "Start with `astrea demo` (sample data, all four experts with random weights, training, report)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_COMMAND_MODULES = ("data", "experts", "extract", "shards", "train", "analysis", "generate", "demo")
for _name in _COMMAND_MODULES:
    importlib.import_module(f"astrea.cli.{_name}").register(app)


def main() -> None:
    app()
