"""Unit writer throughput: images/s and MB/s of ``ExpertDir.open_unit`` -> ``add`` x N -> ``commit``.

    .venv/bin/python benchmarks/unit_write.py [--images 96] [--grid 24] [--dim 1152] [--formats zarr,wds]
        [--modes sync:1,bg:1,bg:2,bg:4] [--repeat 2] [--dir /fast/disk]

This is the part of ``astrea extract`` that runs in each inference actor's writer thread: everything a
unit costs after the expert's forward (finiteness check, per-row checksum, zstd compression, tar/zarr
writes, fsync, parquet index, stats; benchmarks/post_forward.py adds the output checks and conversion). MB/s counts the logical token+pooled bytes in the storage dtype.

Features are smooth low-rank spatial fields plus small noise (see ``store_io.synthetic_features``),
handed over as float16 arrays, as the extraction job does (the actors convert to the storage dtype);
white noise would compress worse than real features.
``--modes`` compares Zarr writer settings, ``MODE:SHARDS``: ``sync:1`` is the writer before the
change (one shard per zarr call, written on the caller's thread), ``bg:K`` writes blocks of K whole
shards on the writer's background thread (the default is ``bg:1``). Every mode writes byte-identical
units (same chunks, shards, codec). zarr compresses the chunks of a call concurrently on its own pool
(``zarr.config`` ``threading.max_workers``, default: Python's, min(32, cores + 4)).
An untimed warm-up unit pays imports and first-call costs; the best of ``--repeat`` units is shown.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from store_io import spec_for, synthetic_features  # noqa: E402

from astrea.shards import Store  # noqa: E402


def write_unit(root: Path, fmt: str, unit: str, tokens: np.ndarray, pooled: np.ndarray, grid: int) -> tuple[float, float, dict]:
    """-> (wall s, process CPU s, stats)."""
    edir = Store(root).expert_dir("bench", spec_for(fmt, "float16", grid, tokens.shape[2]), create=True)
    w0, c0 = time.perf_counter(), time.process_time()
    with edir.open_unit(unit) as w:
        for i in range(len(tokens)):
            w.add(f"{i:09d}", tokens[i], pooled[i], {"i": i})
        stats = w.commit()
    return time.perf_counter() - w0, time.process_time() - c0, stats


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--grid", type=int, default=24)
    ap.add_argument("--dim", type=int, default=1152)
    ap.add_argument("--formats", default="zarr,wds")
    ap.add_argument("--modes", default="sync:1,bg:1,bg:2,bg:4",
                    help="Zarr writer settings to compare, MODE:SHARDS with MODE sync|bg (sync:1 = before)")
    ap.add_argument("--repeat", type=int, default=2, help="timed units per setting (the best is reported)")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    a = ap.parse_args(argv)
    import zarr

    from astrea.shards.zarr_unit import ZarrUnitWriter

    tokens, pooled = synthetic_features(a.images, a.grid, a.dim)
    tokens, pooled = tokens.astype(np.float16), pooled.astype(np.float16)
    mb = (tokens.shape[1] * tokens.shape[2] + pooled.shape[1]) * 2 * a.images / 1e6  # fp16 logical bytes
    modes = [(m.split(":")[0], int(m.split(":")[1])) for m in a.modes.split(",") if m]
    for mode, _ in modes:
        if mode not in ("sync", "bg"):
            raise SystemExit(f"--modes: unknown mode {mode!r}; use sync:K or bg:K")
    base = Path(tempfile.mkdtemp(prefix="astrea-unit-write-", dir=a.dir))
    try:
        print(f"{a.images} images of [{a.grid * a.grid}, {a.dim}] float16 ({mb / a.images:.2f} MB each); "
              f"zarr {zarr.__version__}")
        print("| format | writer | images/s | MB/s | CPU s / wall s | bytes/image |")
        print("|---|---|---|---|---|---|")
        u = 0
        for fmt in a.formats.split(","):
            for mode, shards in (modes if fmt == "zarr" else [("-", 0)]):
                if fmt == "zarr":
                    ZarrUnitWriter.background, ZarrUnitWriter.flush_shards = mode == "bg", shards
                write_unit(base / "warm", fmt, f"{u:05d}", tokens[:4], pooled[:4], a.grid)
                runs = []
                for _ in range(a.repeat):
                    u += 1
                    runs.append(write_unit(base / fmt, fmt, f"{u:05d}", tokens, pooled, a.grid))
                wall, cpu, stats = min(runs, key=lambda r: r[0])
                shown = "-" if fmt != "zarr" else f"{mode}:{shards}" + (" (before)" if (mode, shards) == ("sync", 1) else "")
                print(f"| {fmt} | {shown} | {a.images / wall:.1f} | {mb / wall:.1f} | {cpu / wall:.2f} | "
                      f"{stats['bytes_per_image']:.0f} |", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
