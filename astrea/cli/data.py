"""CLI for 'data': astrea data sample | add | ls | rm (thin: parse, then call astrea.data)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from astrea.cli._common import AstreaError, user_errors
from astrea.cli._defaults import unset_option

SAMPLE_HELP = """Write the embedded sample dataset in img2dataset's WebDataset format and register it as `sample`.

Real photos shipped with scikit-image (astronaut, coffee, chelsea, ...) with hand-written captions, plus
generated scenes of coloured shapes whose captions, classes, boxes and masks are known exactly. By
default two deliberately broken members (a truncated JPEG, a zero-byte .jpg) end the last shard, so
failure counting can be seen. Reused when already written with the same options (see OUT/sample.json).

Example:\n
  astrea data sample --out data/sample --images 24 --shards 2
"""

ADD_HELP = """Register a dataset in the catalog ($ASTREA_HOME/config.yaml): NAME -> FORMAT + PATH.

The path is opened (shards listed) before it is recorded, so a wrong path or format fails now. The format is
detected when not given: a directory of .tar -> webdataset (img2dataset output), annotations/*.json -> coco,
else folder.

Examples:\n
  astrea data add laion /data/laion400m --format webdataset\n
  astrea data add coco /data/coco2017 --format coco --option split=val2017\n
  astrea data add photos ~/Pictures --format folder --option shard_size=500
"""


INSTRUCTIONS_HELP = """Join LLaVA-format instruction files with a dataset of the feature store, as `astrea train
--instructions` will: count the records joined to a stored image, the text-only ones and those whose image is not
in the store (listed, with file and record, so they can be extracted or fixed).

Example:\n
  astrea data instructions llava_v1_5_mix665k.json --store ./store --data coco
"""


def _options(items: list[str]) -> dict[str, object]:
    import yaml

    out: dict[str, object] = {}
    for item in items:
        if "=" not in item:
            raise AstreaError(f"--option {item!r}: expected KEY=VALUE, e.g. --option shard_size=500")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def _data_errors(fn):  # noqa: ANN001, ANN202 - decorator
    """DataError / a bad config file are user errors too: one line, exit 2."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        from astrea.data import DataError

        try:
            return fn(*args, **kwargs)
        except (DataError, ValueError) as e:
            raise AstreaError(e.args[0] if e.args else str(e)) from None

    return wrapper


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(
        help="Data sources: the dataset catalog (add, ls, rm) and the embedded sample dataset. A dataset is a "
             "catalog name or a path; formats: webdataset (img2dataset output), coco, folder.",
        no_args_is_help=True)
    app.add_typer(data_app, name="data")
    for name, fn, text in (("sample", sample, SAMPLE_HELP), ("add", add, ADD_HELP), ("ls", ls, None),
                           ("instructions", instructions, INSTRUCTIONS_HELP), ("rm", rm, None)):
        data_app.command(name, help=text)(user_errors(_data_errors(fn)))


# `astrea data sample` sets ensure_sample's parameters: None = not given (its default, shown in --help;
# read from there only when the help is printed: the sample module imports numpy)
_SAMPLE = "astrea.data.sample:ensure_sample."


def sample(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory \\[default: $ASTREA_HOME/sample]."),
    images: Optional[int] = unset_option(_SAMPLE + "images", "--images", "-n", help="Good images in all (photos + generated scenes)."),
    shards: Optional[int] = unset_option(_SAMPLE + "shards", "--shards", "-s", help="Number of NNNNN.tar shards."),
    seed: Optional[int] = unset_option(_SAMPLE + "seed", "--seed", help="Seed: same seed and options give byte-identical shards."),
    no_bad: bool = typer.Option(False, "--no-bad", help="Leave out the two deliberately broken members."),
    force: bool = typer.Option(False, "--force", help="Rewrite even when an identical sample is there."),
    no_register: bool = typer.Option(False, "--no-register", help="Do not record it as `sample` in the catalog."),
) -> None:
    from astrea.data import open_source
    from astrea.data.sample import ensure_sample

    given = {k: v for k, v in {"images": images, "shards": shards, "seed": seed}.items() if v is not None}
    path = ensure_sample(out, bad=not no_bad, register=not no_register, force=force, **given)
    shard_list = open_source(str(path), format="webdataset").shards()
    total = sum(len(s) for s in shard_list)
    typer.echo(f"sample dataset: {path}  ({len(shard_list)} shards, {total} images"
               f"{', 2 of them deliberately broken' if not no_bad else ''})")
    if not no_register:
        typer.echo("registered as `sample`: astrea extract --expert all --data sample --weights random --small")


def add(
    name: str = typer.Argument(..., help="Catalog name (letters, digits, _ and -); becomes the store's DATASET."),
    path: Path = typer.Argument(..., help="Dataset directory (or one .tar shard)."),
    format: Optional[str] = typer.Option(None, "--format", "-f", help="webdataset | coco | folder [detected]."),
    option: list[str] = typer.Option([], "--option", help="Reader option KEY=VALUE (shard_size, split, ...)."),
    no_check: bool = typer.Option(False, "--no-check", help="Record without opening the path (e.g. not mounted yet)."),
) -> None:
    from astrea.data import catalog_add

    entry = catalog_add(name, path, format, _options(option), check=not no_check)
    typer.echo(f"{name}: {entry['format']} at {entry['path']}")


def ls(
    no_count: bool = typer.Option(False, "--no-count", help="Do not open the datasets to count shards."),
) -> None:
    """The catalog: name, format, path, shards (`-` when the path is missing or unreadable, with why)."""
    from astrea.data import catalog

    entries = catalog()
    if not entries:
        typer.echo("catalog is empty: `astrea data sample` writes and registers `sample`; "
                   "`astrea data add NAME PATH` registers your own")
        return
    rows = [(name, str(e.get("format", "?")), str(e["path"]), "-" if no_count else _shard_count(name))
            for name, e in sorted(entries.items())]
    head = ("name", "format", "path", "shards")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    for r in (head, *rows):
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _shard_count(name: str) -> str:
    """The entry's shard count, or `-` and why it could not be opened."""
    from astrea.data import open_source

    try:
        return str(len(open_source(name).shards()))
    except Exception as ex:  # one broken entry must not hide the others
        return f"-  ({type(ex).__name__}: {ex.args[0] if ex.args else ex})"


def instructions(
    files: list[Path] = typer.Argument(..., help="LLaVA-format instruction JSON / JSONL file(s).", show_default=False),
    store: Optional[Path] = typer.Option(None, "--store", help="Feature store \\[default: ASTREA_HOME config 'store']."),
    data: str = typer.Option(..., "--data", "-d", help="Dataset name inside the store."),
    experts: Optional[str] = typer.Option(None, "--experts", help="Experts an image needs (comma-separated) [all in the dataset]."),
    match: Optional[str] = unset_option("astrea.train.instructions:InstructionConfig.match", "--match",
                              help="Image -> key: auto | key | stem (docs/main_stage.md)."),
    limit: int = typer.Option(50, "--limit", help="Unmatched records listed at most (0: all)."),
) -> None:
    from astrea.shards import Store
    from astrea.train.instructions import InstructionConfig, join, store_keys

    if store is None:
        from astrea.config import default_store

        store = Path(default_store())
    names = [e.strip() for e in experts.split(",")] if experts else sorted(
        {p.name.split("@", 1)[0] for p in Store(store).expert_dirs(data)})
    icfg = InstructionConfig(files=[str(f) for f in files], **({"match": match} if match is not None else {}))
    joined = join(icfg.build(), store_keys(str(store), data, names), icfg.match)
    typer.echo(joined.summary() + f" (experts: {', '.join(names)})")
    shown = joined.unmatched if limit == 0 else joined.unmatched[:limit]
    for c in shown:
        typer.echo(f"unmatched\t{c.id}\t{c.image}\t{c.source}")
    if len(shown) < len(joined.unmatched):
        typer.echo(f"... and {len(joined.unmatched) - len(shown)} more (--limit 0 lists all)")


def rm(name: str = typer.Argument(..., help="Catalog name to forget (the files are not touched).")) -> None:
    """Remove a dataset from the catalog; its files stay where they are."""
    from astrea.data import catalog_remove

    catalog_remove(name)
    typer.echo(f"removed {name} from the catalog")
