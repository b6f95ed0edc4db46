"""``astrea.extract.run(cfg)``: the Ray job that fills the feature store, expert by expert.

Per expert (stage order; a dependent expert waits for its prerequisite's units):
1. a Ray task builds the expert once to learn its spec (the fingerprint needs the loaded weights;
   building on the cluster, not in the driver, resolves ``--weights`` paths where the workers are)
   and a weight-free copy of its preprocessing;
2. the store's ``EXPERT@FP`` directory is opened, temp leftovers of killed runs removed, and every
   unit already committed is skipped;
3. one Ray Data pipeline reads (CPU tasks) -> decodes + preprocesses (CPU tasks) -> runs the expert
   (actor pool, one GPU each) -> streams results to the driver, which writes each unit in source
   order and commits it through the store's protocol (tmp -> fsync -> rename -> stats last).

A unit is committed only when every one of its keys has a row (ok or failure with a reason), so a
killed job leaves nothing partial behind and its rerun does exactly what is missing.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from astrea.extract.config import ExtractConfig, ExtractConfigError, ExtractPlan

log = logging.getLogger("astrea.extract")

REPORT_NAME = "extract_report.json"
# Which stored predictions prompt which expert (DEVELOPING.md contract); an expert module may
# declare its own with a module-level PREREQUISITES tuple.
PREREQUISITES: dict[str, tuple[str, ...]] = {"grounding_dino": ("ram_plus",), "sam2": ("grounding_dino",)}
READ_CPUS = 0.25  # reading a tar is I/O: reserve less than a decode task so reads never starve decoding
ACTOR_MEMORY = 256 * 2**20  # a floor, not a cap: it only keeps actors unfused from the decode tasks


class ExtractError(RuntimeError):
    """The job could not run (not: some images failed). The message says what to do."""


def run(cfg: ExtractConfig) -> dict[str, Any]:
    """Run an extraction job and return its report (also written beside each expert's units)."""
    return cfg.build().run()


# -- Ray session ----------------------------------------------------------------------------------
@contextmanager
def ray_session(cfg: ExtractConfig) -> Iterator[str]:
    """Use a Ray already initialised in this process, connect to ``--address``, or start a local
    cluster for the job; only what this function started is shut down."""
    import ray

    if ray.is_initialized():
        yield "existing"
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                              "log_to_driver": False, "configure_logging": True}
    if cfg.address:
        ray.init(address=cfg.address, **kwargs)
        mode = f"cluster {cfg.address}"
    else:
        ray.init(num_cpus=cfg.num_cpus, object_store_memory=cfg.object_store_memory, **kwargs)
        mode = "local"
    try:
        yield mode
    finally:
        ray.shutdown()


