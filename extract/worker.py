"""The inference actor: one frozen expert on one device, extracting whole units and writing them itself.

Per unit (= one source shard), inside the actor:

    read the shard (streaming; the actor's reader thread)  ->  Ray CPU tasks decode + preprocess windows
      (a bounded number in flight)  ->  forward, one call per window (the actor's engine thread; units
      follow each other without a gap)
      ->  the actor's writer thread: output checks, storage dtype, ``UnitWriter.add`` ... ``commit``

Only counts go back to the driver: features never leave the node that computed them, and the work
after the forward (checks, dtype conversion, compression, fsync) overlaps the next window's forward.

Why not Ray Data with one ordered writer in the driver (the first version): on an H100 (SigLIP SO400M,
bf16, batch 32) it reached 58 img/s against 253 img/s bare forward (0.23). Every 1.3 MB result crossed
the object store into the one driver process, which converted, checked, compressed and wrote them all,
and every token map's exact fp16 round-trip error was computed per image (see ``prepare_output``).
An actor that owns its units also needs no reorder buffer: a unit's windows are read, computed and
written in source order by construction (docs/extract.md, "Why Ray actors").
"""

from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np

from astrea.extract.pipeline import (
    ShardDamagedError,
    _reason,
    decode_window,
    iter_windows,
    labels_json,
    prompt_table,
)
from astrea.schemas.unit import OutputsJSON, failure_kind, outputs_to_json
from astrea.shards.formats import get_format

UNIT_BUSY_WAIT_S = 60.0  # a unit still held by a writer of a killed job: wait this long for it to go
WRITE_QUEUE = 4  # windows computed but not yet written, per actor: bounds memory, absorbs a commit's fsyncs
# The exact storage round-trip error (``storage_error``, ~8 ms per 576x1152 map here: 0.25 ms per image when
# done once per 32-image window, an eighth of the 2 ms post-forward budget) is measured on the first usable
# image of every MEASURE_EVERY-th window of a unit, the first one included.
MEASURE_EVERY = 8


def prepare_output(spec: Any, o: Any, measure: bool) -> tuple[np.ndarray, np.ndarray, OutputsJSON, dict | None]:
    """-> tokens, pooled (ready for the writer), outputs (encoded), storage round-trip error (``measure``);
    ValueError if unusable.

    Per image this is the costliest step after the forward (a 576x1152 map is 2.6 MB), so every
    image gets only what is cheap and needed: one conversion to the storage dtype and a bit test
    for inf/NaN (non-finite input and float16 overflow alike). The exact round-trip error
    (``storage_error``, ~5 ms per such map) is measured on the first image of each window.
    """
    from astrea.shards.dtypes import nonfinite_in_storage, to_storage

    tokens = np.asarray(o.tokens, dtype=np.float32)
    pooled = np.asarray(o.pooled, dtype=np.float32)
    want = (spec.grid * spec.grid, spec.token_dim)
    if tokens.shape != want or pooled.shape != (spec.pooled_dim,):
        raise ValueError(f"shapes tokens {tokens.shape} pooled {pooled.shape}, spec says {want} / "
                         f"({spec.pooled_dim},)")
    st_tokens, st_pooled = to_storage(tokens, spec.dtype), to_storage(pooled, spec.dtype)
    if nonfinite_in_storage(st_tokens, spec.dtype) or nonfinite_in_storage(st_pooled, spec.dtype):
        if not (np.isfinite(tokens).all() and np.isfinite(pooled).all()):
            raise ValueError("non-finite values in tokens or pooled")
        n = int(np.count_nonzero(np.abs(tokens) > np.finfo(np.float16).max)) if spec.dtype == "float16" else 0
        raise ValueError(f"{n or 'some'} value(s) overflow {spec.dtype} storage; extract with "
                         "--dtype bfloat16 or float32")
    err = None
    if measure and spec.dtype in ("int8", "float8_e4m3"):  # relative-to-element error means little with a per-row scale
        from astrea.shards.dtypes import int8_error

        err = int8_error(tokens, st_tokens, spec.dtype)
    elif measure and spec.dtype != "float32":
        from astrea.extract.experts.common import storage_error

        err = storage_error(np.concatenate([tokens.ravel(), pooled]), spec.dtype)
    outputs = outputs_to_json(o.outputs or {})  # ValueError when not strict JSON; the writer stores this text
    if spec.dtype == "bfloat16":  # the writer rounds float32 to bfloat16 itself (numpy has no bfloat16)
        return tokens, pooled, outputs, err
    return st_tokens, st_pooled, outputs, err


