"""Checkpoints in safetensors: Astrea weights, optimizer, scheduler, RNG and data position.

Layout of one checkpoint directory (``RUN/checkpoints/step-00000120``):
    model.safetensors         AstreaModel.astrea_state_dict() (+ stage state as ``stage.<key>``)
    optim.safetensors         optimizer tensors as ``state.<param index>.<name>``
    rng-rank<r>.safetensors   torch CPU (+ CUDA) RNG state and numpy's key array, per rank
    state.json                stage, step counts, per-rank stream positions, scheduler, optimizer
                              param groups, python/numpy RNG scalars, LLM hidden size
Written under a temporary name and renamed when complete; ``RUN/checkpoints/latest`` names the newest
finished one, so a crash mid-save leaves the previous checkpoint in charge. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STAGE_PREFIX = "stage."


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str] | None = None) -> None:
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path), metadata=meta)


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = v
            else:
                scalars[f"{idx}.{name}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    for key, v in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).view(np.int32).copy())
    version, pystate, pygauss = random.getstate()
    meta = {"numpy": [name, int(pos), int(has_gauss), float(gauss)], "python": [version, list(pystate), pygauss]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    name, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, tensors["numpy"].numpy().view(np.uint32), pos, has_gauss, gauss))
    version, pystate, pygauss = meta["python"]
    random.setstate((version, tuple(pystate), pygauss))


class CheckpointDir:
    """Where a run's checkpoints live, and the ``latest`` pointer."""

    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir) / "checkpoints"

    def latest(self) -> Path | None:
        ptr = self.root / "latest"
        if not ptr.exists():
            return None
        d = self.root / ptr.read_text().strip()
        return d if (d / "state.json").exists() else None

    def begin(self, name: str) -> Path:
        tmp = self.root / f"{name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def finish(self, tmp: Path, name: str, keep: int) -> Path:
        final = self.root / name
        if final.exists():
            shutil.rmtree(final)
        _fsync_dir_files(tmp)
        os.replace(tmp, final)
        ptr_tmp = self.root / "latest.tmp"
        ptr_tmp.write_text(name)
        os.replace(ptr_tmp, self.root / "latest")
        self._prune(keep, current=name)
        return final

    def _prune(self, keep: int, current: str) -> None:
        if keep <= 0:
            return
        steps = sorted(p for p in self.root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for p in steps[:-keep]:
            if p.name != current:
                shutil.rmtree(p, ignore_errors=True)


def write_checkpoint(
    d: Path,
    *,
    rank: int,
    model_sd: dict[str, torch.Tensor] | None,
    stage_sd: dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any] | None,
) -> None:
    """Rank ``rank``'s share of a checkpoint: RNG always; weights, optimizer, state.json on rank 0."""
    rt, rmeta = rng_state()
    save_tensors(rt, d / f"rng-rank{rank}.safetensors", {"meta": json.dumps(rmeta)})
    if rank != 0:
        return
    assert model_sd is not None and optimizer is not None and state is not None
    tensors = dict(model_sd)
    tensors.update({STAGE_PREFIX + k: v for k, v in (stage_sd or {}).items()})
    save_tensors(tensors, d / "model.safetensors")
    ot, ometa = optimizer_tensors(optimizer)
    save_tensors(ot, d / "optim.safetensors")
    state = dict(state, optimizer=ometa)
    (d / "state.json").write_text(json.dumps(state, indent=1))


def read_checkpoint(d: Path, rank: int) -> dict[str, Any]:
    state = json.loads((d / "state.json").read_text())
    tensors = load_file(str(d / "model.safetensors"))
    model_sd = {k: v for k, v in tensors.items() if not k.startswith(STAGE_PREFIX)}
    stage_sd = {k[len(STAGE_PREFIX) :]: v for k, v in tensors.items() if k.startswith(STAGE_PREFIX)}
    rng_path = d / f"rng-rank{rank}.safetensors"
    rng = None
    if rng_path.exists():
        from safetensors import safe_open

        with safe_open(str(rng_path), "pt") as f:
            meta = json.loads((f.metadata() or {})["meta"])
        rng = (load_file(str(rng_path)), meta)
    return {
        "state": state,
        "model": model_sd,
        "stage": stage_sd,
        "optim": load_file(str(d / "optim.safetensors")),
        "rng": rng,
    }


def _fsync_dir_files(d: Path) -> None:
    for p in d.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
