"""CLI for 'shards': inspect and verify the feature store (thin: logic in astrea.shards.audit)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from astrea.cli._common import user_errors

STORE_HELP = "Feature store root (default: `store:` in $ASTREA_HOME/config.yaml, else ./store)."


def _store(path: Optional[Path]):  # noqa: ANN202 - Store, imported lazily
    from astrea.config import default_store
    from astrea.shards import Store

    return Store(path if path is not None else default_store())


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    typer.echo("  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip())
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def register(app: typer.Typer) -> None:
    shards_app = typer.Typer(
        help="Inspect the feature store: datasets, experts and fingerprints, units, images ok/failed, bytes; "
             "verify checksums.",
        no_args_is_help=True)
    app.add_typer(shards_app, name="shards")

    dataset_opt = typer.Option(None, "--dataset", "-d", help="Only this dataset.")
    expert_opt = typer.Option(None, "--expert", "-e", help="Only this expert: NAME or NAME@FINGERPRINT (prefix).")

    @shards_app.command("ls")
    @user_errors
    def ls(
        store: Optional[Path] = typer.Argument(None, help=STORE_HELP, show_default=False, metavar="STORE"),
        dataset: Optional[str] = dataset_opt,
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """One line per expert directory: dataset, EXPERT@FINGERPRINT, committed units, images ok/failed,
        bytes per image, dtype, grid, format, and whether the weights were random."""
        from astrea.shards.audit import scan

        st = _store(store)
        infos = scan(st, dataset)
        if as_json:
            typer.echo(json.dumps([i.to_dict() for i in infos], indent=2))
            return
        if not infos:
            typer.echo(f"{st.root}: no expert directories yet (run `astrea extract`)")
            return
        rows = []
        for i in infos:
            if i.error:
                rows.append((i.dataset, i.dir, "-", "-", "-", "-", "-", "-", "-", f"INVALID: {i.error}"))
                continue
            extra = []
            if i.uncommitted or i.temp_files:
                extra.append(f"{len(i.uncommitted) + len(i.temp_files)} uncommitted")
            rows.append((i.dataset, i.dir, str(len(i.units)), str(i.ok), str(i.failed), _size(i.bytes_per_image),
                         i.dtype, f"{i.grid}x{i.grid}", i.format,
                         ("RANDOM" if i.random_weights else i.weights) + (f" ({', '.join(extra)})" if extra else "")))
        _table(("dataset", "expert@fingerprint", "units", "ok", "failed", "bytes/img", "dtype", "grid", "format",
                "weights"), rows)

    @shards_app.command("info")
    @user_errors
    def info(
        store: Optional[Path] = typer.Argument(None, help=STORE_HELP, show_default=False, metavar="STORE"),
        dataset: Optional[str] = dataset_opt,
        expert: Optional[str] = expert_opt,
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
    ) -> None:
        """Per expert: the spec (arch, weights, random-weights flag, dtype, grid, dims, format) and per unit
        images ok/failed, failures by reason and bytes."""
        from astrea.shards.audit import scan

        st = _store(store)
        infos = scan(st, dataset, expert)
        if as_json:
            typer.echo(json.dumps([i.to_dict() for i in infos], indent=2))
            return
        if not infos:
            typer.echo(f"{st.root}: no expert directories yet (run `astrea extract`)")
        for i in infos:
            typer.echo(f"{i.dataset}/{i.dir}")
            if i.error:
                typer.echo(f"  INVALID: {i.error}\n")
                continue
            w = f"{i.weights}" + ("  (RANDOM WEIGHTS: features carry no pretrained knowledge)" if i.random_weights else "")
            typer.echo(f"  arch {i.arch}   weights {w}")
            typer.echo(f"  tokens {i.grid}x{i.grid}x{i.token_dim}   pooled {i.pooled_dim}   dtype {i.dtype}   "
                       f"format {i.format}")
            typer.echo(f"  units {len(i.units)} committed   images {i.ok} ok / {i.failed} failed   "
                       f"{_size(i.bytes)} ({_size(i.bytes_per_image)}/image)")
            if i.uncommitted or i.temp_files:
                typer.echo(f"  uncommitted: {', '.join(i.uncommitted + i.temp_files)} "
                           "(cleaned up by the next extraction run)")
            rows = [(u.unit, str(u.ok), str(u.failed), _size(u.bytes),
                     ", ".join(f"{k} {v}" for k, v in u.failures_by_reason.items()) or "-") for u in i.units]
            if rows:
                typer.echo("")
                _table(("  unit", "ok", "failed", "bytes", "failures by reason"), [("  " + r[0], *r[1:]) for r in rows])
            typer.echo("")

    @shards_app.command("verify")
    @user_errors
    def verify(
        store: Optional[Path] = typer.Argument(None, help=STORE_HELP, show_default=False, metavar="STORE"),
        dataset: Optional[str] = dataset_opt,
        expert: Optional[str] = expert_opt,
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
        repair: bool = typer.Option(False, "--repair", help="Move corrupt and missing units aside "
                                    "(EXPERT_DIR/.quarantine/) so the next `astrea extract` redoes them, and "
                                    "clean up what crashed writers left. Units being written are left alone."),
    ) -> None:
        """Recompute every checksum (index against its stats file, every stored row against the index) and
        report corrupt, missing and uncommitted units. Exit code 1 when anything was wrong (repaired or not)."""
        from astrea.shards.audit import verify as run_verify

        st = _store(store)
        rep = run_verify(st, dataset, expert, repair=repair)
        if as_json:
            typer.echo(json.dumps(rep.to_dict(), indent=2))
        else:
            for p in rep.problems:
                typer.echo(f"{p.kind.upper():12s} {p.path}: {p.detail}" + (f" [repaired: {p.repaired}]" if p.repaired else ""))
            if rep.quarantined:
                typer.echo(f"repaired: {len(rep.quarantined)} unit(s) moved aside; rerun `astrea extract` with the "
                           "same experts and data to write them again")
            verdict = "OK" if rep.ok else f"{len(rep.problems)} problem(s)"
            typer.echo(f"{verdict}: {rep.experts} expert dir(s), {rep.units_checked} unit(s), "
                       f"{rep.rows_checked} key(s) checked in {st.root}")
        if not rep.ok:
            raise typer.Exit(1)