def prepare_window(spec: Any, results: list[Any], measure: bool = True) -> tuple[list[Any], dict | None]:
    """A window's forward results -> per image ``(tokens, pooled, outputs, known_finite)`` ready for
    ``UnitWriter.add``, or the failure reason (str); and the storage round-trip error of its first usable
    image (``measure``).

    The per-image work of ``prepare_output``, once per image and nothing twice: one storage dtype conversion
    (torch's vector cast; for device tensors the whole window on the device, so only storage-dtype bytes
    cross to the host), one inf/NaN bit test through a reused buffer, and the writer told the rows are
    checked (it skips its own scan). bfloat16 goes image by image through ``prepare_output`` (the writer
    rounds float32 itself).
    """
    out: list[Any] = list(results)
    good: list[tuple[int, OutputsJSON]] = []
    want = (spec.grid * spec.grid, spec.token_dim)
    for i, r in enumerate(results):
        if isinstance(r, str):
            continue
        try:
            if tuple(r.tokens.shape) != want or tuple(r.pooled.shape) != (spec.pooled_dim,):
                raise ValueError(f"shapes tokens {tuple(r.tokens.shape)} pooled {tuple(r.pooled.shape)}, spec says "
                                 f"{want} / ({spec.pooled_dim},)")
            good.append((i, outputs_to_json(r.outputs or {})))
        except (ValueError, TypeError, AttributeError) as e:
            out[i] = f"bad expert output: {type(e).__name__}: {_reason(e)}"
    if not good:
        return out, None
    if spec.dtype not in ("float16", "float32"):
        err = None
        for j, (i, _) in enumerate(good):
            try:
                t, p, o, e = prepare_output(spec, results[i], measure and err is None)
            except (ValueError, TypeError) as ex:
                out[i] = f"bad expert output: {type(ex).__name__}: {_reason(ex)}"
                continue
            err = err or e
            out[i] = (t, p, o, True)  # prepare_output refused inf/NaN in the storage dtype
        return out, err
    first = results[good[0][0]]
    tokens = _storage_rows([results[i].tokens for i, _ in good], spec.dtype)
    pooled = _storage_rows([results[i].pooled for i, _ in good], spec.dtype)
    err = None
    if measure and spec.dtype != "float32":
        from astrea.extract.experts.common import storage_error

        err = storage_error(np.concatenate([_host_f32(first.tokens).ravel(), _host_f32(first.pooled)]), spec.dtype)
    bad = _nonfinite_rows(tokens) | _nonfinite_rows(pooled)
    for j, (i, outputs) in enumerate(good):
        if not bad[j]:
            out[i] = (tokens[j], pooled[j], outputs, True)
            continue
        t, p = _host_f32(results[i].tokens), _host_f32(results[i].pooled)
        if not (np.isfinite(t).all() and np.isfinite(p).all()):
            out[i] = "bad expert output: ValueError: non-finite values in tokens or pooled"
        else:
            n = int(np.count_nonzero(np.abs(t) > np.finfo(np.float16).max)) if spec.dtype == "float16" else 0
            out[i] = (f"bad expert output: ValueError: {n or 'some'} value(s) overflow {spec.dtype} storage; "
                      "extract with --dtype bfloat16 or float32")
    return out, err


