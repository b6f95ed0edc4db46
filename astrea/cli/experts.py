"""CLI for 'experts' (thin: list the expert registry; builds no model)."""

from __future__ import annotations

import json
from typing import Any

import typer

from astrea.cli._common import user_errors
from astrea.cli._defaults import field_option

# the table's grid and dtype default to what an extraction writes (ExpertConfig's storage settings)
_EXPERT = "astrea.extract.experts.registry:ExpertConfig."


def bytes_per_image(token_dim: int, pooled_dim: int, grid: int, dtype: str) -> int:
    """Array bytes one image costs in the store: tokens [grid*grid, D] + pooled [D'] (before compression;
    int8 rows carry a 4-byte scale). `astrea shards estimate` adds index, outputs and container bytes."""
    from astrea.shards.dtypes import itemsize, stored_width

    return (grid * grid * stored_width(token_dim, dtype) + stored_width(pooled_dim, dtype)) * itemsize(dtype)


def expert_rows(grid: int, dtype: str) -> list[dict[str, Any]]:
    """One row per (expert, variant), read from the modules' VARIANTS tables (no model is built)."""
    from astrea.extract.experts.registry import EXPERTS, expert_module
    from astrea.schemas.stages import EXPERT_ORDER, STAGE_OF_EXPERT

    rows: list[dict[str, Any]] = []
    names = [*EXPERT_ORDER, *(n for n in EXPERTS.names() if n not in EXPERT_ORDER)]
    for name in names:
        try:
            mod = expert_module(name)
            table = mod.VARIANTS
        except Exception as e:  # one broken optional dependency must not hide the other experts
            rows.append({"expert": name, "stage": STAGE_OF_EXPERT.get(name, ""),
                         "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
            continue
        default, small = getattr(mod, "DEFAULT", None), getattr(mod, "DEFAULT_SMALL", None)
        for vname, v in table.items():
            rows.append({
                "expert": name, "stage": STAGE_OF_EXPERT.get(name, ""), "variant": vname,
                "default": vname == default, "default_small": vname == small, "small": bool(v.small),
                "token_dim": v.token_dim, "pooled_dim": v.pooled_dim, "image_size": v.image_size,
                "default_weights": v.default_weights, "description": v.description,
                "bytes_per_image": bytes_per_image(v.token_dim, v.pooled_dim, grid, dtype),
            })
    return rows


def _fmt_bytes(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n < 2**20 else f"{n / 2**20:.2f} MiB"


def register(app: typer.Typer) -> None:
    experts_app = typer.Typer(help="The frozen vision experts: variants, token sizes, weights.", no_args_is_help=True)
    app.add_typer(experts_app, name="experts")

    @experts_app.command("ls")
    @user_errors
    def ls(
        grid: int = field_option(_EXPERT + "grid", "--grid", help="Token grid used for the bytes-per-image column."),
        dtype: str = field_option(_EXPERT + "dtype", "--dtype", help="Storage dtype for the bytes-per-image column."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON rows instead of a table."),
    ) -> None:
        """List experts (stage order), their variants, token dims, image size, default weights and bytes per
        image at the given grid and dtype. `*` marks the real-size default, `s` the --small default."""
        from astrea.cli._common import AstreaError

        from astrea.schemas import STORAGE_DTYPES

        if dtype not in STORAGE_DTYPES:
            raise AstreaError(f"--dtype {dtype!r} is not valid; choose one of {list(STORAGE_DTYPES)}")
        if grid < 1:
            raise AstreaError(f"--grid {grid} must be >= 1")
        rows = expert_rows(grid, dtype)
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        head = ("expert", "stage", "variant", "tok_dim", "pool_dim", "img", f"bytes/img@{grid}x{grid} {dtype}",
                "default weights")
        table = []
        for r in rows:
            if "error" in r:
                table.append((r["expert"], r["stage"], f"(unavailable: {r['error']})", "", "", "", "", ""))
                continue
            mark = "*" if r["default"] else ("s" if r["default_small"] else " ")
            table.append((r["expert"], r["stage"], f"{mark} {r['variant']}", str(r["token_dim"]), str(r["pooled_dim"]),
                          str(r["image_size"]), _fmt_bytes(r["bytes_per_image"]),
                          r["default_weights"] or ("random only (test size)" if r["small"] else "-")))
        widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(head)]
        typer.echo("  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip())
        for t in table:
            typer.echo("  ".join(c.ljust(w) for c, w in zip(t, widths)).rstrip())
        typer.echo("\n* real-size default   s --small default   bytes/img = (grid^2 x tok_dim + pool_dim) x itemsize, "
                   "before compression")
