"""The inference actor's threads (reader -> engine -> writer), driven in-process without Ray: the class is
a plain object, and with ``decode_in_tasks=False`` it decodes in its engine thread instead of Ray tasks.

What the end-to-end tests (test_run.py) cannot reach cheaply: a failure in one thread fails that unit
only, and the actor goes on with the next one.
"""

from __future__ import annotations

import io
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from astrea.extract.experts.registry import ExpertConfig, default_variant
from astrea.extract.worker import UnitWorker, _UnitJob
from astrea.shards import Store

PER_SHARD, BATCH = 5, 2


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _sample(key: str) -> dict:
    """A window sample as the reader makes it (image bytes already handed to decoding)."""
    return {"key": key, "error": None, "caption": None, "labels": {}, "prompts": None}


def _shard(root: Path, name: str, first: int) -> None:
    rng = np.random.default_rng(first)
    with tarfile.open(root / f"{name}.tar", "w") as tar:
        for i in range(first, first + PER_SHARD):
            png = _png(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
            for member, data in ((f"{i:06d}.png", png), (f"{i:06d}.txt", f"image {i}".encode())):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture()
def worker(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for s in range(3):
        _shard(src, f"{s:05d}", s * PER_SHARD)
    cfg = ExpertConfig("siglip", arch=default_variant("siglip", True), grid=2)
    fp = cfg.build({}).spec.fingerprint()
    w = UnitWorker(cfg.__dict__.copy(), {}, fp, "cpu", store_root=str(tmp_path / "store"), dataset="toy",
                   data=str(src), source_format="webdataset", batch_size=BATCH, cpus_per_task=1.0,
                   decode_in_tasks=False, inflight=2, threads=1)
    return w


def _start(w: UnitWorker, unit: str) -> tuple[threading.Thread, dict]:
    """``run_unit`` in a thread of its own; its result (or exception) lands in the returned dict."""
    out: dict = {}

    def call() -> None:
        try:
            out["result"] = w.run_unit(unit, {}, [], True)
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=call, daemon=True)
    t.start()
    return t, out


def _run(w: UnitWorker, unit: str) -> dict:
    """``run_unit`` with a deadline: a unit whose future is never set would otherwise hang the suite."""
    t, out = _start(w, unit)
    t.join(120)
    assert out, f"unit {unit}: run_unit did not return"
    if "error" in out:
        raise out["error"]
    return out["result"]


def _write_unit(w: UnitWorker, unit: str, samples: list[dict], results: list) -> dict:
    """One window of forward results written and committed as ``unit`` by the writer thread's code."""
    from astrea.extract.pipeline import Window

    job = _UnitJob(w, unit, {}, None, True)
    job.writer = w.edir.open_unit(unit)
    job.write_window(Window(0, samples), results)
    job.finish()
    return job.future.result(10)


def test_units_are_written_in_source_order_and_committed(worker):
    results = {}
    threads = [threading.Thread(target=lambda u=u: results.update({u: _run(worker, u)})) for u in ("00000", "00001")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert {u: r["status"] for u, r in results.items()} == {"00000": "committed", "00001": "committed"}
    assert all(r["ok"] == PER_SHARD and r["failed"] == 0 for r in results.values())
    assert all(set(r["seconds"]) == {"wait_read", "wait_decode", "forward", "wait_write"} and r["seconds"]["forward"] > 0
               for r in results.values())
    edir = worker.edir
    assert [row["key"] for row in edir.read_index("00001").to_pylist()] == [f"{i:06d}" for i in range(5, 10)]
    assert _run(worker, "00000")["status"] == "skipped"  # committed units are never written twice


def test_a_reader_failure_fails_that_unit_only(worker, monkeypatch):
    real, calls = _UnitJob.next_window, {"00001": 0}

    def broken(self):
        if self.unit in calls:
            calls[self.unit] += 1
            if calls[self.unit] == 2:  # after one window went to the engine
                raise RuntimeError("a bug in reading")
        return real(self)

    monkeypatch.setattr(_UnitJob, "next_window", broken)
    with pytest.raises(RuntimeError, match="a bug in reading"):
        _run(worker, "00001")
    assert not worker.edir.is_committed("00001")
    assert not list(worker.edir.temp_files())  # the aborted unit left nothing behind
    assert worker._slots._value == worker.inflight  # every read-ahead slot came back
    assert _run(worker, "00002")["status"] == "committed"  # the actor goes on
    assert all(t.is_alive() for t in worker._threads)


def test_an_engine_failure_skips_the_rest_of_that_unit_only(worker, monkeypatch):
    real, seen = UnitWorker.forward_window, []

    def broken(self, samples, decoded):
        seen.append(samples[0]["key"])
        if samples[0]["key"] == "000000":
            raise RuntimeError("a bug in the forward path")
        return real(self, samples, decoded)

    monkeypatch.setattr(UnitWorker, "forward_window", broken)
    with pytest.raises(RuntimeError, match="a bug in the forward path"):
        _run(worker, "00000")
    assert seen == ["000000"]  # the unit's other windows were dropped, not computed
    assert worker._slots._value == worker.inflight
    assert not worker.edir.is_committed("00000") and not list(worker.edir.temp_files())
    assert _run(worker, "00001")["status"] == "committed"


def test_a_writer_failure_fails_that_unit_only(worker, monkeypatch):
    real = _UnitJob.write_window

    def full_disk(self, win, results):
        if self.unit == "00000":
            raise OSError(28, "No space left on device")
        return real(self, win, results)

    monkeypatch.setattr(_UnitJob, "write_window", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _run(worker, "00000")
    assert not worker.edir.is_committed("00000")
    assert _run(worker, "00001")["status"] == "committed"
    assert Store(worker.store_root).expert_dir("toy", worker.spec).committed_units() == ["00001"]


def test_a_truncated_source_shard_is_not_committed(worker):
    """Committing what was read would mark the unit finished with keys missing (a tar without
    img2dataset's parquet does not even know them): the unit is reported not written and the next run
    retries it."""
    tar = Path(worker.data) / "00001.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    res = _run(worker, "00001")
    assert res["status"] == "failed" and "source shard unreadable" in res["reason"] and "truncated tar" in res["reason"]
    assert not worker.edir.is_committed("00001") and not list(worker.edir.temp_files())
    tar.write_bytes(data)  # repaired: the next run writes it whole
    res = _run(worker, "00001")
    assert res["status"] == "committed" and res["ok"] == PER_SHARD


def test_a_key_the_store_refuses_counts_as_invalid_key_in_the_report_and_in_the_stats(worker):
    """The sources already give repeated keys stand-ins; a key that still reaches the writer twice goes
    under the actor's own stand-in, and counts as `invalid key` in the actor's report and in the unit's
    stats alike, also when its image failed too."""
    from astrea.extract.pipeline import decode_window

    samples = [_sample("a") for _ in range(3)]
    decoded = decode_window([_png(np.zeros((48, 64, 3), np.uint8))] * 3, worker.expert.preprocess)
    results = worker.forward_window(samples, decoded)
    results[2] = "undecodable: not an image"
    res = _write_unit(worker, "00008", samples, results)
    assert res["status"] == "committed" and res["ok"] == 1 and res["reasons"] == {"invalid key": 2}
    stats = worker.edir.stats("00008")
    assert stats["failures_by_reason"] == {"invalid key": 2} == stats["extra"]["extract"]["failures_by_reason"]
    rows = worker.edir.read_index("00008").to_pylist()
    assert [r["key"] for r in rows] == ["a", "invalid-key-000001", "invalid-key-000002"]
    assert "undecodable" in rows[2]["error"]  # the first failure is kept in the reason


def test_a_window_the_forward_refuses_is_redone_image_by_image(worker, monkeypatch):
    """One image the model cannot take (or a batch too big for memory) must not fail its window's other
    keys: the window is redone image by image and only the guilty key fails, with the reason."""
    import torch

    from astrea.extract.experts.base import ExpertOutput
    from astrea.extract.pipeline import decode_window

    rng = np.random.default_rng(7)
    images = [_png(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)), _png(np.full((48, 64, 3), 90, np.uint8)),
              _png(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))]
    real, calls = worker.expert.forward, []

    def refuses_constant_images(x, prompts=None):
        calls.append(len(x))
        if any(float(t.flatten(1).std(1).max()) == 0.0 for t in x):
            raise ValueError("cannot take a constant image")
        return real(x, prompts)

    monkeypatch.setattr(worker.expert, "forward", refuses_constant_images)
    samples = [_sample(f"k{i}") for i in range(3)]
    decoded = decode_window(images, worker.expert.preprocess)
    results = worker.forward_window(samples, decoded)
    assert calls == [3, 1, 1, 1]
    assert results[1] == "forward failed: ValueError: cannot take a constant image"
    for i in (0, 2):  # the others got exactly what a forward of them alone gives
        assert isinstance(results[i], ExpertOutput)
        alone = real(torch.from_numpy(decoded[i][0][None]))[0]
        np.testing.assert_allclose(np.asarray(results[i].tokens), np.asarray(alone.tokens), rtol=1e-4, atol=1e-5)

    res = _write_unit(worker, "00009", samples, results)
    assert res["status"] == "committed" and res["ok"] == 2 and res["reasons"] == {"forward failed": 1}
    rows = worker.edir.read_index("00009").to_pylist()
    assert [r["error"] for r in rows] == [None, "forward failed: ValueError: cannot take a constant image", None]


def _hold_unit(edir, unit: str):
    """Another process writing ``unit`` (a writer of a killed job that is still going away), until the
    returned process is given a line on stdin (then it aborts and exits) or killed."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys
        from astrea.shards.store import ExpertDir
        w = ExpertDir.open(sys.argv[1]).open_unit(sys.argv[2])
        print("open", flush=True)
        sys.stdin.readline()
        w.abort()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code, str(edir.path), unit], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "open"
    return proc


def test_a_unit_another_live_process_writes_is_waited_for_then_written(worker):
    holder = _hold_unit(worker.edir, "00000")
    try:
        assert [p.name for p in worker.edir.temp_files()]  # the other writer's temp is there
        t, out = _start(worker, "00000")
        t.join(2.0)
        assert t.is_alive() and not worker.edir.is_committed("00000")  # waiting, not writing beside it
        holder.communicate("go\n", timeout=30)  # the other writer goes away
        t.join(120)
    finally:
        holder.kill()
        holder.wait(30)
    assert out["result"]["status"] == "committed" and out["result"]["ok"] == PER_SHARD


def test_a_unit_held_past_the_wait_fails_that_unit_only(worker, monkeypatch):
    from astrea.extract import worker as worker_mod
    from astrea.shards.errors import UnitBusyError

    monkeypatch.setattr(worker_mod, "UNIT_BUSY_WAIT_S", 1.0)
    holder = _hold_unit(worker.edir, "00000")
    try:
        with pytest.raises(UnitBusyError, match="being written by process"):
            _run(worker, "00000")
        assert len(list(worker.edir.temp_files())) == 1  # the other process's temp is left alone
        assert _run(worker, "00001")["status"] == "committed"
    finally:
        holder.kill()
        holder.wait(30)
    assert worker._slots._value == worker.inflight


def test_a_unit_handed_again_to_the_actor_still_running_it_joins_that_run(worker, monkeypatch):
    """The driver hands a unit back to the same actor when it lost contact with it (unreachable is not
    surely dead): the second call waits for the run in progress instead of writing the unit twice."""
    entered, release = threading.Event(), threading.Event()
    real = UnitWorker.forward_window

    def held(self, samples, decoded):  # the run stays in progress until both calls are in
        entered.set()
        release.wait(60)
        return real(self, samples, decoded)

    monkeypatch.setattr(UnitWorker, "forward_window", held)
    first, a = _start(worker, "00001")
    assert entered.wait(60)
    second, b = _start(worker, "00001")
    second.join(1.0)  # the second call is in run_unit, waiting on the same job
    assert second.is_alive() and len(worker._jobs) == 1
    release.set()
    first.join(120)
    second.join(120)
    assert a["result"]["status"] == b["result"]["status"] == "committed"
    assert a["result"] == b["result"]  # one run, two answers
    assert [row["key"] for row in worker.edir.read_index("00001").to_pylist()] == [f"{i:06d}" for i in range(5, 10)]


def test_outputs_are_encoded_once_and_stored_as_the_writer_would_encode_them(worker):
    """The actor validates each key's outputs by encoding them and hands the writer that text: the stored
    row (text and checksum) is what the writer makes of the plain dict. Outputs that are not strict JSON
    fail that key only, as a bad expert output."""
    from astrea.extract.experts.base import ExpertOutput
    from astrea.extract.worker import prepare_output
    from astrea.schemas.unit import OutputsJSON

    spec = worker.spec
    tokens = np.ones((spec.grid * spec.grid, spec.token_dim), np.float32)
    pooled = np.ones(spec.pooled_dim, np.float32)
    outputs = {"scores": [0.5, 0.25], "boxes": [(0.0, 0.1, 0.5, 0.9)], "labels": ["a cat"]}
    t, p, out, _ = prepare_output(spec, ExpertOutput(tokens=tokens, pooled=pooled, outputs=outputs), False)
    assert isinstance(out, OutputsJSON)  # the writer stores this text as is
    with pytest.raises(ValueError, match="strict JSON"):
        prepare_output(spec, ExpertOutput(tokens=tokens, pooled=pooled, outputs={"scores": [float("nan")]}), False)
    for unit, given in (("00010", out), ("00011", outputs)):
        w = worker.edir.open_unit(unit)
        w.add("k", t, p, given)
        w.commit()
    a, b = (worker.edir.read_index(u).to_pylist()[0] for u in ("00010", "00011"))
    assert a["checksum"] == b["checksum"]
    assert [s[2] for _, s in worker.edir.iter_stored("00010")] == [s[2] for _, s in worker.edir.iter_stored("00011")]

    samples = [_sample("bad")]
    res = _write_unit(worker, "00012", samples, [ExpertOutput(tokens=tokens, pooled=pooled, outputs={"x": np.float32(1)})])
    assert res["reasons"] == {"bad expert output": 1} and res["ok"] == 0