def _host_f32(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _storage_rows(arrays: list[Any], dtype: str) -> list[np.ndarray] | np.ndarray:
    """A window's arrays in the storage dtype (float16 | float32), one conversion each.

    Torch tensors (an expert's device outputs) are stacked and converted on their device, then copied to
    the host once, in the storage dtype (half the bytes of float32 for float16). Host arrays are converted
    one by one into arrays of their own: measured faster than filling one window-sized array, whose
    fresh pages fault in on every window."""
    import torch

    tdtype = getattr(torch, dtype)
    if all(hasattr(a, "detach") for a in arrays):
        with torch.inference_mode():
            return torch.stack([a.detach() for a in arrays]).to(tdtype).cpu().numpy()
    out = []
    for a in arrays:
        if hasattr(a, "detach"):
            a = a.detach().cpu().numpy()
        a = np.asarray(a)
        if a.dtype.kind == "f" and a.flags.writeable and a.dtype.itemsize in (2, 4):
            dst = np.empty(a.shape, dtype=np.dtype(dtype))
            torch.from_numpy(dst).copy_(torch.from_numpy(a))  # torch's vector cast: numpy's bits, ~10x faster
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                dst = np.ascontiguousarray(a, dtype=np.dtype(dtype))
        out.append(dst)
    return out


def _nonfinite_rows(rows: list[np.ndarray] | np.ndarray) -> np.ndarray:
    """Per row (float16/float32): True when it holds inf/NaN (exponent bits all ones).

    Row by row through one reused buffer: measured 3x faster than one test over the whole window, whose
    window-sized temporaries leave the cache."""
    bits, mask = (np.uint16, 0x7FFF) if rows[0].dtype.itemsize == 2 else (np.uint32, 0x7FFFFFFF)
    inf = bits(0x7C00 if bits is np.uint16 else 0x7F800000)
    buf = np.empty(rows[0].size, bits)
    # |x| as bits >= the inf pattern <=> exponent all ones (inf or NaN)
    return np.array([np.bitwise_and(r.reshape(-1).view(bits), bits(mask), out=buf).max(initial=0) >= inf
                     for r in rows], dtype=bool)


class UnitWorker:
    """A Ray actor holding one expert. ``run_unit`` (called for up to ``UNITS_PER_WORKER`` units at once
    by the driver, from Ray's threads) queues the unit for the actor's reader thread and waits.

    Three threads, each a stage for every unit in turn: the reader (opens units, reads windows, submits
    their decode tasks), the engine (forward only) and the writer. Not a thread per unit: the windows of
    consecutive units form one stream, so the next unit's reading and decoding overlap the end of the
    current one. Measured on grounding_dino.tiny (CPU): a thread per unit made the forward itself ~20%
    slower than a bare forward; one unit at a time left the device idle between units (80% busy); reading
    in the engine thread kept it 84% busy, a reader thread 97%.
    """

    def __init__(self, cfg: dict[str, Any], prerequisites: dict[str, str], fingerprint: str, device: str, *,
                 store_root: str, dataset: str, data: str, source_format: str | None, batch_size: int,
                 cpus_per_task: float, decode_in_tasks: bool, inflight: int, threads: int | None = None,
                 expert: Any = None):
        """``expert``: an already built expert instead of ``cfg`` (benchmarks/actor_throughput.py's stand-in)."""
        import torch

        from astrea.extract.experts.registry import ExpertConfig
        from astrea.shards import Store

        if threads:
            torch.set_num_threads(int(threads))
        self.expert = expert if expert is not None else ExpertConfig(**cfg).build(prerequisites=prerequisites)
        got = self.expert.spec.fingerprint()
        if got != fingerprint:
            raise RuntimeError(
                f"{cfg['name']}: this worker built spec {got}, the job planned {fingerprint}; the expert's build "
                "is not deterministic across processes (random init not seeded?) or the weights differ between "
                "nodes. Refusing to mix features from two models in one store directory.")
        self.expert.to(device)
        self.spec = self.expert.spec
        self.uses_prompts = bool(getattr(self.expert, "prerequisites", ()))
        self.edir = Store(store_root).expert_dir(dataset, self.spec, create=True)
        self.store_root, self.dataset = store_root, dataset
        self.data, self.source_format, self.batch_size = data, source_format, batch_size
        self.inflight = max(1, int(inflight))
        # Without a weight-free preprocessor (the expert's preprocess needs its model) this actor decodes.
        self._decode = None
        if decode_in_tasks:
            import ray

            self._decode = ray.remote(decode_window).options(num_cpus=cpus_per_task, max_retries=3)
        get_format(self.spec.format).writer.warm()  # the store library's imports, before the first unit
        self._requests: queue.Queue = queue.Queue()
        self._live: dict[str, list[int]] = {}
        self._jobs: dict[str, _UnitJob] = {}
        self._jobs_lock = threading.Lock()
        # reader -> engine: (job, window, decode ref | raw images), or (job, None, None) = the job's end.
        # `_slots` bounds the windows read ahead (submitted, not yet taken by the engine).
        self._fed: queue.Queue = queue.Queue()
        self._slots = threading.BoundedSemaphore(self.inflight)
        # engine -> writer, bounded: at most WRITE_QUEUE windows computed and not yet written.
        self._writes: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE)
        self._threads = [threading.Thread(target=fn, name=name, daemon=True) for fn, name in (
            (self._reader_loop, "astrea-reader"), (self._engine_loop, "astrea-engine"),
            (lambda: _writer_loop(self._writes), "astrea-writer"))]
        for t in self._threads:
            t.start()

    # -- driver-facing ----------------------------------------------------------------------------
    def ready(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "device": str(self.expert.device) if hasattr(self.expert, "device") else None}

    def progress(self) -> dict[str, list[int]]:
        """unit -> [ok, failed] written so far, for the units in progress."""
        return {u: list(v) for u, v in list(self._live.items())}

    def run_unit(self, unit: str, prereqs: dict[str, str], preprocessor: list, random_weights: bool) -> dict[str, Any]:
        """``preprocessor``: [ObjectRef] of the weight-free preprocessor the decode tasks use (a list, so
        Ray passes the reference on instead of resolving it here), or [] when this actor decodes."""
        with self._jobs_lock:
            # The driver hands a unit back to the same actor when it lost contact with it: if the first
            # run is still going, wait for it instead of writing the unit twice.
            job = self._jobs.get(unit)
            if job is None:
                job = self._jobs[unit] = _UnitJob(self, unit, prereqs, preprocessor[0] if preprocessor else None,
                                                  random_weights)
                self._live[unit] = job.live
                self._requests.put(job)
        try:
            while True:
                try:
                    return job.future.result(timeout=5.0)
                except FutureTimeout:
                    # The three threads guard every step, so this is a backstop against a hang, not a path.
                    for t in self._threads:
                        if not t.is_alive():
                            raise RuntimeError(f"the actor's {t.name} thread died; unit {unit} was not committed")
        finally:
            with self._jobs_lock:
                if self._jobs.get(unit) is job:
                    del self._jobs[unit]
                self._live.pop(unit, None)

    # -- reading and the engine --------------------------------------------------------------------
    def _reader_loop(self) -> None:
        """Opens units and reads their windows ahead of the engine, submitting each window's decode task.

        Its own thread, so tar parsing, the writer's open and task submission (measured on
        grounding_dino.tiny, CPU: ~12% of the engine thread's time) overlap the forward instead of
        running between forwards; units follow each other without a gap.
        """
        while True:
            job = self._requests.get()
            job.picked = time.perf_counter()
            try:
                if not job.start():  # nothing to do, its future is set
                    continue
                while True:
                    self._slots.acquire()
                    try:
                        win, ref = job.next_window()
                    except BaseException:
                        self._slots.release()
                        raise
                    if win is None:
                        self._slots.release()
                        break
                    self._fed.put((job, win, ref))
            except BaseException as e:  # a bug: this unit fails, the actor goes on
                job.error = job.error or e
            self._fed.put((job, None, None))

    def _engine_loop(self) -> None:
        """Forward, one call per window, in the order the reader fed them; results go to the writer."""
        import ray

        while True:
            t = time.perf_counter()
            job, win, ref = self._fed.get()
            # Waiting counts against a unit only once the reader has it: an actor with no unit is idle.
            job.seconds["wait_read"] += time.perf_counter() - max(t, job.picked or t)
            if win is None:
                self._writes.put((job, None, None))  # the writer commits (or aborts) the unit after its windows
                continue
            if job.error is not None:
                self._slots.release()
                if self._decode is not None:
                    try:
                        ray.cancel(ref)
                    except Exception:  # already finished or gone: nothing to stop
                        pass
                continue
            try:
                t0 = time.perf_counter()
                try:
                    decoded = ray.get(ref) if self._decode is not None else decode_window(ref, self.expert.preprocess)
                finally:
                    self._slots.release()
                t1 = time.perf_counter()
                results = self.forward_window(win.samples, decoded)
                t2 = time.perf_counter()
            except Exception as e:  # a decode task failed past its retries, a bug: this unit only
                job.error = e
                continue
            self._writes.put((job, win, results))  # blocks while the writer is WRITE_QUEUE windows behind
            job.seconds["wait_decode"] += t1 - t0
            job.seconds["forward"] += t2 - t1
            job.seconds["wait_write"] += time.perf_counter() - t2

    # -- forward ----------------------------------------------------------------------------------
    def forward_window(self, samples: list[dict], decoded: list[tuple[np.ndarray | None, str | None]]) -> list[Any]:
        """Per sample: an ExpertOutput, or the failure reason (str). Same-shape images share one call."""
        results: list[Any] = [None] * len(samples)
        groups: dict[tuple, list[int]] = {}
        for i, (smp, (arr, err)) in enumerate(zip(samples, decoded)):
            if smp["error"] or err:
                results[i] = smp["error"] or err
            else:
                groups.setdefault(tuple(arr.shape), []).append(i)
        for idx in groups.values():
            try:
                outs = self._forward([decoded[i][0] for i in idx], [samples[i] for i in idx])
            except Exception as e:
                if len(idx) == 1:
                    results[idx[0]] = f"forward failed: {type(e).__name__}: {_reason(e)}"
                    continue
                # One image (or the batch size: OOM) broke the batch: redo image by image so only the
                # guilty key fails.
                outs = []
                for i in idx:
                    try:
                        outs.append(self._forward([decoded[i][0]], [samples[i]])[0])
                    except Exception as e2:
                        outs.append(f"forward failed: {type(e2).__name__}: {_reason(e2)}")
            for i, o in zip(idx, outs):
                results[i] = o
        return results

    def _forward(self, arrays: list[np.ndarray], samples: list[dict]) -> list[Any]:
        import torch

        x = torch.from_numpy(np.stack(arrays))
        prompts = [s["prompts"] or {} for s in samples] if self.uses_prompts else None
        outs = self.expert.forward(x, prompts)
        if len(outs) != len(arrays):
            raise RuntimeError(f"forward returned {len(outs)} outputs for {len(arrays)} images")
        return outs