def _quiet_ray_data() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    # The writer needs each shard's rows in source order; keeping Ray's order makes the per-shard
    # reorder buffer a safety net rather than a memory risk.
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Its high-memory hint compares usage with the actors' `memory` request, which here is a floor
    # that keeps them unfused (see ExpertJob._dataset), not a budget: the hint would be noise.
    try:
        from ray.data._internal.issue_detection.detectors import HighMemoryIssueDetector

        ctx.issue_detectors_config.detectors = [d for d in ctx.issue_detectors_config.detectors
                                                if d is not HighMemoryIssueDetector]
    except (ImportError, AttributeError):  # private API: a newer Ray may have moved it; only a hint is lost
        pass
    for name in ("ray.data", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _plan_expert_task(cfg_dict: dict[str, Any], prerequisites: dict[str, str]) -> tuple[Any, Any]:
    from astrea.extract.experts.registry import ExpertConfig
    from astrea.extract.pipeline import light_preprocessor

    expert = ExpertConfig(**cfg_dict).build(prerequisites=prerequisites)
    return expert.spec, light_preprocessor(expert)


def _user_error(e: BaseException, what: str) -> BaseException:
    """A Ray-wrapped failure -> the user's error itself when it is one (weights missing, bad arch...),
    else an :class:`ExtractError` that names what failed."""
    from astrea.registry import UnknownNameError
    from astrea.schemas import SpecError

    known: tuple[type[BaseException], ...] = (ExtractError, ExtractConfigError, UnknownNameError, SpecError, FileNotFoundError)
    try:
        from astrea.extract.experts.base import BadImageError, WeightsUnavailableError

        known += (WeightsUnavailableError, BadImageError)
    except ImportError:  # pragma: no cover
        pass
    cause = _unwrap(e)
    if isinstance(cause, known):
        return cause
    text = str(cause).strip().splitlines()
    return ExtractError(f"{what} failed: {type(cause).__name__}: {text[-1] if text else ''}")


def _unwrap(e: BaseException) -> BaseException:
    """Ray wraps worker exceptions; surface the original (user errors keep their message)."""
    cause = getattr(e, "cause", None)
    while cause is not None and getattr(cause, "cause", None) is not None:
        cause = cause.cause
    return cause if isinstance(cause, BaseException) else e


# -- per-expert bookkeeping -----------------------------------------------------------------------
@dataclass
class UnitState:
    name: str
    writer: Any = None
    next_index: int = 0
    end_index: int | None = None
    pending: dict[int, dict] = field(default_factory=dict)
    ok: int = 0
    failed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    shard_error: str | None = None
    storage_error: dict[str, float] = field(default_factory=dict)  # worst fp32 -> storage dtype round trip


def reason_kind(reason: str) -> str:
    """'undecodable: UnidentifiedImageError: ...' -> 'undecodable' (the summary groups by kind)."""
    return reason.split(":", 1)[0].strip() or "unknown"


def _reason(e: BaseException) -> str:
    return str(e.args[0] if e.args else e)[:300]


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def _unit_bytes(edir: Any, unit: str, stats: Any) -> int:
    if isinstance(stats, dict):
        for k in ("bytes", "nbytes", "bytes_written", "size_bytes"):
            if isinstance(stats.get(k), int):
                return int(stats[k])
    root = Path(edir.path)
    return sum(_dir_bytes(p) if p.is_dir() else p.stat().st_size for p in root.glob(f"{unit}*") if p.exists())


def _edir_fingerprint(edir: Any) -> str:
    spec = getattr(edir, "spec", None)
    if spec is not None:
        return spec.fingerprint()
    return Path(edir.path).name.split("@", 1)[1]


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


class ExpertJob:
    """One expert over the plan's shards: skip what is committed, stream the rest, commit units."""

    def __init__(self, plan: ExtractPlan, store: Any, ecfg: Any, *, done: dict[str, "ExpertJob"], runtime: dict):
        self.plan, self.store, self.ecfg, self.done, self.rt = plan, store, ecfg, done, runtime
        self.name = ecfg.name
        self.report: dict[str, Any] = {"expert": self.name, "arch": ecfg.arch, "weights": ecfg.weights,
                                       "random_weights": ecfg.weights == "random", "device": runtime["device"],
                                       "compute_dtype": ecfg.compute_dtype, "workers": runtime["workers"]}
        self.failed_units: dict[str, str] = {}
        self.t_first: float | None = None  # first / last result written: steady-state throughput
        self.t_last: float | None = None

    # prerequisites ------------------------------------------------------------------------------
    def prerequisites(self) -> tuple[dict[str, str], dict[str, str], list[str]]:
        """-> (name -> fingerprint for the spec, name -> store ref for reading, units to skip)."""
        from astrea.extract.experts.registry import expert_module

        cfg = self.plan.config
        needs = tuple(getattr(expert_module(self.name), "PREREQUISITES", PREREQUISITES.get(self.name, ())))
        if not needs or cfg.without_prerequisites:
            if needs:
                self.report["prerequisites_note"] = (
                    f"run without {', '.join(needs)} prompts (--without-prerequisites): the expert's fallback "
                    "prompts were used, as recorded in its spec")
            return {}, {}, []
        fps, refs, skip = {}, {}, []
        for p in needs:
            if p in cfg.prerequisites:
                ref = cfg.prerequisites[p]
            elif p in self.done:
                ref = f"{p}@{self.done[p].fingerprint}"
                skip.extend(u for u in self.done[p].failed_units if u not in skip)
            else:
                ref = p
            try:
                edir = self.store.resolve(self.plan.dataset, ref)
            except (KeyError, FileNotFoundError, ValueError) as e:
                msg = e.args[0] if e.args else str(e)
                raise ExtractError(
                    f"{self.name} is prompted by the stored outputs of {p}, but they could not be found for "
                    f"dataset {self.plan.dataset!r} in {self.plan.store} ({msg}). Extract {p} first "
                    f"(`astrea extract --expert {p} --expert {self.name} ...` runs both in order), pick one with "
                    f"--prerequisite {p}@FINGERPRINT, or pass --without-prerequisites to use {self.name}'s "
                    "fallback prompts (recorded in its spec).") from None
            committed = set(edir.committed_units())
            missing = [u for u in self.plan.shards if u not in committed and u not in skip]
            if missing:
                shown = ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else "")
                raise ExtractError(
                    f"{self.name} needs {p}'s outputs for every unit it extracts, but {Path(edir.path).name} has "
                    f"no committed unit(s) {shown} ({len(missing)} of {len(self.plan.shards)}). Run "
                    f"`astrea extract --expert {p}` over the same --data/--shards/--limit first.")
            fps[p] = _edir_fingerprint(edir)
            refs[p] = f"{p}@{fps[p]}"
        return fps, refs, skip

    # main ---------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        import ray

        t0 = time.monotonic()
        fps, refs, skip = self.prerequisites()
        cfg_dict = self.ecfg.__dict__.copy()
        try:
            if self.rt["single_node"]:
                # One machine: the driver sees the same files as the workers, and building here saves a
                # fresh worker process (imports included) per expert.
                spec, pre = _plan_expert_task(cfg_dict, fps)
            else:
                # On a cluster, --weights paths are resolved where the workers are. max_calls=1: the
                # worker exits afterwards, returning a real-size model's memory before actors load it.
                task = ray.remote(num_cpus=min(1.0, self.plan.config.cpus_per_worker), max_calls=1)(_plan_expert_task)
                spec, pre = ray.get(task.remote(cfg_dict, fps))
        except Exception as e:
            raise _user_error(e, f"building {self.name} ({self.ecfg.arch}, weights {self.ecfg.weights!r})") from None
        self.spec = spec
        self.fingerprint = spec.fingerprint()
        t_plan = time.monotonic() - t0
        edir = self.store.expert_dir(self.plan.dataset, spec, create=True)
        self.edir = edir
        cleaned = edir.cleanup_temp()
        for leftover in Path(edir.path).glob(f".{REPORT_NAME}.tmp-*"):  # a report write cut by a kill
            leftover.unlink(missing_ok=True)
        committed = set(edir.committed_units())
        todo = [u for u in self.plan.shards if u not in committed and u not in skip]
        for u in skip:
            if u not in committed:
                self.failed_units[u] = "prerequisite unit failed in this run"
        self.report.update({
            "fingerprint": self.fingerprint, "dir": str(edir.path), "prerequisites": refs,
            "preprocess_on": "cpu tasks" if pre is not None else "inference actor",
            "temp_cleaned": cleaned, "units_selected": len(self.plan.shards),
            "units_skipped": sorted(u for u in self.plan.shards if u in committed),
            "units_committed": [], "images_ok": 0, "images_failed": 0, "failures_by_reason": {},
            "bytes_written": 0,
        })
        if not todo:
            self.report["status"] = "nothing to do" if not self.failed_units else "incomplete"
        else:
            self._stream(todo, pre, fps)
            self.report["status"] = "incomplete" if self.failed_units else "done"
        self.report["units_failed"] = dict(sorted(self.failed_units.items()))
        secs = time.monotonic() - t0
        n = self.report["images_ok"] + self.report["images_failed"]
        self.report.update({"seconds": round(secs, 3), "images_per_s": round(n / secs, 3) if secs > 0 else 0.0,
                            "seconds_build_spec": round(t_plan, 3)})
        if self.t_first is not None and self.t_last is not None and n > 1 and self.t_last > self.t_first:
            # Throughput once the workers are up (start-up = model loads, paid once per job).
            self.report["seconds_to_first_result"] = round(self.t_first - t0, 3)
            self.report["images_per_s_streaming"] = round((n - 1) / (self.t_last - self.t_first), 3)
        if todo:  # a no-op rerun keeps the report of the run that did the work
            _write_json_atomic(Path(edir.path) / REPORT_NAME, self.report)
        return self.report

    def _dataset(self, todo: list[str], pre: Any, fps: dict[str, str]) -> Any:
        import ray.data
        from ray.data import ActorPoolStrategy

        from astrea.extract.pipeline import ExpertActor, preprocess_rows, read_shards

        cfg = self.plan.config
        rt = self.rt
        read_cpus = READ_CPUS if cfg.cpus_per_task != READ_CPUS else READ_CPUS / 2
        ds = ray.data.from_items([{"shard": u} for u in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(read_shards, batch_size=1, batch_format="pyarrow", num_cpus=read_cpus, fn_kwargs={
            "data": str(cfg.data), "source_format": cfg.source_format, "store_root": str(self.plan.store),
            "dataset": self.plan.dataset, "prereqs": {p: f"{p}@{fp}" for p, fp in fps.items()},
            "window": cfg.batch_size})
        # One row = one window of batch_size images (see pipeline.py): one decode task and one forward each.
        ds = ds.map_batches(preprocess_rows, batch_size=1, batch_format="pyarrow",
                            num_cpus=cfg.cpus_per_task, fn_kwargs={"preprocessor": pre})
        # The actors state a memory request so that their resources never equal the decode tasks':
        # Ray Data fuses a task op into the next actor op when they match, which would put JPEG
        # decoding back on the GPU's process.
        ds = ds.map_batches(
            ExpertActor, batch_size=1, batch_format="pyarrow",
            compute=ActorPoolStrategy(size=rt["workers"]), num_cpus=cfg.cpus_per_worker, num_gpus=rt["num_gpus"],
            memory=ACTOR_MEMORY,
            fn_constructor_kwargs={"cfg": self.ecfg.__dict__.copy(), "prerequisites": fps,
                                   "fingerprint": self.fingerprint, "device": rt["device"],
                                   "threads": max(1, round(cfg.cpus_per_worker)) if rt["device"] == "cpu" else None})
        return ds

    def _stream(self, todo: list[str], pre: Any, fps: dict[str, str]) -> None:
        from astrea.extract.progress import Progress

        units = {u: UnitState(u) for u in todo}
        total = None if any(self.plan.counts.get(u) is None for u in todo) else sum(self.plan.counts[u] for u in todo)  # type: ignore[misc]
        label = f"{self.name}@{self.fingerprint}" + (" (random weights)" if self.report["random_weights"] else "")
        bar = Progress(label, total=total, units=len(todo), enabled=self.plan.config.progress)
        try:
            ds = self._dataset(todo, pre, fps)
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
                for w in batch.to_pylist():
                    st = units.get(w["shard"])
                    if st is not None and st.name not in self.report["units_committed"]:
                        self._accept(st, w, bar)
        except BaseException as e:
            for st in units.values():
                if st.writer is not None:
                    st.writer.abort()
                    st.writer = None
            bar.close()
            if isinstance(e, (KeyboardInterrupt, SystemExit, ExtractError)):
                raise
            cause = _unwrap(e)
            raise ExtractError(
                f"{self.name}: the extraction pipeline failed ({type(cause).__name__}: "
                f"{str(cause).splitlines()[0] if str(cause) else ''}). Units committed so far are kept; fix "
                f"the cause and rerun to finish the rest. Ray logs: /tmp/ray/session_latest/logs") from e
        bar.close()
        for st in units.values():
            if st.name not in self.failed_units and st.name not in self.report["units_committed"]:
                if st.writer is not None:
                    st.writer.abort()
                self.failed_units[st.name] = "pipeline ended before the unit was complete"

    def _accept(self, st: UnitState, w: dict, bar: Any) -> None:
        """Windows may arrive out of order (Ray Data only promises it with preserve_order): buffer by
        start so the unit's writer sees keys in exact source order."""
        if w["end"]:
            st.end_index = w["start"]
            st.shard_error = w.get("shard_error")
        elif w["start"] >= st.next_index:  # an already-written window again (a retried task) is dropped
            st.pending[w["start"]] = w
        while st.next_index in st.pending:
            win = st.pending.pop(st.next_index)
            for i, smp in enumerate(win["samples"]):
                self._write(st, smp, win["array_dtype"], st.next_index + i, bar)
            st.next_index += len(win["samples"])
        if st.end_index is not None and st.next_index >= st.end_index:
            self._finish(st, bar)

    def _write(self, st: UnitState, r: dict, array_dtype: str, index: int, bar: Any) -> None:
        from astrea.extract.pipeline import result_arrays

        now = time.monotonic()
        self.t_first = self.t_first or now
        self.t_last = now
        if st.writer is None:
            st.writer = self.edir.open_unit(st.name)
        labels = json.loads(r["labels"]) if r.get("labels") else None
        key, error = r["key"], r["error"]
        if not error:
            try:
                tokens, pooled = result_arrays(r, self.spec, array_dtype)
                st.writer.add(key, tokens, pooled, json.loads(r["outputs"] or "{}"), caption=r.get("caption"),
                              labels=labels)
            except ValueError as e:  # a key the store cannot hold ('/', '..', duplicates): a per-key failure
                error = f"invalid key: {_reason(e)}"
        if error:
            try:
                st.writer.add_failure(key, error, caption=r.get("caption"), labels=labels)
            except ValueError:
                # The key itself is unusable as a store key: record the failure under a deterministic
                # stand-in (the same for every expert), so the count and the reason survive.
                st.writer.add_failure(f"invalid-key-{index:06d}", f"invalid key {key!r}: {error}",
                                      caption=r.get("caption"), labels=labels)
            st.failed += 1
            kind = reason_kind(error)
            st.reasons[kind] = st.reasons.get(kind, 0) + 1
        else:
            if r.get("storage_error"):
                for k, v in json.loads(r["storage_error"]).items():
                    st.storage_error[k] = v + st.storage_error.get(k, 0) if k == "nonfinite" else max(
                        v, st.storage_error.get(k, 0.0))
            st.ok += 1
        bar.image(ok=not error)

    def _finish(self, st: UnitState, bar: Any) -> None:
        if st.shard_error:
            # An unreadable source shard (e.g. a truncated tar): committing what was read would mark
            # the unit finished with keys missing, so it is left out and reported.
            if st.writer is not None:
                st.writer.abort()
                st.writer = None
            self.failed_units[st.name] = f"source shard unreadable: {st.shard_error}"
            bar.unit(failed=True)
            return
        if st.writer is None:  # an empty shard is still a unit (verify and resume see it as done)
            st.writer = self.edir.open_unit(st.name)
        stats = st.writer.commit(extra={"extract": {
            "images_ok": st.ok, "images_failed": st.failed, "failures_by_reason": dict(sorted(st.reasons.items())),
            "random_weights": self.report["random_weights"], "storage_error": st.storage_error}})
        st.writer = None
        rep = self.report
        rep["units_committed"].append(st.name)
        rep["images_ok"] += st.ok
        rep["images_failed"] += st.failed
        for k, v in st.reasons.items():
            rep["failures_by_reason"][k] = rep["failures_by_reason"].get(k, 0) + v
        rep["bytes_written"] += _unit_bytes(self.edir, st.name, stats)
        se = rep.setdefault("storage_error", {})
        for k, v in st.storage_error.items():
            se[k] = v + se.get(k, 0) if k == "nonfinite" else max(v, se.get(k, 0.0))
        bar.unit(failed=False)


def run_plan(plan: ExtractPlan) -> dict[str, Any]:
    import ray

    from astrea.shards import Store

    cfg = plan.config
    t0 = time.monotonic()
    with ray_session(cfg) as mode:
        _quiet_ray_data()
        gpus = float(ray.cluster_resources().get("GPU", 0.0))
        num_gpus = cfg.num_gpus if cfg.num_gpus is not None else (1.0 if gpus >= 1 and cfg.device != "cpu" else 0.0)
        if num_gpus > gpus:
            raise ExtractError(f"num_gpus={num_gpus} per worker but the Ray cluster has {gpus:g} GPU(s); "
                               "lower --num-gpus, or --num-gpus 0 --device cpu")
        device = cfg.device if cfg.device != "auto" else ("cuda" if num_gpus > 0 else "cpu")
        if device.startswith("cuda") and num_gpus == 0:
            raise ExtractError("device=cuda but the Ray cluster has no GPU; use --device cpu")
        compute_dtype = cfg.compute_dtype if cfg.compute_dtype != "auto" else (
            "bfloat16" if device.startswith("cuda") else "float32")
        workers = cfg.workers or (max(1, int(gpus // num_gpus)) if num_gpus else 1)
        cpus = float(ray.cluster_resources().get("CPU", 0.0))
        need = workers * cfg.cpus_per_worker + cfg.cpus_per_task
        if need > cpus + 1e-9:
            # Ray Data would wait forever for a CPU to decode on: say so instead of hanging.
            raise ExtractError(
                f"{workers} worker(s) x --cpus-per-worker {cfg.cpus_per_worker:g} + one decode task "
                f"(--cpus-per-task {cfg.cpus_per_task:g}) need {need:g} CPUs, the Ray "
                f"cluster has {cpus:g}; lower --workers / --cpus-per-worker / --cpus-per-task"
                + ("" if cfg.address else " or raise --num-cpus"))
        single_node = len([n for n in ray.nodes() if n.get("Alive")]) == 1 and not ray.util.client.ray.is_connected()
        runtime = {"device": device, "num_gpus": num_gpus, "workers": workers, "ray": mode, "single_node": single_node}
        store = Store(plan.store)
        done: dict[str, ExpertJob] = {}
        reports = []
        for ecfg in cfg.expert_configs(plan.experts, device, compute_dtype):
            job = ExpertJob(plan, store, ecfg, done=done, runtime=runtime)
            reports.append(job.run())
            done[ecfg.name] = job
    secs = time.monotonic() - t0
    ok = sum(r["images_ok"] for r in reports)
    failed = sum(r["images_failed"] for r in reports)
    return {
        "dataset": plan.dataset, "store": str(plan.store), "data": str(cfg.data), "shards": plan.shards,
        "ray": runtime["ray"], "device": device, "workers": workers,
        "experts": reports, "images_ok": ok, "images_failed": failed,
        "bytes_written": sum(r["bytes_written"] for r in reports), "seconds": round(secs, 3),
        "images_per_s": round((ok + failed) / secs, 3) if secs > 0 else 0.0,
        "status": "incomplete" if any(r["status"] == "incomplete" for r in reports) else (
            "nothing to do" if all(r["status"] == "nothing to do" for r in reports) else "done"),
    }
