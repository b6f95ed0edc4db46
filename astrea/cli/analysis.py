"""CLI for 'analysis' (thin: parse, then call the package's run functions)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass
