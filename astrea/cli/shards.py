"""CLI for 'shards': inspect, verify, convert and plan the feature store (thin: logic in astrea.shards.audit,
astrea.shards.convert and astrea.extract.estimate)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from astrea.cli._common import user_errors
from astrea.cli._defaults import unset_option
from astrea.extract.experts.registry import ExpertConfig

STORE_HELP = "Feature store root (default: `store:` in $ASTREA_HOME/config.yaml, else ./store)."
STORE_ARG = typer.Argument(None, help=STORE_HELP, show_default=False, metavar="STORE")
DATASET_OPT = typer.Option(None, "--dataset", "-d", help="Only this dataset.")
EXPERT_OPT = typer.Option(None, "--expert", "-e", help="Only this expert: NAME or NAME@FINGERPRINT (prefix).")


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
             "verify checksums; convert an expert directory to another dtype/format; estimate a store's size.",
        no_args_is_help=True)
    app.add_typer(shards_app, name="shards")
    for name, fn in (("ls", ls), ("info", info), ("verify", verify), ("convert", convert), ("estimate", estimate)):
        shards_app.command(name)(user_errors(fn))


def ls(
    store: Optional[Path] = STORE_ARG,
    dataset: Optional[str] = DATASET_OPT,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """One line per expert directory: dataset, EXPERT@FINGERPRINT, committed units, images ok/failed,
    bytes per image, dtype, grid, format, and whether the weights were random."""
    from astrea.shards.audit import scan

    st = _store(store)
    infos = scan(st, dataset)
    if as_json:
        typer.echo(json.dumps([i.to_dict() for i in infos], indent=2))
    elif not infos:
        typer.echo(f"{st.root}: no expert directories yet (run `astrea extract`)")
    else:
        _table(("dataset", "expert@fingerprint", "units", "ok", "failed", "bytes/img", "dtype", "grid", "format",
                "weights"), [_ls_row(i) for i in infos])


def _ls_row(i) -> tuple[str, ...]:  # noqa: ANN001 - an audit.ExpertDirInfo
    if i.error:
        return (i.dataset, i.dir, "-", "-", "-", "-", "-", "-", "-", f"INVALID: {i.error}")
    extra = []
    if i.uncommitted or i.temp_files:
        extra.append(f"{len(i.uncommitted) + len(i.temp_files)} uncommitted")
    return (i.dataset, i.dir, str(len(i.units)), str(i.ok), str(i.failed), _size(i.bytes_per_image),
            i.dtype, f"{i.grid}x{i.grid}", i.format,
            ("RANDOM" if i.random_weights else i.weights) + (f" ({', '.join(extra)})" if extra else ""))


def info(
    store: Optional[Path] = STORE_ARG,
    dataset: Optional[str] = DATASET_OPT,
    expert: Optional[str] = EXPERT_OPT,
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
        _print_info(i)


def _print_info(i) -> None:  # noqa: ANN001 - an audit.ExpertDirInfo
    typer.echo(f"{i.dataset}/{i.dir}")
    if i.error:
        typer.echo(f"  INVALID: {i.error}\n")
        return
    w = f"{i.weights}" + ("  (RANDOM WEIGHTS: features carry no pretrained knowledge)" if i.random_weights else "")
    typer.echo(f"  arch {i.arch}   weights {w}")
    typer.echo(f"  tokens {i.grid}x{i.grid}x{i.token_dim}   pooled {i.pooled_dim}   dtype {i.dtype}   "
               f"format {i.format}")
    if i.converted_from:
        c = i.converted_from
        typer.echo(f"  converted from {i.expert}@{c.get('fingerprint')} ({c.get('dtype')}, {c.get('format')}) "
                   f"by {c.get('by')}")
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


def verify(
    store: Optional[Path] = STORE_ARG,
    dataset: Optional[str] = DATASET_OPT,
    expert: Optional[str] = EXPERT_OPT,
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


def convert(
    store: Optional[Path] = STORE_ARG,
    dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset of the expert directory to convert."),
    expert: str = typer.Option(..., "--expert", "-e", help="Expert directory: NAME or NAME@FINGERPRINT (prefix)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="New storage dtype: float16 | bfloat16 | float32 | "
                                        "int8 (per-token scale) (default: the source's)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="New unit format: zarr | wds (default: the source's)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write into this store instead (same dataset name) "
                                       "(default: STORE, beside the source)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Re-encode an expert directory into another storage dtype and/or format without running the expert.

    The result is a new directory EXPERT@NEWFINGERPRINT whose expert.json records where it came from
    (converted_from: source fingerprint, dtype, format); each unit's stats name the source unit's index
    hash. The source is only read (every row verified). Units are committed one by one with the store's
    commit protocol: an interrupted conversion leaves no partial unit, and rerunning the same command
    skips the units already converted and finishes the rest."""
    from astrea.shards.convert import ConvertConfig

    st = _store(store)
    rep = ConvertConfig(store=st.root, dataset=dataset, expert=expert, dtype=dtype, format=fmt,
                        out=out).build().run()
    if as_json:
        typer.echo(json.dumps(rep.to_dict(), indent=2))
    else:
        typer.echo(f"{rep.source} -> {rep.target} ({rep.dtype}, {rep.format})")
        typer.echo(f"  converted {len(rep.converted)} unit(s), {rep.rows} key(s); skipped {len(rep.skipped)} "
                   "already converted" + (f"; {len(rep.busy)} busy (another writer): {', '.join(rep.busy)}"
                                              if rep.busy else ""))
        if rep.source_bytes:
            typer.echo(f"  bytes: {_size(rep.source_bytes)} -> {_size(rep.target_bytes)} "
                       f"({rep.target_bytes / rep.source_bytes:.3f}x) for the units converted now")
    if rep.busy:
        raise typer.Exit(1)


# `astrea shards estimate` sets EstimateConfig's fields (None: not given, its default, shown in --help; the
# estimate module is read only then). With no --spec the storage settings are what `astrea extract` writes
# by default (ExpertConfig's), named in the help from there.
_EST = "astrea.extract.estimate:EstimateConfig."


def estimate(
    expert: list[str] = typer.Option([], "--expert", "-e", help="NAME (its default variant) or NAME=VARIANT, "
                                     "e.g. sam2=hiera_large; repeatable. See `astrea experts ls`."),
    images: int = typer.Option(..., "--images", "-n", help="How many images the store will hold."),
    grid: Optional[int] = typer.Option(None, "--grid", help=f"Token grid (24 -> 576 tokens) (default: "
                                       f"{ExpertConfig.grid}, or the spec's)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float16 | bfloat16 | float32 | int8 "
                                        f"(default: {ExpertConfig.dtype}, or the spec's)."),
    fmt: Optional[str] = typer.Option(None, "--format", help=f"zarr | wds (default: {ExpertConfig.format}, or the spec's)."),
    spec: list[Path] = typer.Option([], "--spec", help="An expert.json (or its directory) to size instead of "
                                    "a registry variant; repeatable."),
    small: bool = typer.Option(False, "--small", help="Use each expert's small test variant."),
    images_per_unit: Optional[int] = unset_option(_EST + "images_per_unit", "--images-per-unit", help="Images per source "
                                        "shard (one unit per shard; img2dataset writes 10,000)."),
    caption_bytes: Optional[int] = unset_option(_EST + "caption_bytes", "--caption-bytes",
                                      help="Mean caption length in bytes (index)."),
    outputs_bytes: list[str] = typer.Option([], "--outputs-bytes", help="EXPERT=BYTES: measured outputs JSON "
                                            "per image (default: an assumption per expert, printed)."),
    codec: Optional[str] = typer.Option(None, "--codec", help=f"zarr array codec: raw | zstd (default: "
                                        f"{ExpertConfig.codec}, or the spec's)."),
    compression: Optional[float] = typer.Option(None, "--compression", help="Stored/raw ratio of zstd "
                                                "zarr arrays, e.g. 0.92 (default: none, an upper bound)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Bytes and files a store will take for N images, from the experts' specs alone (no model is built
    or run): token and pooled widths from the variant tables (or an expert.json), the grid, the storage
    dtype (int8 adds a 4-byte scale per token) and the unit format's container, index and metadata.
    Arrays are exact before compression; outputs JSON sizes are assumptions unless --outputs-bytes."""
    from astrea.extract.estimate import EstimateConfig

    given = {k: v for k, v in {"images_per_unit": images_per_unit, "caption_bytes": caption_bytes}.items()
             if v is not None}
    est = EstimateConfig(experts=list(expert), images=images, grid=grid, dtype=dtype, format=fmt,
                         specs=list(spec), small=small, outputs_bytes=_outputs_bytes(outputs_bytes),
                         compression=compression, codec=codec, **given).build().run()
    if as_json:
        typer.echo(json.dumps(est.to_dict(), indent=2))
        return
    rows = [(e.expert, e.arch, f"{e.grid}x{e.grid}x{e.token_dim}", e.dtype, e.format, str(e.units),
             f"{e.files:,}", _size(e.bytes_per_image), _size(e.bytes)) for e in est.experts]
    rows.append(("total", "", "", "", "", "", f"{est.files:,}", _size(est.bytes / est.images), _size(est.bytes)))
    typer.echo(f"{est.images:,} images, {est.images_per_unit:,} per unit")
    _table(("expert", "arch", "tokens", "dtype", "format", "units", "files", "bytes/img", "bytes"), rows)
    a = est.assumptions
    typer.echo(f"\nassumed: outputs JSON bytes/image {a['outputs_bytes_per_image']} (--outputs-bytes), "
               f"captions {a['caption_bytes']} B; zarr arrays {a['zarr_arrays']}")


def _outputs_bytes(items: list[str]) -> dict[str, int]:
    """``["sam2=6000"]`` -> ``{"sam2": 6000}``."""
    from astrea.errors import AstreaError

    out: dict[str, int] = {}
    for item in items:
        name, sep, val = item.partition("=")
        if not sep or not val.strip().isdigit():
            raise AstreaError(f"--outputs-bytes {item!r}: use EXPERT=BYTES, e.g. sam2=6000")
        out[name] = int(val)
    return out
