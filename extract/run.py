"""``astrea.extract.run(cfg)``: the Ray job that fills the feature store, expert by expert.

Per expert (stage order; a dependent expert waits for its prerequisite's units):
1. a Ray task builds the expert once to learn its spec (the fingerprint needs the loaded weights;
   building on the cluster, not in the driver, resolves ``--weights`` paths where the workers are)
   and a weight-free copy of its preprocessing;
2. the store's ``EXPERT@FP`` directory is opened, temp leftovers of killed runs removed, and every
   unit already committed is skipped;
3. inference actors (one device each, extract/worker.py) are handed units, two at a time each: an
   actor reads its unit's shard, has Ray CPU tasks decode + preprocess it window by window, runs the
   expert, and writes and commits the unit itself through the store's protocol (tmp -> fsync ->
   rename -> stats last). Only counts come back to the driver, which keeps the bar and the report.

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
from pathlib import Path
from typing import Any

from astrea.errors import USER_ERRORS, AstreaError
from astrea.extract.config import ExtractConfig, ExtractPlan
from astrea.schemas.stages import expert_prerequisites

log = logging.getLogger("astrea.extract")

REPORT_NAME = "extract_report.json"
UNITS_PER_WORKER = 2  # units handed to an actor at once: it reads the next while finishing the current
WORKER_RESTARTS = 3  # Ray restarts a dead inference actor this often (each restart reloads the model)
UNIT_ATTEMPTS = 3  # a unit whose actor died is handed out again this often
PROGRESS_EVERY_S = 0.5
RECOVERY_TIMEOUT_S = 900  # a restarted actor reloads its model: a real-size one may take minutes


class ExtractError(AstreaError, RuntimeError):
    """The job could not run (not: some images failed). The message says what to do."""


def run(cfg: ExtractConfig) -> dict[str, Any]:
    """Run an extraction job and return its report (also written beside each expert's units)."""
    return run_plan(cfg.build())


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
        try:
            ray.init(address=cfg.address, **kwargs)
        except ConnectionError as e:
            raise ExtractError(f"could not connect to the Ray cluster at --address {cfg.address} ({e}); start it "
                               "(`ray start --head`) or leave --address out for a local cluster") from None
        mode = f"cluster {cfg.address}"
    else:
        ray.init(num_cpus=cfg.num_cpus, object_store_memory=cfg.object_store_memory, **kwargs)
        mode = "local"
    try:
        yield mode
    finally:
        ray.shutdown()


def _plan_expert_task(cfg_dict: dict[str, Any], prerequisites: dict[str, str]) -> tuple[Any, Any]:
    from astrea.extract.experts.registry import ExpertConfig
    from astrea.extract.pipeline import light_preprocessor

    expert = ExpertConfig(**cfg_dict).build(prerequisites=prerequisites)
    return expert.spec, light_preprocessor(expert)


def _user_error(e: BaseException, what: str) -> BaseException:
    """A Ray-wrapped failure -> the user's error itself when it is one (weights missing, bad arch...),
    else an :class:`ExtractError` that names what failed."""
    cause = _unwrap(e)
    if isinstance(cause, USER_ERRORS):
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
def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def find_prerequisites(plan: ExtractPlan, store: Any, name: str, done: dict[str, "ExpertJob"],
                       later: frozenset[str] = frozenset()) -> tuple[dict[str, str], dict[str, str], list[str], str | None]:
    """Which stored outputs prompt expert ``name`` -> (name -> fingerprint for the spec, name -> store ref
    for reading, units to skip, a note for the report).

    ``done``: the jobs this run finished (their failed units are skipped); ``later``: prerequisites this run
    extracts before this expert; the check before any work (``later`` set) leaves them to be resolved
    when this expert's turn comes."""
    from astrea.extract.experts.registry import expert_module

    cfg = plan.config
    # Which stored predictions prompt which expert: the stage table (DEVELOPING.md contract); an expert
    # module the table does not name may declare its own with a module-level PREREQUISITES tuple.
    needs = tuple(getattr(expert_module(name), "PREREQUISITES", expert_prerequisites(name)))
    if not needs or cfg.without_prerequisites:
        note = None if not needs else (
            f"run without {', '.join(needs)} prompts (--without-prerequisites): the expert's fallback "
            "prompts were used, as recorded in its spec")
        return {}, {}, [], note
    fps, refs, skip = {}, {}, []
    for p in needs:
        if p in cfg.prerequisites:
            ref = cfg.prerequisites[p]
        elif p in done:
            ref = f"{p}@{done[p].fingerprint}"
            skip.extend(u for u in done[p].failed_units if u not in skip)
        elif p in later:
            continue
        else:
            ref = p
        try:
            edir = store.resolve(plan.dataset, ref)
        except (KeyError, FileNotFoundError, ValueError) as e:
            msg = e.args[0] if e.args else str(e)
            raise ExtractError(
                f"{name} is prompted by the stored outputs of {p}, but they could not be found for "
                f"dataset {plan.dataset!r} in {plan.store} ({msg}). Extract {p} first "
                f"(`astrea extract --expert {p} --expert {name} ...` runs both in order), pick one with "
                f"--prerequisite {p}@FINGERPRINT, or pass --without-prerequisites to use {name}'s "
                "fallback prompts (recorded in its spec).") from None
        committed = set(edir.committed_units())
        missing = [u for u in plan.shards if u not in committed and u not in skip]
        if missing:
            shown = ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else "")
            raise ExtractError(
                f"{name} needs {p}'s outputs for every unit it extracts, but {Path(edir.path).name} has "
                f"no committed unit(s) {shown} ({len(missing)} of {len(plan.shards)}). Run "
                f"`astrea extract --expert {p}` over the same --data/--shards/--limit first, pick another "
                f"with --prerequisite {p}@FINGERPRINT, or pass --without-prerequisites to use {name}'s "
                "fallback prompts (recorded in its spec).")
        fps[p] = edir.spec.fingerprint()
        refs[p] = f"{p}@{fps[p]}"
    return fps, refs, skip, None


