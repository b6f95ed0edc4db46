"""What one inference actor spends per image *after* the forward, at a real expert's output size.

    .venv/bin/python benchmarks/post_forward.py [--images 128] [--grid 24] [--dim 1152] [--window 32]

On a GPU this CPU work, not the model, decides how many images/s an actor can write: at SigLIP SO400M's
253 images/s bare forward (H100, bf16) every millisecond per image here is a quarter of a core. Runs, in
one process, on the same synthetic float32 features (576 x 1152 = SigLIP SO400M on a 24x24 grid):

  storage_error only   the exact fp32 -> fp16 round-trip statistics of one token map
  measure every image  ``prepare_output(measure=True)`` for every image + ``UnitWriter.add`` + commit
                       (the round-trip statistics on every image, as the first version of the job did)
  measure per window   ``prepare_output`` measuring the first image of each ``--window`` only (what
                       ``astrea extract`` did before issue 15) + ``UnitWriter.add`` + commit
  prepare_window       what ``astrea extract`` does now: ``prepare_window`` per window (one conversion and
                       one bit test per image, the round-trip error on one image of every 8th window), then
                       ``UnitWriter.add(known_finite=True)`` + commit

  first version        what the first version of the job did per image: the masked torch round-trip
                       statistics (kept below as the reference), numpy's float16 cast, then the write

and prints images/s, ms/image (wall and CPU of this process, all threads) and the ratio to "first
version". The store layout is ``--codec`` (default: raw, the store's default).
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

from astrea.extract.experts.base import ExpertOutput  # noqa: E402
from astrea.extract.experts.common import storage_error  # noqa: E402
from astrea.extract.worker import MEASURE_EVERY, prepare_output, prepare_window  # noqa: E402
from astrea.shards import Store  # noqa: E402


def first_version_storage_error(x: np.ndarray, dtype: str) -> dict[str, float]:
    """The first version's round-trip statistics (torch, boolean masks), for the comparison only."""
    import torch

    a = torch.as_tensor(np.asarray(x, dtype=np.float32))
    b = a.to(getattr(torch, dtype)).float()
    finite = torch.isfinite(b)
    nonfinite = int((~finite & torch.isfinite(a)).sum())
    err = (a - b).abs()[finite]
    mag = a.abs()[finite]
    normal = mag >= torch.finfo(getattr(torch, dtype)).tiny
    amax = float(a.abs().max())
    max_abs = float(err.max())
    return {"max_abs": max_abs, "max_rel": float((err[normal] / mag[normal]).max()),
            "rel_to_max": max_abs / amax if amax > 0 else 0.0, "nonfinite": nonfinite}


def first_version_prepare(o: ExpertOutput) -> tuple[np.ndarray, np.ndarray]:
    tokens, pooled = np.asarray(o.tokens, np.float32), np.asarray(o.pooled, np.float32)
    if not (np.isfinite(tokens).all() and np.isfinite(pooled).all()):
        raise ValueError("non-finite")
    first_version_storage_error(np.concatenate([tokens.ravel(), pooled]), "float16")
    return tokens.astype(np.float16), pooled.astype(np.float16)


CODEC = "raw"


def write_unit(root: Path, unit: str, outs: list[ExpertOutput], window: int | None, first: bool = False,
               batched: bool = False) -> tuple[float, float]:
    """-> (wall seconds, CPU seconds of this process) to write ``outs`` as one unit."""
    spec = spec_for("zarr", "float16", int(outs[0].tokens.shape[0] ** 0.5), outs[0].tokens.shape[1], CODEC)
    edir = Store(root).expert_dir("bench", spec, create=True)
    t, c = time.perf_counter(), time.process_time()
    with edir.open_unit(unit) as w:
        if batched:
            for k, s in enumerate(range(0, len(outs), window)):
                prepared, _ = prepare_window(spec, outs[s:s + window], measure=k % MEASURE_EVERY == 0)
                for i, (tokens, pooled, outputs, finite) in enumerate(prepared):
                    w.add(f"{s + i:09d}", tokens, pooled, outputs, known_finite=finite)
            w.commit()
            return time.perf_counter() - t, time.process_time() - c
        for i, o in enumerate(outs):
            if first:
                tokens, pooled = first_version_prepare(o)
                outputs = o.outputs
            else:
                tokens, pooled, outputs, _ = prepare_output(spec, o, measure=window is None or i % window == 0)
            w.add(f"{i:09d}", tokens, pooled, outputs)
        w.commit()
    return time.perf_counter() - t, time.process_time() - c


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--grid", type=int, default=24)
    ap.add_argument("--dim", type=int, default=1152)
    ap.add_argument("--window", type=int, default=32, help="--batch-size of the job (one measured image per window)")
    ap.add_argument("--repeat", type=int, default=2, help="timed units per setting (the best is shown)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads, as an actor with --cpus-per-worker N")
    ap.add_argument("--codec", default="raw", choices=["raw", "zstd"], help="zarr codec of the unit written")
    a = ap.parse_args(argv)
    global CODEC
    CODEC = a.codec
    import torch

    torch.set_num_threads(a.threads)
    tokens, pooled = synthetic_features(min(a.images, 32), a.grid, a.dim)
    outs = [ExpertOutput(tokens[i % len(tokens)], pooled[i % len(tokens)], {"i": i}) for i in range(a.images)]
    storage_error(outs[0].tokens, "float16")  # warm-up: first-call imports
    t = time.perf_counter()
    for o in outs[:16]:
        storage_error(o.tokens, "float16")
    se = 16 / (time.perf_counter() - t)
    base = Path(tempfile.mkdtemp(prefix="astrea-post-forward-"))
    try:
        write_unit(base / "warm", "00000", outs[:4], None)
        write_unit(base / "warm", "00001", outs[:2], None, first=True)
        write_unit(base / "warm", "00002", outs[:4], 2, batched=True)
        settings = {"first": dict(window=None, first=True), "every": dict(window=None),
                    "window": dict(window=a.window), "batched": dict(window=a.window, batched=True)}
        best = {k: (float("inf"), float("inf")) for k in settings}
        for r in range(a.repeat):  # interleaved: a load spike hits no setting alone
            for k, kw in settings.items():
                wall, cpu = write_unit(base / k, f"{r:05d}", outs, **kw)
                best[k] = (min(best[k][0], wall), min(best[k][1], cpu))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    n = a.images
    print(f"{n} images of [{a.grid * a.grid}, {a.dim}] float32 -> zarr float16 ({a.codec}), window {a.window}, "
          f"{a.threads} torch thread(s), best of {a.repeat}")
    print("| path after the forward | images/s | ms/image | CPU ms/image | ratio to first version |")
    print("|---|---:|---:|---:|---:|")
    print(f"| storage_error only | {se:.1f} | {1e3 / se:.2f} | | |")
    names = {"first": "first version (torch masked stats + numpy cast, every image) + write",
             "every": "measure every image + write", "window": "measure per window + write (before issue 15)",
             "batched": "prepare_window + write (astrea extract)"}
    for k, name in names.items():
        wall, cpu = best[k]
        print(f"| {name} | {n / wall:.1f} | {1e3 * wall / n:.2f} | {1e3 * cpu / n:.2f} | {best['first'][0] / wall:.2f} |")


if __name__ == "__main__":
    main()
