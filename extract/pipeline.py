"""The three Ray Data stages of one expert's extraction, and the table layout between them.

    read (CPU task per source shard, streams windows)  ->  decode + preprocess (CPU tasks)
      ->  expert forward (actor pool, one GPU each)  ->  driver: per-shard ordered writer + commit

A row is a *window*: up to ``batch_size`` consecutive samples of one shard, which becomes exactly one
forward call. Fixing forward batches by position in the shard (not by how Ray happens to bundle rows)
makes the stored bytes reproducible across runs, kills and resumes: some experts' kernels differ in
the last bit between batch sizes (measured: grounding_dino, 6e-7 in fp32). Every shard ends with one
*end row* (``end=True``, ``start`` = number of samples) that flows through all stages, so the writer
knows when a unit is complete, and learns of a source shard that could not be read (``shard_error``).
Arrays travel as raw bytes with their shape: no pickles, no tensor-extension quirks with ragged
shapes, and failed samples simply carry no bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

MAX_PREPROCESSOR_BYTES = 8 * 2**20
WINDOWS_PER_BLOCK = 4  # the reader yields a few windows per block: the pipeline streams within a shard

SAMPLE = pa.struct([
    ("key", pa.string()), ("error", pa.string()), ("image", pa.large_binary()), ("caption", pa.string()),
    ("labels", pa.string()), ("prompts", pa.string()), ("pixels", pa.large_binary()),
    ("pshape", pa.list_(pa.int32())), ("tokens", pa.large_binary()), ("pooled", pa.large_binary()),
    ("outputs", pa.string()), ("storage_error", pa.string()),
])
WINDOW_SCHEMA = pa.schema([
    ("shard", pa.string()), ("start", pa.int64()), ("end", pa.bool_()), ("shard_error", pa.string()),
    ("array_dtype", pa.string()), ("samples", pa.large_list(SAMPLE)),
])


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([{f: r.get(f) for f in WINDOW_SCHEMA.names} for r in rows], schema=WINDOW_SCHEMA)


def _reason(e: BaseException) -> str:
    msg = e.args[0] if e.args else str(e)
    return str(msg)[:300]


# -- stage 1: read --------------------------------------------------------------------------------
_SOURCES: dict[tuple[str, str | None], Any] = {}


def _source(data: str, fmt: str | None) -> Any:
    # Ray reuses worker processes: open (and index) a source once per process, not once per shard.
    if (data, fmt) not in _SOURCES:
        from astrea.data import open_source

        _SOURCES[(data, fmt)] = open_source(data, format=fmt)
    return _SOURCES[(data, fmt)]


def _prompt_table(store_root: str, dataset: str, prereqs: dict[str, str], shard: str) -> dict[str, dict]:
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


def read_shards(batch: pa.Table, *, data: str, source_format: str | None, store_root: str, dataset: str,
                prereqs: dict[str, str], window: int) -> Iterator[pa.Table]:
    """Shard names in; that shard's samples out as windows (source order), then its end row."""
    for shard in batch.column("shard").to_pylist():
        index, samples, out = 0, [], []
        try:
            src = _source(data, source_format)
            by_name = {s.name: s for s in src.shards()}
            if shard not in by_name:
                raise FileNotFoundError(f"source shard {shard!r} no longer exists in {data!r}")
            prompts = _prompt_table(store_root, dataset, prereqs, shard)
            for sample in by_name[shard]:
                p = prompts.get(sample.key, {}) if prereqs else None
                samples.append({
                    "key": sample.key, "error": sample.error, "image": sample.image, "caption": sample.caption,
                    "labels": json.dumps(sample.labels or {}, sort_keys=True, default=str),
                    "prompts": None if p is None else json.dumps(p),
                })
                index += 1
                if len(samples) == window:
                    out.append({"shard": shard, "start": index - len(samples), "end": False, "samples": samples})
                    samples = []
                    if len(out) >= WINDOWS_PER_BLOCK:
                        yield _table(out)
                        out = []
            if samples:
                out.append({"shard": shard, "start": index - len(samples), "end": False, "samples": samples})
            end = {"shard": shard, "start": index, "end": True, "samples": []}
        except Exception as e:  # unreadable shard (truncated tar, I/O error): reported, not committed
            end = {"shard": shard, "start": index, "end": True, "samples": [],
                   "shard_error": f"{type(e).__name__}: {_reason(e)}"}
        yield _table([*out, end])


# -- stage 2: decode + preprocess -----------------------------------------------------------------
def preprocess_rows(batch: pa.Table, *, preprocessor: Any) -> pa.Table:
    """Decode (astrea's safe decoder) and preprocess exactly as the expert does; per-key failures.

    With ``preprocessor=None`` (an expert whose preprocess needs its model) the image bytes pass
    through and the actor decodes them itself.
    """
    rows = batch.to_pylist()
    if preprocessor is not None:
        for w in rows:
            for smp in w["samples"]:
                if not smp["error"]:
                    _decode_into(smp, preprocessor)
                smp["image"] = None  # decoded: no need to ship the JPEG further
    return _table(rows)


