"""`--workers N [--address ...]`: the same training loop on N Ray Train workers (DDP over gloo/NCCL).

Ray Train's TorchTrainer starts the workers and initialises the process group; each worker then runs
:func:`astrea.train.runner.run_local`, which finds the group already up and takes its rank from it. The
store and RUN paths must be visible to every worker (one machine, or a shared filesystem).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from astrea.train.config import TrainConfig
from astrea.train.errors import TrainError


def _worker(config: dict[str, Any]) -> None:
    from astrea.train.runner import run_local

    run_local(TrainConfig.from_dict(config))


def launch(cfg: TrainConfig) -> dict[str, Any]:
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
        _worker,
        train_loop_config=d,
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu),
        run_config=RunConfig(name="astrea-train", storage_path=str(Path(d["out"]) / "ray")),
    )
    result = trainer.fit()
    if result.error is not None:
        raise TrainError(f"Ray Train workers failed: {result.error}")
    summary = Path(d["out"]) / "summary.json"
    return json.loads(summary.read_text()) if summary.exists() else {}
