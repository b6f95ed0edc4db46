"""Features of an image file computed online, identical to what extraction would have stored.

A run records the fingerprint of every expert it read (``RUN/run.json``); the store keeps the full spec
behind each fingerprint (``expert.json``: arch, weights as given, grid, storage dtype, seed, the expert's
config with its options, prerequisites). :func:`rebuild_expert` builds the expert again from that spec and
checks that the rebuilt expert has the same fingerprint (same weights hash, preprocessing, grid, options):
otherwise its features could differ, and the rebuild is refused naming the fields that differ.

The image then goes the extraction path: astrea's safe decoder, the expert's own preprocessing, forward
with the stored-output prompts of its prerequisites (computed online first, in dependency order, and
passed through their JSON form as the store would hand them over), and the round trip through the storage
dtype, so the arrays equal the stored row of the same image.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from astrea.errors import AstreaError


class OnlineError(AstreaError, ValueError):
    """An image file or a run's expert that cannot be computed online as extraction would have."""


def _option_fields(name: str) -> set[str]:
    """Field names of the expert module's options dataclass (what ``ExpertConfig.options`` may hold)."""
    from astrea.extract.experts.registry import expert_module

    mod = expert_module(name)
    out: set[str] = set()
    for v in vars(mod).values():
        if dataclasses.is_dataclass(v) and isinstance(v, type) and v.__module__ == mod.__name__ and \
                v.__name__.endswith("Options"):
            out |= {f.name for f in dataclasses.fields(v)}
    return out


def rebuild_expert(spec: Any, device: str = "cpu") -> Any:
    """The expert behind ``spec``, built again; its fingerprint must equal the spec's."""
    from astrea.extract.experts.registry import ExpertConfig

    from astrea.extract.experts.base import WeightsUnavailableError

    # The spec's config holds the options under their own names, beside descriptions of fixed choices
    # (e.g. ram_plus "thresholds": "uniform 0.68 (no thresholds file)"): try the options as recorded, then
    # without the ones that are not usable as given, then the defaults; the fingerprint decides.
    opts_all = {k: v for k, v in spec.config.items() if k in _option_fields(spec.expert)}
    usable = {k: v for k, v in opts_all.items()
              if v is not None and not (isinstance(v, str) and not Path(v).expanduser().exists() and " " in v)}
    tries = [opts_all, usable, {k: v for k, v in usable.items() if not isinstance(v, str)}, {}]
    last = None
    for options in tries:
        cfg = ExpertConfig(name=spec.expert, arch=spec.arch, weights=spec.weights, grid=spec.grid, dtype=spec.dtype,
                           format=spec.format, seed=spec.seed, device=device,
                           compute_dtype=spec.config.get("compute_dtype", "float32"), options=dict(options))
        try:
            expert = cfg.build(prerequisites=dict(spec.prerequisites))
        except (ValueError, TypeError, WeightsUnavailableError) as e:
            last = f"{type(e).__name__}: {e}"
            continue
        if expert.spec.fingerprint() == spec.fingerprint():
            return expert
        a, b = expert.spec.hashed_fields(), spec.hashed_fields()
        last = "fields differ: " + ", ".join(sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)))
    raise OnlineError(
        f"expert {spec.expert}@{spec.fingerprint()}: rebuilt from its stored spec it is not the same expert "
        f"({last}); its weights must be available as when it was extracted ({spec.weights})"
    )


def _order(specs: dict[str, Any]) -> list[str]:
    """Experts in dependency order (prerequisites first)."""
    done: list[str] = []

    def visit(n: str, path: tuple[str, ...]) -> None:
        if n in done:
            return
        if n in path:
            raise OnlineError(f"expert prerequisites form a cycle: {' -> '.join((*path, n))}")
        for p in specs[n].prerequisites:
            if p in specs:
                visit(p, (*path, n))
        done.append(n)

    for n in specs:
        visit(n, ())
    return done


def online_features(store: str, dataset: str, experts: list[str], image: str | Path,
                    fingerprints: dict[str, str], *, device: str = "auto", threads: int = 1) -> dict[str, dict[str, Any]]:
    """``{expert: {"tokens", "pooled", "outputs"}}`` for an image file, as extraction stores them.

    ``threads``: torch CPU threads, as an extraction actor uses (``cpus_per_worker``, default 1): CPU kernels
    may round differently with another thread count. Extraction batches images; a batch's composition can
    change the last bit of a result as well, so an image extracted alone in its batch (``--batch-size 1``,
    or alone of its size) comes back bit for bit, others within the storage dtype's last place."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _online(store, dataset, experts, image, fingerprints, device)
    finally:
        torch.set_num_threads(before)


def _online(store: str, dataset: str, experts: list[str], image: str | Path, fingerprints: dict[str, str],
            device: str) -> dict[str, dict[str, Any]]:
    import torch

    from astrea.extract.experts.common import decode_image
    from astrea.schemas.unit import outputs_to_json
    from astrea.shards import Store
    from astrea.shards.dtypes import from_storage, to_storage

    path = Path(image).expanduser()
    if not path.is_file():
        raise OnlineError(f"--image {image}: no such file")
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    st = Store(store)
    specs: dict[str, Any] = {}
    want = list(experts)
    while want:  # the run's experts and, through their specs, the prerequisites they were prompted with
        e = want.pop(0)
        if e in specs:
            continue
        ref = f"{e}@{fingerprints[e]}" if fingerprints.get(e) else e
        specs[e] = st.resolve(dataset, ref).spec
        for p, fp in specs[e].prerequisites.items():
            fingerprints = {**fingerprints, p: fp}
            want.append(p)
    data = path.read_bytes()
    out: dict[str, dict[str, Any]] = {}
    for name in _order(specs):
        spec = specs[name]
        expert = rebuild_expert(spec).to(dev)
        pixels = expert.preprocess(decode_image(data))
        x = torch.as_tensor(np.asarray(pixels, np.float32))[None]
        prompts = None
        if getattr(expert, "prerequisites", ()):
            prompts = [{p: out[p]["outputs"] for p in expert.prerequisites if p in out}]
        (o,) = expert.forward(x, prompts)
        tokens = from_storage(to_storage(np.asarray(o.tokens, np.float32), spec.dtype), spec.dtype)
        pooled = from_storage(to_storage(np.asarray(o.pooled, np.float32), spec.dtype), spec.dtype)
        out[name] = {"tokens": tokens, "pooled": pooled, "outputs": json.loads(outputs_to_json(o.outputs or {}))}
    return {e: out[e] for e in experts}
