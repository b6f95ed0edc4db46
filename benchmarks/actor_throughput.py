"""Images/s one extraction actor sustains into the store, with the forward replaced by a stand-in.

    .venv/bin/python benchmarks/actor_throughput.py [--images 768] [--units 4] [--grid 24] [--dim 1152]
                                                   [--batch 32] [--threads 1] [--device cpu|cuda]

The real actor (``astrea.extract.worker.UnitWorker``: reader thread -> engine thread -> writer thread with a
bounded queue, units handed over ``UNITS_PER_WORKER`` at a time), driven in-process as the tests drive it,
over a WebDataset source of tiny pre-made JPEGs (8x8: decode costs almost nothing). The expert is a
stand-in whose forward hands back real-size float32 outputs from memory (``--grid``^2 x ``--dim`` tokens +
pooled, SigLIP SO400M's 576 x 1152 by default), so everything measured is what the actor does around a
forward: reading, decoding, the post-forward checks and storage-dtype conversion, checksums, the unit
writer, fsync, commit. With ``--device cuda`` the stand-in's outputs are device tensors, converted to the
storage dtype on the device before the copy to the host.

Prints, per store layout: images/s (wall), the writer thread's CPU ms per image (post-forward work:
``prepare_window`` + ``UnitWriter.add`` + commit, on the writer thread), the process's CPU ms per image,
and where the engine thread waited. That images/s is the ceiling this actor puts on any expert: an
expert whose bare forward is faster than it is writer-bound.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from store_io import spec_for  # noqa: E402


def write_source(root: Path, units: int, per_unit: int) -> None:
    """WebDataset shards of tiny JPEGs (one pre-made image under every key) with captions."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 127, np.uint8)).save(buf, format="JPEG")
    jpg = buf.getvalue()
    root.mkdir(parents=True)
    n = 0
    for u in range(units):
        with tarfile.open(root / f"{u:05d}.tar", "w") as tar:
            for _ in range(per_unit):
                for name, data in ((f"{n:09d}.jpg", jpg), (f"{n:09d}.txt", f"image {n}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                n += 1


class StandIn:
    """An expert whose forward emits real-size outputs from memory: ``pool`` pre-made float32 maps reused in
    turn (on ``device``: torch tensors there, as an expert that leaves its outputs on the GPU)."""

    prerequisites: tuple[str, ...] = ()

    def __init__(self, spec: Any, device: str = "cpu", pool: int = 8, seed: int = 0):
        import torch

        self.spec, self.device = spec, device
        rng = np.random.default_rng(seed)
        t = rng.normal(0, 1, (pool, spec.num_tokens, spec.token_dim)).astype(np.float32)
        p = rng.normal(0, 1, (pool, spec.pooled_dim)).astype(np.float32)
        self._tokens, self._pooled = (torch.from_numpy(t).to(device), torch.from_numpy(p).to(device)) \
            if device != "cpu" else (t, p)
        self.calls = 0

    def to(self, device: str) -> StandIn:
        return self

    def preprocess(self, image: Any) -> Any:
        import torch

        return torch.zeros(3, 8, 8)

    def forward(self, pixels: Any, prompts: Any = None) -> list[Any]:
        from astrea.extract.experts.base import ExpertOutput

        k = len(self._tokens)
        outs = [ExpertOutput(self._tokens[(self.calls + i) % k], self._pooled[(self.calls + i) % k], {})
                for i in range(len(pixels))]
        self.calls += len(pixels)
        return outs


def run_layout(tmp: Path, src: Path, spec: Any, args: argparse.Namespace, units: list[str]) -> dict[str, float]:
    from astrea.extract import worker as W
    from astrea.extract.run import UNITS_PER_WORKER

    # the writer thread's CPU time per window / commit: the post-forward work, apart from the other threads
    cpu = {"write": 0.0}
    real_write, real_finish = W._UnitJob.write_window, W._UnitJob.finish

    def timed(fn):
        def call(self, *a):
            c = time.thread_time()
            try:
                return fn(self, *a)
            finally:
                cpu["write"] += time.thread_time() - c
        return call

    W._UnitJob.write_window, W._UnitJob.finish = timed(real_write), timed(real_finish)
    try:
        w = W.UnitWorker({}, {}, spec.fingerprint(), args.device, store_root=str(tmp / "store"), dataset="bench",
                         data=str(src), source_format="webdataset", batch_size=args.batch, cpus_per_task=1.0,
                         decode_in_tasks=False, inflight=2, threads=args.threads,
                         expert=StandIn(spec, args.device))
        results: list[dict] = []
        sem = threading.Semaphore(UNITS_PER_WORKER)  # as the driver hands them: two at a time per actor

        def one(u: str) -> None:
            with sem:
                results.append(w.run_unit(u, {}, [], True))

        c0, t0 = time.process_time(), time.perf_counter()
        threads = [threading.Thread(target=one, args=(u,)) for u in units]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall, proc = time.perf_counter() - t0, time.process_time() - c0
    finally:
        W._UnitJob.write_window, W._UnitJob.finish = real_write, real_finish
    assert all(r["status"] == "committed" for r in results), results
    n = sum(r["ok"] for r in results)
    waits = {k: sum(r["seconds"][k] for r in results) for k in ("wait_read", "wait_decode", "forward", "wait_write")}
    return {"images": n, "ips": n / wall, "write_ms": 1e3 * cpu["write"] / n, "proc_ms": 1e3 * proc / n,
            **{k: v / wall for k, v in waits.items()}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=768, help="images in all (split over --units units)")
    ap.add_argument("--units", type=int, default=4)
    ap.add_argument("--grid", type=int, default=24)
    ap.add_argument("--dim", type=int, default=1152)
    ap.add_argument("--batch", type=int, default=32, help="--batch-size of the job (images per forward)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads of the actor")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layouts", default="zarr:raw,zarr:zstd,wds:raw", help="format:codec,... to compare")
    ap.add_argument("--dir", type=Path, default=None)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    per = max(1, a.images // a.units)
    tmp = Path(tempfile.mkdtemp(prefix="astrea-actor-", dir=a.dir))
    try:
        src = tmp / "src"
        write_source(src, a.units + 1, per)
        units = [f"{u:05d}" for u in range(1, a.units + 1)]
        rows = []
        for layout in a.layouts.split(","):
            fmt, codec = layout.split(":")
            spec = spec_for(fmt, "float16", a.grid, a.dim, codec)
            run_layout(tmp / f"warm-{fmt}-{codec}", src, spec, a, ["00000"])  # imports, first-call costs
            rows.append((fmt, codec, run_layout(tmp / f"run-{fmt}-{codec}", src, spec, a, units)))
            shutil.rmtree(tmp / f"run-{fmt}-{codec}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mib = (a.grid * a.grid * a.dim + a.dim) * 2 / 2**20
    print(f"one actor, stand-in forward from memory, {a.units} units x {per} images, tokens {a.grid * a.grid}x{a.dim} "
          f"+ pooled {a.dim} float16 ({mib:.2f} MiB/image), batch {a.batch}, {a.threads} torch thread(s), "
          f"device {a.device}\n")
    print("| store layout | images/s | MB/s into the store | writer thread CPU ms/image | process CPU ms/image "
          "| engine waiting on: read | decode | writer |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for fmt, codec, r in rows:
        name = {"zarr": "Zarr v3", "wds": "WebDataset tar"}[fmt] + (f", {codec}" if fmt == "zarr" else "")
        if (fmt, codec) == ("zarr", "raw"):
            name += " (default)"
        print(f"| {name} | {r['ips']:.0f} | {r['ips'] * mib * 1.048576:.0f} | {r['write_ms']:.2f} | {r['proc_ms']:.2f} "
              f"| {r['wait_read']:.0%} | {r['wait_decode']:.0%} | {r['wait_write']:.0%} |")
    print("\nimages/s: committed images / wall seconds of the whole run (units overlapped as the driver hands them). "
          "Writer thread CPU: prepare_window + UnitWriter.add + commit, on the actor's writer thread (the zarr shard "
          "writes and fsyncs run on its own background thread: in the process column). Engine waiting: share "
          "of the wall time the engine thread spent waiting for the reader, for decoded windows, for room in the "
          "writer's queue (summed over units).")


if __name__ == "__main__":
    main()
