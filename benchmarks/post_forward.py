"""What one inference actor spends per image *after* the forward, at a real expert's output size.

    .venv/bin/python benchmarks/post_forward.py [--images 128] [--grid 24] [--dim 1152] [--window 32]

On a GPU this CPU work, not the model, decides how many images/s an actor can write: at SigLIP SO400M's
253 images/s bare forward (H100, bf16) every millisecond per image here is a quarter of a core. Runs, in
one process, on the same synthetic float32 features (576 x 1152 = SigLIP SO400M on a 24x24 grid):

  storage_error only   the exact fp32 -> fp16 round-trip statistics of one token map
  measure every image  ``prepare_output(measure=True)`` for every image + ``UnitWriter.add`` + commit
                       (the round-trip statistics on every image, as the first version of the job did)
  measure per window   ``prepare_output`` measuring the first image of each ``--window`` only (what
                       ``astrea extract`` does) + ``UnitWriter.add`` + commit

and prints images/s, ms/image and the ratio to "measure every image".
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from store_io import spec_for, synthetic_features  # noqa: E402

from astrea.extract.experts.base import ExpertOutput  # noqa: E402
from astrea.extract.experts.common import storage_error  # noqa: E402
from astrea.extract.worker import prepare_output  # noqa: E402
from astrea.shards import Store  # noqa: E402


def write_unit(root: Path, unit: str, outs: list[ExpertOutput], window: int | None) -> float:
    spec = spec_for("zarr", "float16", int(outs[0].tokens.shape[0] ** 0.5), outs[0].tokens.shape[1])
    edir = Store(root).expert_dir("bench", spec, create=True)
    t = time.perf_counter()
    with edir.open_unit(unit) as w:
        for i, o in enumerate(outs):
            tokens, pooled, outputs, _ = prepare_output(spec, o, measure=window is None or i % window == 0)
            w.add(f"{i:09d}", tokens, pooled, outputs)
        w.commit()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--grid", type=int, default=24)
    ap.add_argument("--dim", type=int, default=1152)
    ap.add_argument("--window", type=int, default=32, help="--batch-size of the job (one measured image per window)")
    ap.add_argument("--repeat", type=int, default=2, help="timed units per setting (the best is shown)")
    a = ap.parse_args(argv)
    tokens, pooled = synthetic_features(min(a.images, 32), a.grid, a.dim)
    outs = [ExpertOutput(tokens[i % len(tokens)], pooled[i % len(tokens)], {"i": i}) for i in range(a.images)]
    t = time.perf_counter()
    for o in outs[:16]:
        storage_error(o.tokens, "float16")
    se = 16 / (time.perf_counter() - t)
    base = Path(tempfile.mkdtemp(prefix="astrea-post-forward-"))
    try:
        write_unit(base / "warm", "00000", outs[:4], None)
        every = max(a.images / write_unit(base / "every", f"{r:05d}", outs, None) for r in range(a.repeat))
        window = max(a.images / write_unit(base / "window", f"{r:05d}", outs, a.window) for r in range(a.repeat))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"{a.images} images of [{a.grid * a.grid}, {a.dim}] float32 -> zarr float16+zstd, window {a.window}")
    print("| path after the forward | images/s | ms/image | ratio to every image |")
    print("|---|---:|---:|---:|")
    print(f"| storage_error only | {se:.1f} | {1e3 / se:.2f} | |")
    print(f"| measure every image + write | {every:.1f} | {1e3 / every:.2f} | 1.00 |")
    print(f"| measure per window + write (astrea extract) | {window:.1f} | {1e3 / window:.2f} | {window / every:.2f} |")


if __name__ == "__main__":
    main()
