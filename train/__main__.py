"""``python -m astrea.train ...`` = ``astrea train ...``; handy under torchrun:
``torchrun --nproc-per-node 8 -m astrea.train --config train.yaml``."""

from __future__ import annotations

import typer

from astrea.cli.train import train


def main() -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(train)
    app()


if __name__ == "__main__":
    main()