def _writer_loop(writes: queue.Queue) -> None:
    """The actor's writer thread: windows and unit ends, in the engine's order."""
    while True:
        job, win, results = writes.get()
        if win is None:
            job.finish()  # sets the unit's future whatever happens
        elif job.error is None:
            try:
                job.write_window(win, results)
            except BaseException as e:  # UnitWriteFailed, a bug: this unit only
                job.error = e


class _UnitJob:
    """One unit in one actor: its window stream (reader thread), its writer and counts (writer thread)."""

    def __init__(self, worker: UnitWorker, unit: str, prereqs: dict[str, str], pre: Any, random_weights: bool):
        self.w, self.unit, self.prereqs, self.pre, self.random_weights = worker, unit, prereqs, pre, random_weights
        self.future: Future = Future()
        self.live = [0, 0]  # ok, failed: read by progress()
        self.ok = self.failed = 0
        self.reasons: dict[str, int] = {}
        self.storage_error: dict[str, float] = {}
        self.index = 0
        self.windows_done = 0
        self.writer: Any = None
        self.windows: Any = None
        self.shard_error: str | None = None
        self.error: BaseException | None = None
        # Where the engine spent its time on this unit: waiting for the reader (the source storage is the
        # limit), for decoded windows (the decode CPUs are), in forward, for the writer thread (the writer is).
        self.seconds = {"wait_read": 0.0, "wait_decode": 0.0, "forward": 0.0, "wait_write": 0.0}
        self.picked: float | None = None  # perf_counter when the reader took the unit up

    def result(self, status: str, **kw: Any) -> dict[str, Any]:
        return {"unit": self.unit, "status": status, "ok": self.ok, "failed": self.failed,
                "reasons": dict(sorted(self.reasons.items())), "storage_error": self.storage_error,
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}, "bytes": 0, "reason": None, **kw}

    # -- reader thread ----------------------------------------------------------------------------
    def start(self) -> bool:
        """Open the writer and the source; False when there is nothing to do (future already set)."""
        try:
            self.writer = self._open_writer()
            if self.writer is None:
                self.future.set_result(self.result("skipped", reason="committed by another run meanwhile"))
                return False
            w = self.w
            prompts = prompt_table(w.store_root, w.dataset, self.prereqs, self.unit) if self.prereqs else None
            self.windows = iter_windows(w.data, w.source_format, self.unit, w.batch_size, prompts)
        except BaseException as e:
            self._fail(e)
            return False
        return True

    def _open_writer(self) -> Any:
        from astrea.shards.errors import UnitBusyError, UnitCommittedError

        deadline = time.monotonic() + UNIT_BUSY_WAIT_S
        while True:
            try:
                return self.w.edir.open_unit(self.unit)
            except UnitCommittedError:
                return None
            except UnitBusyError:
                # A writer of a killed job that Ray has not reaped yet: it is about to go.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def next_window(self) -> tuple[Any, Any]:
        """-> (window, decode ref or raw images), or (None, None) at the end (or an unreadable shard)."""
        if self.error is not None or self.shard_error is not None:
            return None, None
        try:
            win = next(self.windows)
        except StopIteration:
            return None, None
        except Exception as e:  # unreadable shard (truncated tar, I/O error): not committed
            self.shard_error = _reason(e) if isinstance(e, ShardDamagedError) else f"{type(e).__name__}: {_reason(e)}"
            return None, None
        images = [None if s["error"] else s["image"] for s in win.samples]
        for s in win.samples:
            s["image"] = None  # the bytes travel with the task; keep no second copy here
        w = self.w
        if w._decode is None:
            return win, images
        try:
            return win, w._decode.remote(images, self.pre)
        except Exception as e:  # the task could not be submitted: this unit fails, the actor goes on
            self.error = e
            return None, None

    # -- writer thread ----------------------------------------------------------------------------
    def _abort(self) -> None:
        try:
            if self.writer is not None:
                self.writer.abort()
        except BaseException:  # e.g. the store went read-only: the temp stays for the next run's cleanup
            pass

    def _fail(self, e: BaseException) -> None:
        self._abort()
        if not self.future.done():
            self.future.set_exception(e)

    def finish(self) -> None:
        from astrea.shards.errors import UnitCommittedError

        try:
            if self.error is not None:
                self._fail(self.error)
            elif self.shard_error is not None:
                self._abort()
                self.future.set_result(self.result("failed", reason=f"source shard unreadable: {self.shard_error}"))
            else:
                stats = self.writer.commit(extra={"extract": {
                    "images_ok": self.ok, "images_failed": self.failed,
                    "failures_by_reason": dict(sorted(self.reasons.items())),
                    "random_weights": self.random_weights, "storage_error": self.storage_error}})
                self.future.set_result(self.result("committed", bytes=int(stats.get("bytes", 0))))
        except UnitCommittedError:  # another run committed it meanwhile (the writer discarded its data)
            self.future.set_result(self.result("skipped", reason="committed by another run meanwhile"))
        except BaseException as e:
            self._fail(e)

    def write_window(self, win: Any, results: list[Any]) -> None:
        # The window's checks and conversions as array operations (prepare_window), then one add per key.
        prepared, err = prepare_window(self.w.spec, results, measure=self.windows_done % MEASURE_EVERY == 0)
        self.windows_done += 1
        for k, v in (err or {}).items():
            old = self.storage_error.get(k, 0)
            self.storage_error[k] = v + old if k == "nonfinite" else max(v, old)
        for smp, res in zip(win.samples, prepared):
            self.write_one(smp, res)
            self.index += 1

    def write_one(self, smp: dict, res: Any) -> bool:
        """Write one key: ``res`` is ``(tokens, pooled, outputs, known_finite)`` from ``prepare_window`` or the
        failure reason. True when it was written with features."""
        writer = self.writer
        key, caption, labels = smp["key"], smp.get("caption"), labels_json(smp.get("labels"))
        error = res if isinstance(res, str) else None
        if error is None:
            tokens, pooled, outputs, finite = res
            try:
                writer.add(key, tokens, pooled, outputs, caption=caption, labels=labels, known_finite=finite)
            except ValueError as e:  # a key the store cannot hold ('/', '..', duplicates): a per-key failure
                error = f"invalid key: {_reason(e)}"
        if error is not None:
            try:
                writer.add_failure(key, error, caption=caption, labels=labels)
            except ValueError:
                # The key itself is unusable as a store key: record the failure under a deterministic
                # stand-in (the same for every expert), so the count and the reason survive. It counts as
                # an invalid key whatever else failed, here and in the unit's stats alike.
                error = f"invalid key: {key!r}: {error.removeprefix('invalid key: ')}"
                writer.add_failure(f"invalid-key-{self.index:06d}", error, caption=caption, labels=labels)
            self.failed += 1
            self.live[1] += 1
            kind = failure_kind(error)
            self.reasons[kind] = self.reasons.get(kind, 0) + 1
            return False
        self.ok += 1
        self.live[0] += 1
        return True