class JobReport:
    """What one expert's run did: the report dict (returned, summarised by the CLI, written beside the
    units), the units that failed and why, and the times throughput is measured between."""

    def __init__(self, ecfg: Any, runtime: dict):
        self.data: dict[str, Any] = {"expert": ecfg.name, "arch": ecfg.arch, "weights": ecfg.weights,
                                     "random_weights": ecfg.weights == "random", "device": runtime["device"],
                                     "compute_dtype": ecfg.compute_dtype, "dtype": ecfg.dtype,
                                     "workers": runtime["workers"]}
        self.failed_units: dict[str, str] = {}
        self.t_ready: float | None = None  # actors built (models loaded) / last unit done: throughput
        self.t_done: float | None = None

    def open(self, fingerprint: str, edir: Any, refs: dict[str, str], pre: Any, cleaned: int,
             shards: list[str], committed: set[str]) -> None:
        self.data.update({
            "fingerprint": fingerprint, "dir": str(edir.path), "prerequisites": refs,
            "preprocess_on": "cpu tasks" if pre is not None else "inference actor",
            "temp_cleaned": cleaned, "units_selected": len(shards),
            "units_skipped": sorted(u for u in shards if u in committed),
            "units_committed": [], "images_ok": 0, "images_failed": 0, "failures_by_reason": {},
            "bytes_written": 0, "store_errors": [],
        })

    def committed(self, res: dict[str, Any]) -> None:
        rep = self.data
        rep["units_committed"].append(res["unit"])
        rep["images_ok"] += res["ok"]
        rep["images_failed"] += res["failed"]
        for k, v in res["reasons"].items():
            rep["failures_by_reason"][k] = rep["failures_by_reason"].get(k, 0) + v
        rep["bytes_written"] += res["bytes"]
        acc = rep.setdefault("actor_seconds", {})
        for k, v in res.get("seconds", {}).items():
            acc[k] = round(acc.get(k, 0.0) + v, 3)
        se = rep.setdefault("storage_error", {})
        for k, v in res["storage_error"].items():
            se[k] = v + se.get(k, 0) if k == "nonfinite" else max(v, se.get(k, 0.0))

    def store_error(self, what: str, e: OSError, where: Any) -> None:
        self.data["store_errors"].append(f"{what}: {e.strerror or type(e).__name__}: {e.filename or where}")

    def close(self, t0: float, t_plan: float) -> None:
        rep = self.data
        rep["units_failed"] = dict(sorted(self.failed_units.items()))
        secs = time.monotonic() - t0
        n = rep["images_ok"] + rep["images_failed"]
        rep.update({"seconds": round(secs, 3), "images_per_s": round(n / secs, 3) if secs > 0 else 0.0,
                    "seconds_build_spec": round(t_plan, 3)})
        if self.t_ready is not None and self.t_done is not None and n and self.t_done > self.t_ready:
            # Throughput once the models are loaded (paid once per job): comparable to a bare forward.
            rep["seconds_to_ready"] = round(self.t_ready - t0, 3)
            rep["images_per_s_after_load"] = round(n / (self.t_done - self.t_ready), 3)

    def write_beside(self, edir: Any) -> None:
        """The report beside the units describes the last run that wrote some: a run that committed none
        (nothing to do, every unit failed again, or another job committed them meanwhile) keeps it; its
        own report is still returned (and written by `--report`)."""
        if not self.data["units_committed"]:
            return
        try:
            _write_json_atomic(Path(edir.path) / REPORT_NAME, self.data)
        except OSError as e:
            self.store_error(f"{REPORT_NAME} not written", e, edir.path)