def _decode_into(smp: dict, preprocess: Any) -> None:
    from astrea.extract.experts.base import BadImageError
    from astrea.extract.experts.common import decode_image

    try:
        arr = _to_numpy(preprocess(decode_image(smp["image"]))).astype(np.float32, copy=False)
        smp["pixels"], smp["pshape"] = np.ascontiguousarray(arr).tobytes(), list(arr.shape)
    except BadImageError as e:
        smp["error"] = _reason(e)
    except Exception as e:  # a preprocess bug on odd input must not take the job down
        smp["error"] = f"preprocess failed: {type(e).__name__}: {_reason(e)}"


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().to("cpu").float().numpy()
    return np.asarray(x)


# -- stage 3: forward -----------------------------------------------------------------------------
_NP_STORAGE = {"float16": np.float16, "float32": np.float32}


class ExpertActor:
    """Holds one frozen expert on one device; one forward call per window.

    Arrays leave the actor already in the storage dtype when numpy has it (halves the bytes shipped
    to the writer for fp16); bfloat16 leaves as float32 and the store's writer rounds it.
    """

    def __init__(self, cfg: dict[str, Any], prerequisites: dict[str, str], fingerprint: str, device: str,
                 threads: int | None = None):
        import torch

        from astrea.extract.experts.registry import ExpertConfig

        if threads:
            torch.set_num_threads(int(threads))
        self.expert = ExpertConfig(**cfg).build(prerequisites=prerequisites)
        got = self.expert.spec.fingerprint()
        if got != fingerprint:
            raise RuntimeError(
                f"{cfg['name']}: this worker built spec {got}, the job planned {fingerprint}; the expert's build "
                "is not deterministic across processes (random init not seeded?) or the weights differ between "
                "nodes. Refusing to mix features from two models in one store directory.")
        self.expert.to(device)
        self.storage = _NP_STORAGE.get(self.expert.spec.dtype, np.float32)
        self.uses_prompts = bool(getattr(self.expert, "prerequisites", ()))

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        for w in rows:
            w["array_dtype"] = np.dtype(self.storage).name
            todo: dict[tuple, list[dict]] = {}
            for smp in w["samples"]:
                if smp["error"]:
                    continue
                if smp.get("pixels") is None:  # preprocess happens here (see preprocess_rows)
                    _decode_into(smp, self.expert.preprocess)
                    smp["image"] = None
                    if smp["error"]:
                        continue
                todo.setdefault(tuple(smp["pshape"]), []).append(smp)
            for shape, group in todo.items():
                self._run(group, shape)
            for smp in w["samples"]:
                smp["pixels"] = None
        return _table(rows)

    def _forward(self, group: list[dict], shape: tuple) -> list[Any]:
        import torch

        x = torch.from_numpy(np.stack([np.frombuffer(r["pixels"], np.float32).reshape(shape) for r in group]))
        prompts = None
        if self.uses_prompts:
            prompts = [json.loads(r["prompts"]) if r.get("prompts") else {} for r in group]
        outs = self.expert.forward(x, prompts)
        if len(outs) != len(group):
            raise RuntimeError(f"forward returned {len(outs)} outputs for {len(group)} images")
        return outs

    def _run(self, group: list[dict], shape: tuple) -> None:
        try:
            outs = self._forward(group, shape)
        except Exception as e:
            if len(group) == 1:
                group[0]["error"] = f"forward failed: {type(e).__name__}: {_reason(e)}"
                return
            # One image (or the batch size: OOM) broke the batch: redo image by image so only the
            # guilty key fails.
            for r in group:
                try:
                    self._fill(r, self._forward([r], shape)[0])
                except Exception as e2:
                    r["error"] = f"forward failed: {type(e2).__name__}: {_reason(e2)}"
            return
        for r, o in zip(group, outs):
            try:
                self._fill(r, o)
            except Exception as e:
                r["error"] = f"bad expert output: {type(e).__name__}: {_reason(e)}"

    def _fill(self, r: dict, o: Any) -> None:
        spec = self.expert.spec
        tokens = np.asarray(o.tokens, dtype=np.float32)
        pooled = np.asarray(o.pooled, dtype=np.float32)
        want = (spec.grid * spec.grid, spec.token_dim)
        if tokens.shape != want or pooled.shape != (spec.pooled_dim,):
            raise ValueError(f"shapes tokens {tokens.shape} pooled {pooled.shape}, spec says {want} / "
                             f"({spec.pooled_dim},)")
        if not (np.isfinite(tokens).all() and np.isfinite(pooled).all()):
            raise ValueError("non-finite values in tokens or pooled")
        if spec.dtype != "float32":
            from astrea.extract.experts.common import storage_error

            err = storage_error(np.concatenate([tokens.ravel(), pooled]), spec.dtype)
            if err["nonfinite"]:
                raise ValueError(f"{err['nonfinite']} value(s) overflow {spec.dtype} storage; extract with "
                                 "--dtype bfloat16 or float32")
            r["storage_error"] = json.dumps(err)
        r["tokens"] = np.ascontiguousarray(tokens.astype(self.storage)).tobytes()
        r["pooled"] = np.ascontiguousarray(pooled.astype(self.storage)).tobytes()
        r["outputs"] = json.dumps(o.outputs or {}, allow_nan=False)


def result_arrays(smp: dict, spec: Any, array_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    dt = np.dtype(array_dtype)
    tokens = np.frombuffer(smp["tokens"], dt).reshape(spec.grid * spec.grid, spec.token_dim)
    pooled = np.frombuffer(smp["pooled"], dt).reshape(spec.pooled_dim)
    return tokens, pooled


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

