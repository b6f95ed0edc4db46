"""Unit writer throughput: images/s and MB/s of ``ExpertDir.open_unit`` -> ``add`` x N -> ``commit``.

    .venv/bin/python benchmarks/unit_write.py [--images 96] [--grid 24] [--dim 1152] [--formats zarr,wds]
        [--threads 1,2,4] [--dir /fast/disk]

This is the part of ``astrea extract`` that runs on the Ray driver: everything a unit costs after the
expert's forward (fp16 conversion, finiteness check, per-row checksum, zstd compression, tar/zarr
writes, fsync, parquet index, stats). MB/s counts the logical token+pooled bytes in the storage dtype.

Features are smooth low-rank spatial fields plus small noise (see ``store_io.synthetic_features``),
handed over as float32 as the extraction job does; white noise would compress worse than real features.
``--threads`` sets zarr's ``threading.max_workers`` (the pool that runs zstd, which releases the GIL):
on a machine with more free cores, more threads compress more chunks at once.
An untimed warm-up unit pays imports and first-call costs.
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
    ap.add_argument("--threads", default="", help="comma list of zarr threading.max_workers to compare "
                    "(default: zarr's own setting only)")
    ap.add_argument("--repeat", type=int, default=1, help="timed units per setting (best is reported)")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    a = ap.parse_args(argv)
    import zarr

    tokens, pooled = synthetic_features(a.images, a.grid, a.dim)
    mb = (tokens.shape[1] * tokens.shape[2] + pooled.shape[1]) * 2 * a.images / 1e6  # fp16 logical bytes
    threads = [int(t) for t in a.threads.split(",") if t] or [None]
    base = Path(tempfile.mkdtemp(prefix="astrea-unit-write-", dir=a.dir))
    try:
        print(f"{a.images} images of [{a.grid * a.grid}, {a.dim}] float16 ({mb / a.images:.2f} MB each); "
              f"zarr {zarr.__version__}")
        print("| format | zarr threads | images/s | MB/s | CPU s / wall s | bytes/image |")
        print("|---|---|---|---|---|---|")
        u = 0
        for fmt in a.formats.split(","):
            for t in threads:
                cfg = {} if t is None else {"threading.max_workers": t}
                with zarr.config.set(cfg):
                    write_unit(base / "warm", fmt, f"{u:05d}", tokens[:4], pooled[:4], a.grid)
                    runs = []
                    for _ in range(a.repeat):
                        u += 1
                        runs.append(write_unit(base / fmt, fmt, f"{u:05d}", tokens, pooled, a.grid))
                wall, cpu, stats = min(runs, key=lambda r: r[0])
                shown = "-" if fmt != "zarr" else (t if t is not None else zarr.config.get("threading.max_workers"))
                print(f"| {fmt} | {shown} | {a.images / wall:.1f} | {mb / wall:.1f} | {cpu / wall:.2f} | "
                      f"{stats['bytes_per_image']:.0f} |", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
