"""The pieces of one unit's extraction that do not need the model: reading windows, decoding.

    read the source shard (in the inference actor, streaming)  ->  windows of batch_size samples
      ->  decode + preprocess each window in a Ray CPU task (``decode_window``)
      ->  forward + write (the actor, extract/worker.py)

A *window* is up to ``batch_size`` consecutive samples of one shard, and becomes exactly one forward
call. Fixing forward batches by position in the shard (not by how work happens to be bundled) makes
the stored bytes reproducible across runs, kills and resumes: some experts' kernels differ in the
last bit between batch sizes (measured: grounding_dino, 6e-7 in fp32).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_PREPROCESSOR_BYTES = 8 * 2**20


def _reason(e: BaseException) -> str:
    from astrea.schemas.unit import stable_reason

    msg = e.args[0] if e.args else str(e)
    return stable_reason(str(msg))[:300]


# -- read -----------------------------------------------------------------------------------------
_SOURCES: dict[tuple[str, str | None], Any] = {}


def _source(data: str, fmt: str | None) -> Any:
    # An actor processes many units: open (and index) the source once per process, not once per shard.
    if (data, fmt) not in _SOURCES:
        from astrea.data import open_source

        _SOURCES[(data, fmt)] = open_source(data, format=fmt)
    return _SOURCES[(data, fmt)]


def prompt_table(store_root: str, dataset: str, prereqs: dict[str, str], shard: str) -> dict[str, dict]:
    """key -> {prereq_name: stored outputs} for one unit, read through the store."""
    if not prereqs:
        return {}
    from astrea.shards import Store

    store = Store(store_root)
    table: dict[str, dict] = {}
    for name, ref in prereqs.items():
        edir = store.resolve(dataset, ref)
        for rec in edir.iter_unit(shard, include_failed=False):
            table.setdefault(rec.key, {})[name] = rec.outputs
    return table


class ShardDamagedError(RuntimeError):
    """The source shard could not be read to the end; its unit must not be committed."""


@dataclass
class Window:
    start: int  # index of the first sample in the shard
    samples: list[dict[str, Any]]  # key, error, image (bytes), caption, labels (dict), prompts (dict | None)


def iter_windows(data: str, source_format: str | None, shard: str, window: int,
                 prompts: dict[str, dict] | None) -> Iterator[Window]:
    """One source shard as windows, in source order. Raises when the shard cannot be read to the end (a
    truncated tar, an I/O error): the caller must not commit a unit with keys missing. A damaged shard is
    only known at its end, so its readable part is computed and then thrown away with the unit."""
    src = _source(data, source_format)
    by_name = {s.name: s for s in src.shards()}
    if shard not in by_name:
        raise FileNotFoundError(f"source shard {shard!r} no longer exists in {data!r}")
    index, samples = 0, []
    for sample in by_name[shard]:
        if sample.damages_shard:
            raise ShardDamagedError(sample.error)
        samples.append({
            "key": sample.key, "error": sample.error, "image": sample.image, "caption": sample.caption,
            "labels": sample.labels or {}, "prompts": None if prompts is None else prompts.get(sample.key, {}),
        })
        index += 1
        if len(samples) == window:
            yield Window(index - len(samples), samples)
            samples = []
    if samples:
        yield Window(index - len(samples), samples)


# -- decode + preprocess --------------------------------------------------------------------------
def decode_one(image: bytes | None, preprocess: Any) -> tuple[np.ndarray | None, str | None]:
    """astrea's safe decoder + the expert's exact preprocessing -> (float32 pixels, None) or (None, reason)."""
    from astrea.extract.experts.base import BadImageError
    from astrea.extract.experts.common import decode_image

    try:
        arr = _to_numpy(preprocess(decode_image(image))).astype(np.float32, copy=False)
        return np.ascontiguousarray(arr), None
    except BadImageError as e:
        return None, _reason(e)
    except Exception as e:  # a preprocess bug on odd input must not take the job down
        return None, f"preprocess failed: {type(e).__name__}: {_reason(e)}"


def decode_window(images: list[bytes | None], preprocess: Any) -> list[tuple[np.ndarray | None, str | None]]:
    """A Ray CPU task's body: decode one window (``None`` = a sample that already failed)."""
    return [(None, None) if img is None else decode_one(img, preprocess) for img in images]


def warm_decoder(preprocess: Any) -> int:
    """A Ray CPU task run once per decode slot while the models load: the worker processes start,
    import the decoder and unpickle the preprocessor before the first real window needs them."""
    from PIL import Image

    probe = Image.fromarray(np.zeros((64, 48, 3), np.uint8))
    preprocess(probe)
    return 1


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().to("cpu").float().numpy()
    return np.asarray(x)


# -- preprocessing without the model --------------------------------------------------------------
def light_preprocessor(expert: Any) -> Any | None:
    """A picklable ``PIL.Image -> Tensor`` equal to ``expert.preprocess`` that does not carry weights.

    CPU decode tasks must not each load a 400M-parameter model just to resize and normalise. An
    expert may offer ``preprocessor()`` itself; otherwise a shallow copy with every parameter-holding
    module dropped is tried, and accepted only when it reproduces ``expert.preprocess`` bit-exactly on
    probe images. ``None``: preprocessing stays in the inference actor (slower; the report says so).
    """
    import copy

    import torch
    from PIL import Image

    made = getattr(expert, "preprocessor", None)
    if callable(made):
        cand = made()
    else:
        light = copy.copy(expert)
        dropped = False
        for name, val in list(vars(expert).items()):
            if isinstance(val, torch.nn.Module) and any(True for _ in val.parameters()):
                object.__setattr__(light, name, None)
                dropped = True
        if isinstance(expert, torch.nn.Module) or not dropped:
            # An nn.Module expert shares its _modules dict with the copy: cannot strip safely.
            return None if isinstance(expert, torch.nn.Module) else expert.preprocess
        cand = light.preprocess
    rng = np.random.default_rng(0)
    probes = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((37, 53), (480, 320))]
    try:
        for img in probes:
            a, b = _to_numpy(expert.preprocess(img)), _to_numpy(cand(img))
            if a.shape != b.shape or not np.array_equal(a, b):
                return None
    except Exception:
        return None
    try:
        import ray.cloudpickle as cloudpickle

        if len(cloudpickle.dumps(cand)) > MAX_PREPROCESSOR_BYTES:
            return None  # weights hide somewhere we did not strip: shipping them to every task costs more
    except Exception:
        return None
    return cand


def labels_json(labels: dict | None) -> dict:
    """Labels as the writer stores them (JSON round trip: no numpy scalars or tuples sneak in)."""
    return json.loads(json.dumps(labels or {}, sort_keys=True, default=str))
