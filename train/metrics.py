"""Run metrics: one JSON line per logged step or evaluation, the same scalars to TensorBoard, a tqdm bar.

``RUN/metrics.jsonl`` rows: ``{"kind": "train", "stage", "step", "global_step", "loss", "loss_reg",
"lr", "tokens_per_s", "samples_per_s", "data_wait", ...}``, ``{"kind": "heldout", "stage", "step",
"loss_reg", "samples"}`` and, at each stage start, ``{"kind": "targets", "stage", "step": 0, "checked",
"truncated_targets", "fitted_targets", "cut_<task>", "dropped_<task>"}`` (the stage's first training
targets against ``dataset.max_text_tokens``; see ``Trainer.check_targets``). A resumed run first drops
the rows the killed run logged after its checkpoint (``trim_metrics``), then appends: each (kind, stage,
step) is in the file once. Non-finite numbers are written as ``null`` (strict JSON). Only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


def finite_json(value: Any) -> Any:
    """``value`` with every inf/NaN float replaced by None: strict JSON readers reject bare ``NaN``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def dumps_strict(value: Any, indent: int | None = 2) -> str:
    """JSON text with no bare NaN/Infinity (they become null)."""
    return json.dumps(finite_json(value), indent=indent, allow_nan=False)


class Metrics:
    def __init__(self, run_dir: str | Path, *, enabled: bool = True, progress: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._f = open(self.path, "a", buffering=1) if enabled else None  # noqa: SIM115 - lives with the run
        self._tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:  # tensorboard is a dependency; a broken install still trains
                self._tb = None
        self._bar = None
        self._progress = progress and enabled

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"time": round(time.time(), 3), **row}
        assert self._f is not None
        self._f.write(dumps_strict(row, indent=None) + "\n")
        if self._tb is not None:
            step = int(row.get("global_step", row.get("step", 0)))
            prefix = f"{row.get('kind', 'train')}/{row.get('stage', '')}"
            for k, v in row.items():
                if isinstance(v, int | float) and not isinstance(v, bool) and k not in ("time", "step", "global_step"):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)

    # -- progress bar -----------------------------------------------------------------------------
    def start_bar(self, stage: str, total: int, initial: int) -> None:
        if not self._progress:
            return
        from tqdm.auto import tqdm

        self.close_bar()
        self._bar = tqdm(total=total, initial=initial, desc=f"{stage}", unit="step", dynamic_ncols=True)

    def bar(self, n: int, **postfix: Any) -> None:
        if self._bar is not None:
            self._bar.update(n)
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()})

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self.close_bar()
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def trim_metrics(path: str | Path, global_step: int, stage: str, *, stage_done: bool = True) -> int:
    """Before a resume from the checkpoint at ``global_step`` (in ``stage``): drop the rows the killed run
    logged after it (and a line cut mid-write), which the resumed run logs again. Returns rows dropped.

    A stage resumed mid-way (``stage_done`` false) re-logs its stage-start ``targets`` row: the old one goes."""
    path = Path(path)
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        g = r.get("global_step")
        if not stage_done and r.get("kind") == "targets" and r.get("stage") == stage:
            dropped += 1
            continue
        if isinstance(g, int) and (g > global_step or (g == global_step and r.get("stage") != stage)):
            dropped += 1  # after the checkpoint, or the next stage's held-out-before at the same step
            continue
        keep.append(line)
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        tmp.replace(path)
    return dropped


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl, keeping the last row per (kind, stage, step) (a resumed run rewrites)."""
    rows: dict[tuple[Any, Any, Any], dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill mid-write
            continue
        rows[(r.get("kind"), r.get("stage"), r.get("step"))] = r
    return list(rows.values())
