"""`--workers N [--address ...]`: the same training loop on N Ray Train workers (DDP over gloo/NCCL).

Ray Train's TorchTrainer starts the workers and initialises the process group; each worker then runs
the loop it is handed (:func:`astrea.train.runner.ray_worker`: ``run_local``, which finds the group
already up and takes its rank from it). Handed in, not imported, so the runner (which calls
:func:`launch`) and this module do not import each other. The store and RUN paths must be visible to
every worker (one machine, or a shared filesystem).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from astrea.train.config import TrainConfig
from astrea.train.errors import TrainError


def launch(cfg: TrainConfig, worker: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """Run ``worker(cfg as a dict)`` on ``cfg.workers`` Ray Train workers; the summary it wrote."""
    import json

    import ray
    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    d = cfg.to_dict()
    d.update(workers=1, address="", store=str(Path(cfg.store).resolve()), out=str(Path(cfg.out).resolve()))
    if cfg.init_from:
        d["init_from"] = str(Path(cfg.init_from).resolve())
    use_gpu = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
    if not ray.is_initialized():
        ray.init(address=cfg.address or None, ignore_reinit_error=True, log_to_driver=True)
    trainer = TorchTrainer(
        worker,
        train_loop_config=d,
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu),
        run_config=RunConfig(name="astrea-train", storage_path=str(Path(d["out"]) / "ray")),
    )
    result = trainer.fit()
    if result.error is not None:
        raise TrainError(f"Ray Train workers failed: {result.error}")
    summary = Path(d["out"]) / "summary.json"
    return json.loads(summary.read_text()) if summary.exists() else {}