class _ActorPool:
    """One expert's inference actors (and any replacing a hung one), with the decode workers warmed while
    the models load. ``kill()`` ends every actor it made."""

    def __init__(self, job: "ExpertJob", fps: dict[str, str], pre: Any):
        import ray

        from astrea.extract.worker import UnitWorker

        cfg, rt = job.plan.config, job.rt
        workers = rt["workers"]
        # Windows read ahead per actor (decoding, or decoded and waiting for the forward): enough to keep
        # every free CPU decoding while the actor's forward runs.
        free = max(0.0, float(ray.cluster_resources().get("CPU", 0.0)) - workers * cfg.cpus_per_worker)
        slots = max(1, int(free // cfg.cpus_per_task))
        inflight = max(2, -(-slots // workers) + 1)
        self._cls = ray.remote(UnitWorker).options(
            num_cpus=cfg.cpus_per_worker, num_gpus=rt["num_gpus"], max_concurrency=2 * UNITS_PER_WORKER + 2,
            max_restarts=WORKER_RESTARTS, max_task_retries=0)
        self.pre_ref = [ray.put(pre)] if pre is not None else []
        kwargs = {"store_root": str(job.plan.store), "dataset": job.plan.dataset, "data": str(cfg.data),
                  "source_format": cfg.source_format, "batch_size": cfg.batch_size, "cpus_per_task": cfg.cpus_per_task,
                  "decode_in_tasks": pre is not None, "inflight": inflight,
                  # torch's CPU threads = the CPUs the actor reserved, on a GPU too: its CPU-side work
                  # (the float16 conversion of every output) must not spread over the decode tasks' cores.
                  "threads": max(1, round(cfg.cpus_per_worker))}
        self._args = (job.ecfg.__dict__.copy(), fps, job.fingerprint, rt["device"])
        self._kwargs = kwargs
        self.made: list[Any] = []
        self.actors = [self.new() for _ in range(workers)]
        self._warm = []
        if pre is not None:
            # Start the decode workers while the models load: a cold worker (process + imports) costs
            # seconds, which would otherwise land on the first windows of the job.
            from astrea.extract.pipeline import warm_decoder

            task = ray.remote(warm_decoder).options(num_cpus=cfg.cpus_per_task)
            self._warm = [task.remote(self.pre_ref[0]) for _ in range(slots)]

    def new(self) -> Any:
        actor = self._cls.remote(*self._args, **self._kwargs)
        self.made.append(actor)
        return actor

    def wait_ready(self, what: str) -> None:
        import ray

        try:
            ray.get([a.ready.remote() for a in self.actors] + self._warm)
        except Exception as e:
            raise _user_error(e, what) from None

    def kill(self) -> None:
        import ray

        for a in self.made:
            ray.kill(a)


class ExpertJob:
    """One expert over the plan's shards: skip what is committed, stream the rest, commit units."""

    def __init__(self, plan: ExtractPlan, store: Any, ecfg: Any, *, done: dict[str, "ExpertJob"], runtime: dict):
        self.plan, self.store, self.ecfg, self.done, self.rt = plan, store, ecfg, done, runtime
        self.name = ecfg.name
        self.rec = JobReport(ecfg, runtime)
        self.report = self.rec.data
        self.failed_units = self.rec.failed_units  # read by the experts this one prompts

    def prerequisites(self, later: frozenset[str] = frozenset()) -> tuple[dict[str, str], dict[str, str], list[str]]:
        """-> (name -> fingerprint for the spec, name -> store ref for reading, units to skip)."""
        fps, refs, skip, note = find_prerequisites(self.plan, self.store, self.name, self.done, later)
        if note:
            self.report["prerequisites_note"] = note
        return fps, refs, skip

    def _build_spec(self, fps: dict[str, str]) -> tuple[Any, Any]:
        import ray

        cfg_dict = self.ecfg.__dict__.copy()
        try:
            if self.rt["single_node"]:
                # One machine: the driver sees the same files as the workers, and building here saves a
                # fresh worker process (imports included) per expert.
                return _plan_expert_task(cfg_dict, fps)
            # On a cluster, --weights paths are resolved where the workers are. max_calls=1: the
            # worker exits afterwards, returning a real-size model's memory before actors load it.
            task = ray.remote(num_cpus=min(1.0, self.plan.config.cpus_per_worker), max_calls=1)(_plan_expert_task)
            return ray.get(task.remote(cfg_dict, fps))
        except Exception as e:
            raise _user_error(e, f"building {self.name} ({self.ecfg.arch}, weights {self.ecfg.weights!r})") from None

    def run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        fps, refs, skip = self.prerequisites()
        spec, pre = self._build_spec(fps)
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
        self.rec.open(self.fingerprint, edir, refs, pre, cleaned, self.plan.shards, committed)
        if not todo:
            self.report["status"] = "nothing to do" if not self.failed_units else "incomplete"
        else:
            self._stream(todo, pre, fps)
            self.report["status"] = "incomplete" if self.failed_units else "done"
            # A worker that died mid-unit (its unit was redone by another) left its temp behind.
            try:
                self.report["temp_cleaned"] += edir.cleanup_temp()
            except OSError as e:  # the store turned read-only (or went away): the summary still counts
                self.rec.store_error("cleanup", e, edir.path)
        self.rec.close(t0, t_plan)
        self.rec.write_beside(edir)
        return self.report

    def _stream(self, todo: list[str], pre: Any, fps: dict[str, str]) -> None:
        """Start the actors, hand them units (``UNITS_PER_WORKER`` each at a time), collect their counts."""
        from astrea.extract.progress import Progress

        cfg = self.plan.config
        total = None if any(self.plan.counts.get(u) is None for u in todo) else sum(self.plan.counts[u] for u in todo)  # type: ignore[misc]
        label = f"{self.name}@{self.fingerprint}" + (" (random weights)" if self.report["random_weights"] else "")
        bar = Progress(label, total=total, units=len(todo), enabled=cfg.progress)
        pool = _ActorPool(self, fps, pre)
        prereq_refs = {p: f"{p}@{fp}" for p, fp in fps.items()}
        try:
            pool.wait_ready(f"starting {self.name} inference worker(s)")
            self.rec.t_ready = time.monotonic()
            bar.start()
            sched = _Scheduler(
                pool.actors, todo,
                lambda a, u: a.run_unit.remote(u, prereq_refs, pool.pre_ref, self.report["random_weights"]),
                deadline_s=cfg.image_timeout_s * cfg.batch_size, replace=pool.new,
                deadline_why=f" (--image-timeout {cfg.image_timeout_s:g} x --batch-size {cfg.batch_size})")
            for unit, res, error in sched.results(lambda counts: bar.set_live(counts)):
                if error is not None or res["status"] not in ("committed", "skipped"):
                    self.failed_units[unit] = error if error is not None else res["reason"]
                    bar.unit(failed=True, unit_name=unit)
                elif res["status"] == "committed":
                    self.rec.committed(res)
                    bar.unit(failed=False, ok=res["ok"], failed_images=res["failed"], unit_name=res["unit"])
                else:
                    self.report["units_skipped"].append(unit)
                    bar.unit(failed=False, unit_name=unit)
            self.rec.t_done = time.monotonic()
        except BaseException as e:
            bar.close()
            if isinstance(e, (KeyboardInterrupt, SystemExit, ExtractError)) or _is_user_error(e):
                raise
            cause = _unwrap(e)
            raise ExtractError(
                f"{self.name}: the extraction failed ({type(cause).__name__}: "
                f"{str(cause).splitlines()[0] if str(cause) else ''}). Units committed so far are kept; fix "
                f"the cause and rerun to finish the rest. Ray logs: /tmp/ray/session_latest/logs") from e
        finally:
            pool.kill()
        bar.close()


def _is_user_error(e: BaseException) -> bool:
    return _user_error(e, "") is _unwrap(e)


class _Scheduler:
    """Hands units to actors, ``UNITS_PER_WORKER`` at a time each, and yields ``(unit, result, error)``.

    A unit whose actor died (killed, OOM, node lost) goes back to the queue, up to ``UNIT_ATTEMPTS``
    times; the actor gets no new unit until Ray has restarted it (its ``ready`` answers). An actor
    past its restarts leaves the pool; with none left the job stops with an error. The dead writer's
    temp files are invisible to readers and removed at the end of the job. An exception raised inside
    a unit (a disk full, a bug) fails that unit only, with the reason.

    Every unit has a deadline (``deadline_s``): an actor that holds units and shows no progress for
    that long (no row written, no unit finished; a source read or a forward that hangs) fails the
    unit at the head of its pipeline with a reason, and is killed and replaced by ``replace()`` (a
    fresh actor: a hang must not use up Ray's restarts). Its other units go back to the queue
    untouched. A hang is not retried within the job (it would most likely hang again); the rerun
    redoes the unit like any other that was not committed.
    """

    def __init__(self, actors: list[Any], units: list[str], submit: Any, *, deadline_s: float | None = None,
                 replace: Any = None, deadline_why: str = ""):
        from collections import deque

        if deadline_s is not None and replace is None:
            raise ValueError("a deadline needs replace(): a hung actor is killed, not restarted")
        self.actors, self.submit = actors, submit
        self.deadline_s, self.replace, self.deadline_why = deadline_s, replace, deadline_why
        self.active_at: dict[int, float] = {}  # actor index -> when it last showed progress (deadlines)
        self.queue = deque(units)
        self.load = [0] * len(actors)
        self.running: dict[Any, tuple[int, str]] = {}
        self.recovering: dict[Any, int] = {}  # ready() ref -> actor index, after a death
        self.dead: set[int] = set()
        self.alone: set[int] = set()  # actors running a retried unit, which gets them to itself
        self.pinned: dict[int, list[str]] = {}  # units waiting for their unreachable actor to answer again
        self.since: dict[int, float] = {}  # actor index -> when it was first seen unavailable
        self.attempts: dict[str, int] = {}
        self.progress_refs: dict[int, Any] = {}
        self.live: dict[int, dict[str, list[int]]] = {}

    def _usable(self, i: int) -> bool:
        return i not in self.dead and i not in self.recovering.values()

    def _fill(self) -> None:
        for i, a in enumerate(self.actors):
            queue = self.pinned.get(i) or self.queue  # an actor's pinned units before any other
            while queue and self._usable(i) and i not in self.alone and self.load[i] < UNITS_PER_WORKER:
                u = queue[0]
                if self.attempts.get(u):
                    # A unit that was on a dying actor runs alone on an idle one: if it is the one that
                    # kills actors (an image that exhausts memory), it must not take a neighbour with it.
                    if self.load[i]:
                        break
                    self.alone.add(i)
                queue.pop(0) if isinstance(queue, list) else queue.popleft()
                if not self.load[i]:
                    self.active_at[i] = time.monotonic()  # an idle actor's clock starts with its first unit
                self.running[self.submit(a, u)] = (i, u)
                self.load[i] += 1

    def _poll_progress(self, on_progress: Any) -> None:
        import ray

        for i, a in enumerate(self.actors):
            if i not in self.progress_refs and self.load[i] and self._usable(i):
                self.progress_refs[i] = a.progress.remote()
        if self.progress_refs:
            done, _ = ray.wait(list(self.progress_refs.values()), num_returns=len(self.progress_refs), timeout=0)
            done_set = set(done)
            for i, ref in list(self.progress_refs.items()):
                if ref in done_set:
                    del self.progress_refs[i]
                    try:
                        live = ray.get(ref)
                    except Exception:  # the actor died: its units go back to the queue anyway
                        live = {}
                    if live != self.live.get(i):  # a row written, a unit started: progress
                        self.active_at[i] = time.monotonic()
                    self.live[i] = live
        on_progress({u: c for d in self.live.values() for u, c in d.items()})

    def _actor_died(self, i: int) -> None:
        if i in self.dead or i in self.recovering.values():
            return
        self.live.pop(i, None)
        self.progress_refs.pop(i, None)
        self.recovering[self.actors[i].ready.remote()] = i

    def _gone(self, i: int, why: str) -> None:
        self.dead.add(i)
        log.warning("inference worker %d %s", i, why)
        self.queue.extendleft(reversed(self.pinned.pop(i, [])))  # its process is gone: any actor may redo them

    def _check_recovered(self) -> None:
        import ray

        if not self.recovering:
            return
        from ray.exceptions import ActorUnavailableError

        done, _ = ray.wait(list(self.recovering), num_returns=len(self.recovering), timeout=0)
        for ref in done:
            i = self.recovering.pop(ref)
            try:
                ray.get(ref)
                self.since.pop(i, None)
            except ActorUnavailableError:
                # Still restarting (the model loads again): ask again shortly, for a while.
                if time.monotonic() - self.since.setdefault(i, time.monotonic()) < RECOVERY_TIMEOUT_S:
                    time.sleep(0.2)
                    self.recovering[self.actors[i].ready.remote()] = i
                    continue
                self._gone(i, f"did not come back within {RECOVERY_TIMEOUT_S} s")
            except Exception as e:
                self._gone(i, f"is gone for good ({type(_unwrap(e)).__name__})")
        if len(self.dead) == len(self.actors):
            raise ExtractError(f"every inference worker died (each was restarted {WORKER_RESTARTS} times); "
                               "see the Ray logs (/tmp/ray/session_latest/logs) for why, e.g. out of memory")

    def _overdue(self) -> list[tuple[str, str]]:
        """Fail the head unit of every actor past its deadline, replace the actor -> [(unit, reason)]."""
        import ray

        if self.deadline_s is None:
            return []
        now, failed = time.monotonic(), []
        for i in range(len(self.actors)):
            if not self.load[i] or not self._usable(i) or now - self.active_at.get(i, now) <= self.deadline_s:
                continue
            mine = [(ref, u) for ref, (j, u) in self.running.items() if j == i]
            if ray.wait([ref for ref, _ in mine], num_returns=1, timeout=0)[0]:
                self.active_at[i] = now  # a unit just finished: collected on the next turn
                continue
            # The head: the oldest unit the actor reports (its reader and engine take units in order),
            # else the oldest handed to it.
            names = [u for _, u in mine]
            head = next((u for u in self.live.get(i, {}) if u in names), names[0])
            for ref, u in mine:
                del self.running[ref]
                if u != head:
                    self.queue.appendleft(u)
            self.load[i] = 0
            self.alone.discard(i)
            self.live.pop(i, None)
            self.progress_refs.pop(i, None)
            self.active_at.pop(i, None)
            self.since.pop(i, None)
            old = self.actors[i]
            ray.kill(old, no_restart=True)  # ends a read blocked in the kernel too; frees the unit's lock
            self.queue.extendleft(reversed(self.pinned.pop(i, [])))
            self.actors[i] = self.replace()
            self.recovering[self.actors[i].ready.remote()] = i
            log.warning("unit %s: no progress for %g s; inference worker %d replaced", head, self.deadline_s, i)
            failed.append((head, f"deadline passed: no progress for {self.deadline_s:g} s{self.deadline_why} (a "
                                 "source read or forward that hangs); its worker was replaced; rerun to retry"))
        return failed

    def results(self, on_progress: Any) -> Any:
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        self._fill()
        # Units still queued with nothing running or recovering would mean no actor is usable: every one
        # is dead, which _check_recovered raises; a usable idle actor always takes a queued unit (_fill).
        while self.running or ((self.queue or any(self.pinned.values())) and self.recovering):
            waits = list(self.running) + list(self.recovering)
            done, _ = ray.wait(waits, num_returns=1, timeout=PROGRESS_EVERY_S)
            for ref in done:
                if ref not in self.running:
                    continue  # a recovery: handled below
                i, u = self.running.pop(ref)
                self.load[i] -= 1
                self.active_at[i] = time.monotonic()
                self.alone.discard(i)
                self.live.get(i, {}).pop(u, None)
                try:
                    res = ray.get(ref)
                except RayActorError as e:
                    self._actor_died(i)
                    self.attempts[u] = self.attempts.get(u, 0) + 1
                    if self.attempts[u] < UNIT_ATTEMPTS:
                        log.warning("unit %s: inference worker lost (%s); handing the unit out again (attempt %d "
                                    "of %d)", u, type(e).__name__, self.attempts[u] + 1, UNIT_ATTEMPTS)
                        if isinstance(e, ActorUnavailableError):
                            # Unreachable is not surely dead: its run of the unit may still be going. The
                            # unit goes back to the same actor, which joins a run still in progress, so
                            # two processes never write one unit.
                            self.pinned.setdefault(i, []).append(u)
                        else:
                            self.queue.appendleft(u)
                        continue
                    yield u, None, f"inference worker died {self.attempts[u]} times on this unit ({type(e).__name__})"
                except Exception as e:
                    cause = _unwrap(e)
                    if isinstance(cause, KeyboardInterrupt):
                        raise
                    text = str(cause).strip()
                    yield u, None, f"{type(cause).__name__}: {text.splitlines()[-1] if text else ''}"[:400]
                else:
                    yield u, res, None
            self._poll_progress(on_progress)
            yield from ((u, None, why) for u, why in self._overdue())
            self._check_recovered()
            self._fill()


def run_plan(plan: ExtractPlan) -> dict[str, Any]:
    import ray

    from astrea.shards import Store

    cfg = plan.config
    t0 = time.monotonic()
    with ray_session(cfg) as mode:
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
            # The decode tasks would wait forever for a CPU: say so instead of hanging.
            raise ExtractError(
                f"{workers} worker(s) x --cpus-per-worker {cfg.cpus_per_worker:g} + one decode task "
                f"(--cpus-per-task {cfg.cpus_per_task:g}) need {need:g} CPUs, the Ray "
                f"cluster has {cpus:g}; lower --workers / --cpus-per-worker / --cpus-per-task"
                + ("" if cfg.address else " or raise --num-cpus"))
        nodes = len([n for n in ray.nodes() if n.get("Alive")])
        single_node = nodes == 1 and not ray.util.client.ray.is_connected()
        runtime = {"device": device, "num_gpus": num_gpus, "workers": workers, "ray": mode, "nodes": nodes,
                   "single_node": single_node}
        store = Store(plan.store)
        done: dict[str, ExpertJob] = {}
        reports = []
        jobs = [ExpertJob(plan, store, ecfg, done=done, runtime=runtime)
                for ecfg in cfg.expert_configs(plan.experts, device, compute_dtype)]
        # A missing prerequisite stops the job before any expert runs, not after the first ones.
        for i, job in enumerate(jobs):
            job.prerequisites(later=frozenset(j.name for j in jobs[:i]))
        for job in jobs:
            reports.append(job.run())
            done[job.name] = job
    secs = time.monotonic() - t0
    ok = sum(r["images_ok"] for r in reports)
    failed = sum(r["images_failed"] for r in reports)
    return {
        "dataset": plan.dataset, "store": str(plan.store), "data": str(cfg.data), "shards": plan.shards,
        "ray": runtime["ray"], "nodes": runtime["nodes"], "device": device, "workers": workers,
        "experts": reports, "images_ok": ok, "images_failed": failed,
        "bytes_written": sum(r["bytes_written"] for r in reports), "seconds": round(secs, 3),
        "images_per_s": round((ok + failed) / secs, 3) if secs > 0 else 0.0,
        "status": "incomplete" if any(r["status"] == "incomplete" or r.get("store_errors") for r in reports) else (
            "nothing to do" if all(r["status"] == "nothing to do" for r in reports) else "done"),
    }
