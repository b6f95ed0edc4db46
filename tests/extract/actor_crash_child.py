"""A real extraction actor (``UnitWorker``, in-process, no Ray) writing one unit with a stand-in expert;
run as a second process by tests/extract/test_actor_crash.py.

    python -m tests.extract.actor_crash_child SRC STORE UNIT READY_FILE|-

With READY_FILE, the stand-in's third forward waits until the writer's background thread has put a shard
file of the unit's tokens into the unit's temp directory (rows written, the unit not committed), then
creates READY_FILE and blocks for good: the parent kills the process there. With ``-`` it runs to the
commit and prints the result as JSON.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

from astrea.extract.experts.base import ExpertOutput
from astrea.schemas import ExpertSpec

GRID, DIM, BATCH = 2, 64, 2
ROW_BYTES = GRID * GRID * DIM * 2  # float16


def spec() -> ExpertSpec:
    return ExpertSpec(expert="standin", arch="standin", weights="random", weights_sha256="0" * 64, preprocessing={},
                      grid=GRID, token_dim=DIM, pooled_dim=DIM)


class StandIn:
    prerequisites: tuple[str, ...] = ()

    def __init__(self, block_at: int | None, tmp_glob: tuple[Path, str] | None, ready: Path | None):
        self.spec, self.device, self.calls = spec(), "cpu", 0
        self.block_at, self.tmp_glob, self.ready = block_at, tmp_glob, ready

    def to(self, device: str) -> StandIn:
        return self

    def preprocess(self, image):
        import torch

        return torch.zeros(3, 4, 4)

    def forward(self, pixels, prompts=None):
        self.calls += 1
        if self.calls == self.block_at:
            root, pattern = self.tmp_glob
            deadline = time.monotonic() + 60
            while not list(root.glob(pattern)) and time.monotonic() < deadline:
                time.sleep(0.01)  # waiting for a condition (a shard file on disk), not for time to pass
            self.ready.write_text("mid-unit")
            threading.Event().wait()  # killed here
        out = []
        for _ in range(len(pixels)):
            k = len(out) + (self.calls - 1) * BATCH
            rng = np.random.default_rng(k)
            out.append(ExpertOutput(rng.normal(0, 1, (GRID * GRID, DIM)).astype(np.float32),
                                    rng.normal(0, 1, DIM).astype(np.float32), {"n": k}))
        return out


def main(src: str, store: str, unit: str, ready: str) -> dict:
    from astrea.extract.worker import UnitWorker
    from astrea.shards import zarr_unit

    zarr_unit.SHARD_BYTES = 2 * ROW_BYTES  # two rows per shard file: several shards in a small unit
    block = ready != "-"
    edir_path = Path(store) / "toy" / spec().dirname
    expert = StandIn(3 if block else None, (edir_path, f".{unit}.zarr.tmp-*/tokens/c/*/0/0"),
                     Path(ready) if block else None)
    w = UnitWorker({}, {}, spec().fingerprint(), "cpu", store_root=store, dataset="toy", data=src,
                   source_format="webdataset", batch_size=BATCH, cpus_per_task=1.0, decode_in_tasks=False,
                   inflight=2, threads=1, expert=expert)
    return w.run_unit(unit, {}, [], True)


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:5])), flush=True)
