"""The extraction job end to end: Ray (local, 2 CPUs, started once for the module), real experts at
their small sizes with random weights, the real store, an img2dataset-format source with bad members.

One `--expert all` run is shared by most tests (starting four expert actor pools is the expensive
part); the kill/resume test compares its own interrupted-then-resumed store with that run's bytes.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from astrea.extract import ExtractConfig, ExtractConfigError, ExtractError, run  # noqa: E402
from astrea.extract.config import parse_keyed, parse_options, select_shards  # noqa: E402

GOOD_SHARDS = ["00000", "00001", "00002", "00003"]
BAD_SHARD = "00004"
PER_SHARD = 4
BATCH = 2


# -- fixtures -------------------------------------------------------------------------------------
def _image_bytes(rng: np.random.Generator, i: int) -> tuple[bytes, str]:
    from PIL import Image

    h, w = int(rng.integers(40, 130)), int(rng.integers(40, 130))
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    if i % 3 == 1:  # grayscale PNG: converted to RGB by the shared decoder
        Image.fromarray(arr[..., 0]).save(buf, format="PNG")
        return buf.getvalue(), "png"
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue(), "jpg"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def _write_shard(root: Path, shard: str, members: list[tuple[str, bytes]], keys: list[tuple[str, str | None]]) -> None:
    """An img2dataset-style shard: NNNNN.tar (key.jpg/.txt/.json), NNNNN.parquet, NNNNN_stats.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tarfile.open(root / f"{shard}.tar", "w") as tar:
        for name, data in members:
            _add(tar, name, data)
    pq.write_table(pa.table({
        "key": [k for k, _ in keys], "caption": [c for _, c in keys],
        "url": [f"file:///images/{k}.jpg" for k, _ in keys],
        "status": ["success"] * len(keys), "error_message": [None] * len(keys),
    }), root / f"{shard}.parquet")
    (root / f"{shard}_stats.json").write_text(json.dumps({"count": len(keys), "successes": len(keys), "failed_to_download": 0}))


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toyset") / "toyset"
    root.mkdir()
    rng = np.random.default_rng(0)
    n = 0
    for shard in GOOD_SHARDS:
        members, keys = [], []
        for _ in range(PER_SHARD):
            key = f"{n:09d}"
            img, ext = _image_bytes(rng, n)
            members += [(f"{key}.{ext}", img), (f"{key}.txt", f"caption {n}".encode()),
                        (f"{key}.json", json.dumps({"key": key, "caption": f"caption {n}"}).encode())]
            keys.append((key, f"caption {n}"))
            n += 1
        _write_shard(root, shard, members, keys)
    good, _ = _image_bytes(rng, 0)
    bad = [
        (f"{n:09d}", [(f"{n:09d}.jpg", good), (f"{n:09d}.txt", b"a good one")]),
        (f"{n + 1:09d}", [(f"{n + 1:09d}.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg"), (f"{n + 1:09d}.txt", b"corrupt")]),
        (f"{n + 2:09d}", [(f"{n + 2:09d}.jpg", b""), (f"{n + 2:09d}.txt", b"zero bytes")]),
        (f"{n + 3:09d}", [(f"{n + 3:09d}.txt", b"a caption without an image")]),
        (f"{n + 4:09d}", [(f"{n + 4:09d}.jpg", good[: len(good) // 3]), (f"{n + 4:09d}.txt", b"truncated")]),
        ("../evil", [("../evil.jpg", good), ("../evil.txt", b"odd member name")]),
    ]
    _write_shard(root, BAD_SHARD, [m for _, ms in bad for m in ms], [(k, None) for k, _ in bad])
    return root


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


def _cfg(source: Path, store: Path, experts: list[str], **kw) -> ExtractConfig:
    return ExtractConfig(experts=experts, data=str(source), store=str(store), small=True, weights={"*": "random"},
                         batch_size=BATCH, progress=False, **kw)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, source_dir, ray_cluster):
    store = tmp_path_factory.mktemp("store_all") / "store"
    report = run(_cfg(source_dir, store, ["all"]))
    return store, report


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _unit_content(edir, unit: str) -> list[tuple]:
    """Everything a reader sees of a unit: index rows and raw array bytes (timing lives only in stats)."""
    rows = edir.read_index(unit).to_pylist()
    arrays = [(row["key"], None if s is None else (s[0].tobytes(), s[1].tobytes(), s[2]))
              for row, s in edir.iter_stored(unit)]
    return [json.dumps(rows, sort_keys=True, default=str), arrays]


# -- the job --------------------------------------------------------------------------------------
def test_all_experts_fill_the_store_and_it_verifies(extracted, source_dir):
    from astrea.shards import Store
    from astrea.shards.audit import verify

    store_root, report = extracted
    assert report["status"] == "done"
    assert [r["expert"] for r in report["experts"]] == ["siglip", "ram_plus", "grounding_dino", "sam2"]
    store = Store(store_root)
    dataset = report["dataset"]
    for r in report["experts"]:
        assert r["random_weights"] is True
        assert sorted(r["units_committed"]) == [*GOOD_SHARDS, BAD_SHARD]
        # + the good one of the bad shard, + '../evil' when the source sanitises its name (else it fails
        # as an invalid key, recorded under a stand-in key)
        assert len(GOOD_SHARDS) * PER_SHARD + 1 <= r["images_ok"] <= len(GOOD_SHARDS) * PER_SHARD + 2
        edir = store.resolve(dataset, f"{r['expert']}@{r['fingerprint']}")
        for u in GOOD_SHARDS:
            st = edir.stats(u)
            assert (st["images"], st["ok"], st["failed"]) == (PER_SHARD, PER_SHARD, 0)
        bad = edir.stats(BAD_SHARD)
        assert bad["failed"] >= 4 and bad["images"] in (5, 6), bad  # corrupt, zero-byte, caption-only, truncated
        # The job's report sits beside the units and says the weights were random.
        saved = json.loads((edir.path / "extract_report.json").read_text())
        assert saved["random_weights"] is True and saved["fingerprint"] == r["fingerprint"]
    rep = verify(store, dataset)
    assert rep.ok, rep.to_dict()
    assert rep.units_checked == 4 * 5
    # Nothing escaped the store through the '../evil' member name.
    assert not (source_dir.parent / "evil.jpg").exists() and not (store_root.parent / "evil.jpg").exists()
    assert not any(p.name.startswith("evil") for p in store_root.parent.iterdir())


def test_dependent_experts_are_prompted_by_stored_predictions(extracted):
    from astrea.shards import Store

    store_root, report = extracted
    by = {r["expert"]: r for r in report["experts"]}
    store = Store(store_root)
    gd = store.resolve(report["dataset"], f"grounding_dino@{by['grounding_dino']['fingerprint']}")
    sam = store.resolve(report["dataset"], f"sam2@{by['sam2']['fingerprint']}")
    # The prerequisite's fingerprint is part of the dependent spec: new tags -> new detector directory.
    assert gd.spec.prerequisites == {"ram_plus": by["ram_plus"]["fingerprint"]}
    assert sam.spec.prerequisites == {"grounding_dino": by["grounding_dino"]["fingerprint"]}
    ram = store.resolve(report["dataset"], f"ram_plus@{by['ram_plus']['fingerprint']}")
    tags = {r.key: r.outputs for r in ram.iter_unit("00000", include_failed=False)}
    dets = {r.key: r.outputs for r in gd.iter_unit("00000", include_failed=False)}
    assert tags.keys() == dets.keys() and all("tags" in v for v in tags.values())
    assert all(set(d) >= {"boxes", "labels", "scores"} for d in dets.values())


def test_failures_are_recorded_per_key_with_reasons(extracted):
    from astrea.shards import Store

    store_root, report = extracted
    siglip = report["experts"][0]
    edir = Store(store_root).resolve(report["dataset"], f"siglip@{siglip['fingerprint']}")
    failed = {r.key: r.error for r in edir.iter_unit(BAD_SHARD) if r.status != "ok"}
    reasons = " | ".join(failed.values())
    assert "empty file" in reasons or "empty" in reasons, failed
    assert "missing image" in reasons or "no image" in reasons, failed
    assert "undecodable" in reasons, failed
    assert siglip["failures_by_reason"] and sum(siglip["failures_by_reason"].values()) == siglip["images_failed"]


def test_rerun_of_a_finished_job_does_nothing(extracted, source_dir):
    store_root, _ = extracted
    before = _snapshot(store_root)
    report = run(_cfg(source_dir, store_root, ["all"]))
    assert report["status"] == "nothing to do"
    assert all(r["status"] == "nothing to do" and not r["units_committed"] for r in report["experts"])
    assert _snapshot(store_root) == before


def test_missing_prerequisite_is_a_clear_error(tmp_path, source_dir, ray_cluster):
    with pytest.raises(ExtractError, match=r"grounding_dino.*--without-prerequisites"):
        run(_cfg(source_dir, tmp_path / "store", ["sam2"]))
    # ... and an explicit prerequisite that the store does not hold is named too.
    with pytest.raises(ExtractError, match="ram_plus"):
        run(_cfg(source_dir, tmp_path / "store", ["grounding_dino"], prerequisites={"ram_plus": "ram_plus@abc"}))
    # The check comes before any work: siglip, first in stage order, is not extracted either.
    with pytest.raises(ExtractError, match=r"grounding_dino.*ram_plus"):
        run(_cfg(source_dir, tmp_path / "store", ["siglip", "grounding_dino"]))
    assert not list((tmp_path / "store").rglob("*_stats.json"))


@pytest.mark.parametrize("kill_points", [(1,), pytest.param((0, 1, 2), marks=pytest.mark.slow)], ids=["after1", "after0-1-2"])
def test_kill_and_resume_gives_the_uninterrupted_bytes(tmp_path, source_dir, extracted, ray_cluster, kill_points):
    """SIGKILL the job (a separate driver process on the module's cluster) before its first commit (0)
    or once N more units are committed; each rerun does only what is missing (waiting for a unit that an
    actor of the killed job still holds); the end result is
    identical to the uninterrupted run's siglip units (keys, index rows, array bytes). The default
    suite kills once (each kill costs a driver start); `-m slow` kills at three points in a row."""
    from astrea.shards import Store

    ref_root, ref_report = extracted
    siglip_fp = ref_report["experts"][0]["fingerprint"]
    ref = Store(ref_root).resolve(ref_report["dataset"], f"siglip@{siglip_fp}")
    store_root = tmp_path / "store"
    cmd = [sys.executable, "-c", "from astrea.cli import main; main()", "extract", "--expert", "siglip",
           "--data", str(source_dir), "--store", str(store_root), "--small", "--weights", "random",
           "--batch-size", str(BATCH), "--address", ray_cluster, "--no-progress"]
    edir_path = store_root / ref_report["dataset"] / f"siglip@{siglip_fp}"

    def committed() -> int:
        return len(list(edir_path.glob("*_stats.json"))) if edir_path.is_dir() else 0

    kills = []
    for after in kill_points:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        start = committed()
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if (after == 0 and edir_path.is_dir()) or (after > 0 and committed() >= start + after):
                break
            time.sleep(0.01)
        landed = proc.poll() is None
        if landed:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append((landed, committed()))
    # Every kill hit a running job. (Units the job's actors were writing may still be committed after
    # the driver is gone, before Ray reaps them: they are whole units, and the rerun skips them.)
    assert all(landed for landed, _ in kills), f"the kills should land before the job finishes: {kills}"
    final = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stdout + final.stderr
    got = Store(store_root).resolve(ref_report["dataset"], f"siglip@{siglip_fp}")
    assert not got.temp_files() and got.committed_units() == ref.committed_units()
    for u in ref.committed_units():
        assert _unit_content(got, u) == _unit_content(ref, u), u
    # and one more rerun is a no-op
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout + again.stderr


# -- config ---------------------------------------------------------------------------------------
def test_config_errors_name_the_field(tmp_path, source_dir):
    from astrea.registry import UnknownNameError

    with pytest.raises(UnknownNameError, match="sam3"):
        ExtractConfig(experts=["sam3"], data=str(source_dir)).validate()
    with pytest.raises(ExtractConfigError, match="batch_size"):
        ExtractConfig(experts=["siglip"], data=str(source_dir), batch_size=0).validate()
    with pytest.raises(ExtractConfigError, match="format"):
        ExtractConfig(experts=["siglip"], data=str(source_dir), format="npz").validate()
    with pytest.raises(ExtractConfigError, match="weights: 'sam2' is not one of the experts"):
        ExtractConfig(experts=["siglip"], data=str(source_dir), weights={"sam2": "random"}).validate()
    with pytest.raises(UnknownNameError, match="siglip arch"):
        ExtractConfig(experts=["siglip"], data=str(source_dir), arch={"siglip": "vit_huge"}).validate()
    with pytest.raises(ExtractConfigError, match="device"):
        ExtractConfig(experts=["siglip"], data=str(source_dir), device="tpu").validate()
    with pytest.raises(ExtractConfigError, match="image_timeout_s"):
        ExtractConfig(experts=["siglip"], data=str(source_dir), image_timeout_s=0).validate()
    assert ExtractConfig(experts=["sam2", "siglip", "all"], data="x").expert_names() == [
        "siglip", "ram_plus", "grounding_dino", "sam2"]


def test_cli_value_parsing():
    names = ["siglip", "sam2"]
    assert parse_keyed(["random", "sam2=/w/s.pt"], field_name="--weights", experts=names) == {"*": "random", "sam2": "/w/s.pt"}
    # '=' inside a path or hub id that is not EXPERT=... stays a global value
    assert parse_keyed(["/data/a=b.pt"], field_name="--weights", experts=names) == {"*": "/data/a=b.pt"}
    with pytest.raises(ExtractConfigError, match="twice"):
        parse_keyed(["random", "hub/x"], field_name="--weights", experts=names)
    assert parse_options(["sam2.points_per_side=8", "sam2.name=x"], experts=names) == {
        "sam2": {"points_per_side": 8, "name": "x"}}
    with pytest.raises(ExtractConfigError, match="EXPERT.KEY=VALUE"):
        parse_options(["points=8"], experts=names)
    shards = ["00000", "00001", "00002", "00003", "00010"]
    assert select_shards(shards, "00001,00003-00010") == ["00001", "00003", "00010"]
    with pytest.raises(ExtractConfigError, match="no shard named"):
        select_shards(shards, "00042")


def test_plan_selects_whole_shards_for_limit_and_shards(source_dir):
    plan = ExtractConfig(experts=["siglip"], data=str(source_dir), small=True, limit=5).build()
    assert plan.shards == ["00000", "00001"]  # whole shards until >= 5 images: a unit is never partial
    plan = ExtractConfig(experts=["siglip"], data=str(source_dir), small=True, shards="00001-00002").build()
    assert plan.shards == ["00001", "00002"]
    with pytest.raises(ExtractConfigError, match="data="):
        ExtractConfig(experts=["siglip"], data=str(source_dir / "nope")).build()


def test_dataset_written_by_img2dataset_itself(tmp_path, ray_cluster):
    """issue 4's 'done when': a dataset produced by the real img2dataset (file:// URLs) extracts and verifies."""
    from astrea.shards import Store
    from astrea.shards.audit import verify
    from tests.data.builders import build_img2dataset

    source = build_img2dataset(tmp_path, n=6)
    store = tmp_path / "store"
    report = run(_cfg(source, store, ["siglip", "ram_plus"], dataset="i2d"))
    assert report["status"] == "done"
    assert report["images_ok"] == 2 * 6  # img2dataset's failed URL never reached the tar: nothing to fail
    rep = verify(Store(store))
    assert rep.ok, rep
    keys = [r.key for r in Store(store).resolve("i2d", "siglip").iter_unit("00000")]
    assert len(keys) == 6 and all(k.isdigit() and len(k) == 9 for k in keys)  # img2dataset's own keys


def _two_shards(root: Path) -> Path:
    root.mkdir()
    rng = np.random.default_rng(3)
    for s in range(2):
        members, keys = [], []
        for i in range(24):
            key = f"{s:02d}{i:07d}"
            img, ext = _image_bytes(rng, 3 * i)  # i % 3 == 0: always JPEG
            members += [(f"{key}.{ext}", img), (f"{key}.txt", b"x")]
            keys.append((key, "x"))
        _write_shard(root, f"{s:05d}", members, keys)
    return root


def _run_killing(cfg: ExtractConfig, victim) -> tuple[dict, list[int]]:
    """Run the job while a thread SIGKILLs the first process ``victim()`` names (a pid, or None: not yet)."""
    import threading

    killed: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        while not stop.is_set() and not killed:
            pid = victim()
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:  # it ended between the look and the kill: look again
                    continue
                killed.append(pid)
                return
            time.sleep(0.002)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    try:
        report = run(cfg)
    finally:
        stop.set()
        th.join()
    return report, killed


def _assert_same_units(ref_store: Path, store: Path, dataset: str, expert: str, units: list[str]) -> None:
    from astrea.shards import Store

    a, b = Store(ref_store).resolve(dataset, expert), Store(store).resolve(dataset, expert)
    assert not b.temp_files()
    for u in units:
        assert _unit_content(b, u) == _unit_content(a, u), u


def test_a_decode_worker_killed_mid_task_is_retried_by_ray_and_changes_nothing(tmp_path, ray_cluster):
    """SIGKILL the process running a decode task (Ray titles it ``ray::decode_window`` while it runs):
    Ray runs the task again elsewhere and the store holds exactly the bytes of an undisturbed run."""
    root = _two_shards(tmp_path / "src")
    ref = run(_cfg(root, tmp_path / "ref", ["siglip"]))

    # Only workers of this test's own Ray (children of its raylet): never another job's on a shared machine.
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid

    def decoding() -> int | None:
        for proc in Path("/proc").iterdir():
            try:
                if not proc.name.isdigit() or not (proc / "cmdline").read_bytes().startswith(b"ray::decode_window"):
                    continue
                if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == raylet:
                    return int(proc.name)
            except (OSError, ValueError, IndexError):  # the process ended meanwhile
                continue
        return None

    report, killed = _run_killing(_cfg(root, tmp_path / "store", ["siglip"]), decoding)
    assert killed, "no decode task was seen running: the test did not kill anything"
    r = report["experts"][0]
    assert r["status"] == "done" and r["images_ok"] == ref["experts"][0]["images_ok"] and not r["failures_by_reason"]
    _assert_same_units(tmp_path / "ref", tmp_path / "store", ref["dataset"], "siglip", ["00000", "00001"])


def test_a_worker_killed_mid_unit_is_replaced_and_its_unit_redone(tmp_path, ray_cluster):
    """SIGKILL the inference actor while it writes a unit (its pid is in the temp file's name): Ray
    restarts it, the unit is handed out again, the job ends 'done' with no temp left, and the store
    holds exactly the bytes of an undisturbed run."""
    from astrea.shards.fsutil import parse_temp

    root = _two_shards(tmp_path / "src")
    ref = run(_cfg(root, tmp_path / "ref", ["siglip"]))
    edir = tmp_path / "store" / ref["dataset"] / f"siglip@{ref['experts'][0]['fingerprint']}"

    def writing() -> int | None:
        for p in edir.glob(".*") if edir.is_dir() else []:
            t = parse_temp(p.name)
            if t is not None and t.pid != os.getpid():
                return t.pid
        return None

    report, killed = _run_killing(_cfg(root, tmp_path / "store", ["siglip"]), writing)
    assert killed, "the writer was never seen at work: the test did not kill anything"
    r = report["experts"][0]
    assert r["status"] == "done" and sorted(r["units_committed"]) == ["00000", "00001"], r
    assert r["images_ok"] == 48
    _assert_same_units(tmp_path / "ref", tmp_path / "store", ref["dataset"], "siglip", ["00000", "00001"])


def test_a_damaged_source_shard_is_not_written_exit_1_then_a_rerun_after_repair_writes_it(tmp_path, source_dir, ray_cluster):
    import shutil

    from typer.testing import CliRunner

    from astrea.cli import app

    src = tmp_path / "toyset"
    shutil.copytree(source_dir, src)
    tar = src / "00001.tar"
    whole = tar.read_bytes()
    tar.write_bytes(whole[: len(whole) // 2])
    args = ["extract", "--expert", "siglip", "--data", str(src), "--store", str(tmp_path / "store"), "--small",
            "--weights", "random", "--batch-size", str(BATCH), "--shards", "00000-00001", "--no-progress",
            "--report", str(tmp_path / "report.json")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1, res.output
    assert "1 NOT written" in res.output and "00001: source shard unreadable: truncated tar" in res.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "incomplete" and report["experts"][0]["units_committed"] == ["00000"]
    r = report["experts"][0]
    assert set(r["actor_seconds"]) == {"wait_read", "wait_decode", "forward", "wait_write"}
    assert r["images_per_s_after_load"] > 0 and r["seconds_to_ready"] > 0
    # Issue 14, item 8: a rerun that commits nothing (the shard still damaged) keeps the report of the
    # run that did the work beside the units; its own report goes to --report.
    beside = Path(r["dir"]) / "extract_report.json"
    kept = beside.read_bytes()
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1 and "00001: source shard unreadable" in res.output, res.output
    again = json.loads((tmp_path / "report.json").read_text())["experts"][0]
    assert again["units_committed"] == [] and again["units_skipped"] == ["00000"]
    assert beside.read_bytes() == kept
    tar.write_bytes(whole)  # repaired: the rerun writes only the missing unit
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["experts"][0]["units_committed"] == ["00001"] and report["experts"][0]["units_skipped"] == ["00000"]
    assert json.loads(beside.read_text())["units_committed"] == ["00001"]  # this run did work: its report


def test_more_cpus_than_the_cluster_has_is_refused_before_any_work(tmp_path, source_dir, ray_cluster):
    with pytest.raises(ExtractError, match=r"need 3 CPUs, the Ray cluster has 2"):
        run(_cfg(source_dir, tmp_path / "store", ["siglip"], workers=2, cpus_per_worker=1.0, cpus_per_task=1.0))
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").rglob("*_stats.json"))


class _UnitsActor:
    """The scheduler's view of an inference actor (ready / progress / run_unit), without a model, so the
    scheduler's fault handling runs against real Ray restarts in seconds. A unit named ``poison*`` makes
    the process exit, as an image that exhausts memory would; one named ``hang*`` reads the file of
    that name beside the log (a FIFO: blocks forever); every start is logged with the units already
    running beside it in that process."""

    def __init__(self, log: str):
        import threading

        self.log, self.active, self.lock = log, set(), threading.Lock()

    def ready(self) -> int:
        return os.getpid()

    def progress(self) -> dict:
        return {}

    def run_unit(self, unit: str) -> dict:
        with self.lock:
            first = not os.path.exists(self.log) or all(json.loads(line)["unit"] != unit for line in open(self.log))
            with open(self.log, "a") as f:
                f.write(json.dumps({"unit": unit, "pid": os.getpid(), "beside": sorted(self.active)}) + "\n")
            self.active.add(unit)
        if unit.startswith("hang"):
            # A source read: the file named like the unit beside the log. A FIFO with no writer blocks
            # open() in the kernel forever, as a hung network filesystem would; a regular file reads.
            with open(os.path.join(os.path.dirname(self.log), unit), "rb") as f:
                f.read()
        if unit.startswith("poison"):
            # The first time, strike only once a neighbour runs beside it (the scheduler hands out two
            # units per actor), however slowly this machine starts it.
            deadline = time.monotonic() + 30
            while first and len(self.active) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.1)
            os._exit(1)
        time.sleep(1.0)  # a neighbour is still running when the poison strikes
        with self.lock:
            self.active.discard(unit)
        return {"unit": unit}


def test_a_unit_that_kills_its_actor_is_retried_alone_and_given_up_after_its_attempts(tmp_path, ray_cluster):
    """The unit on a dying actor goes back to the queue; a retried unit runs alone on its actor (a unit
    that kills actors must not take a neighbour with it again); after UNIT_ATTEMPTS deaths it is reported
    failed, and every other unit, its first neighbour included, is done."""
    from astrea.extract.run import UNIT_ATTEMPTS, WORKER_RESTARTS, _Scheduler

    log = tmp_path / "starts.jsonl"
    cls = ray.remote(_UnitsActor).options(num_cpus=0, max_concurrency=4, max_restarts=WORKER_RESTARTS,
                                          max_task_retries=0)
    actors = [cls.remote(str(log)) for _ in range(2)]
    try:
        ray.get([a.ready.remote() for a in actors])
        units = ["a", "poison", "b", "c", "d"]
        out = list(_Scheduler(actors, units, lambda a, u: a.run_unit.remote(u)).results(lambda counts: None))
    finally:
        for a in actors:
            ray.kill(a)
    errors = {u: e for u, _, e in out if e is not None}
    done = sorted(u for u, r, e in out if e is None and r["unit"] == u)
    assert done == ["a", "b", "c", "d"]
    assert list(errors) == ["poison"]
    assert errors["poison"].startswith(f"inference worker died {UNIT_ATTEMPTS} times on this unit")
    starts = [json.loads(line) for line in log.read_text().splitlines()]
    poison = [s for s in starts if s["unit"] == "poison"]
    assert len(poison) == UNIT_ATTEMPTS
    # The first time nobody knew: its neighbour shared the actor, died with it, and was redone.
    neighbours = [s["unit"] for s in starts if s["pid"] == poison[0]["pid"] and s["unit"] != "poison"]
    assert neighbours
    assert all(len([s for s in starts if s["unit"] == u]) == 2 for u in neighbours)
    for p in poison[1:]:  # every retry alone, and nothing joined it in its process while it ran
        assert p["beside"] == []
        assert not any("poison" in s["beside"] for s in starts if s["pid"] == p["pid"])


def test_an_actor_past_its_restarts_leaves_the_pool_and_with_none_left_the_job_stops(tmp_path, ray_cluster):
    from astrea.extract.run import _Scheduler

    cls = ray.remote(_UnitsActor).options(num_cpus=0, max_concurrency=4, max_restarts=1, max_task_retries=0)
    actor = cls.remote(str(tmp_path / "starts.jsonl"))
    ray.get(actor.ready.remote())
    sched = _Scheduler([actor], ["poison", "b"], lambda a, u: a.run_unit.remote(u))
    try:
        with pytest.raises(ExtractError, match="every inference worker died"):
            list(sched.results(lambda counts: None))
    finally:
        ray.kill(actor)
    assert sched.dead == {0}


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_missing_and_damaged_units_are_rewritten_by_a_rerun_with_another_batch_size(tmp_path, source_dir, ray_cluster, fmt):
    """Issue 14, items 3-4: stats present but data gone (MISSING), and a flipped byte marked by
    `verify --repair`: the next extract, with another --batch-size, rewrites both, exit 0, verify clean."""
    import shutil

    from typer.testing import CliRunner

    from astrea.cli import app
    from astrea.shards import Store

    store = tmp_path / "store"
    args = ["extract", "--expert", "siglip", "--data", str(source_dir), "--store", str(store), "--small",
            "--weights", "random", "--shards", "00000-00002", "--no-progress", "--format", fmt]
    res = CliRunner().invoke(app, [*args, "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    (edir,) = Store(store).experts(Store(store).datasets()[0])
    before = {u: [r.key for r in edir.iter_unit(u)] for u in ("00000", "00001", "00002")}
    gone = edir.data_path("00000")
    shutil.rmtree(gone) if gone.is_dir() else gone.unlink()
    damaged = edir.data_path("00001")
    if damaged.is_dir():
        damaged = next(p for p in sorted((damaged / "tokens").rglob("*")) if p.is_file() and p.name != "zarr.json")
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x10
    damaged.write_bytes(bytes(data))
    res = CliRunner().invoke(app, ["shards", "verify", str(store), "--repair"])
    assert res.exit_code == 1 and "MISSING" in res.output and "CORRUPT" in res.output, res.output
    res = CliRunner().invoke(app, [*args, "--batch-size", "3"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["shards", "verify", str(store)])
    assert res.exit_code == 0 and res.output.startswith("OK:"), res.output
    assert {u: [r.key for r in edir.iter_unit(u)] for u in before} == before


def test_failure_reasons_are_deterministic_identical_runs_write_identical_indexes(tmp_path, ray_cluster):
    """Issue 14, item 6: a shard of bad members extracted twice gives byte-identical index parquets
    (reasons used to embed object addresses: PIL's ``cannot identify image file <_io.BytesIO object at 0x...>``)."""
    from astrea.shards import Store

    src = tmp_path / "bad"
    src.mkdir()
    rng = np.random.default_rng(1)
    good, _ = _image_bytes(rng, 0)
    members = [("000000000.jpg", good), ("000000001.jpg", b"plain text, not an image" * 8),
               ("000000002.png", b"\x89PNG\r\n\x1a\n" + bytes(40)), ("000000003.jpg", good[: len(good) // 4]),
               ("000000004.jpg", b"GIF89a" + bytes(30))]
    _write_shard(src, "00000", members, [(m.split(".")[0], None) for m, _ in members])
    indexes = []
    for i in range(2):
        store = tmp_path / f"store{i}"
        run(_cfg(src, store, ["siglip"]))
        (edir,) = Store(store).experts(Store(store).datasets()[0])
        indexes.append(edir.index_path("00000").read_bytes())
        errors = [r.error for r in edir.iter_unit("00000") if r.error]
        assert len(errors) == 4 and any("UnidentifiedImageError" in e for e in errors), errors
        assert not [e for e in errors if "0x" in e], errors
    assert indexes[0] == indexes[1]


def test_store_turning_read_only_mid_job_keeps_the_summary(tmp_path, source_dir, ray_cluster, monkeypatch):
    """Issue 14, item 7: the store's filesystem goes read-only after the units are written: the job
    still prints its summary, names what it could not write (the report), and exits 1, no traceback."""
    from typer.testing import CliRunner

    from astrea.cli import app
    import importlib

    run_mod = importlib.import_module("astrea.extract.run")

    src, mnt = tmp_path / "disk", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    if subprocess.run(["mount", "--bind", str(src), str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot bind-mount here (needs root with mount rights)")
    real = run_mod.ExpertJob._stream

    def stream_then_read_only(self, *a, **kw):  # the disk fails right after the last unit is committed
        real(self, *a, **kw)
        assert subprocess.run(["mount", "-o", "remount,bind,ro", str(mnt)], capture_output=True).returncode == 0

    monkeypatch.setattr(run_mod.ExpertJob, "_stream", stream_then_read_only)
    try:
        res = CliRunner().invoke(app, ["extract", "--expert", "siglip", "--data", str(source_dir), "--store",
                                       str(mnt / "store"), "--small", "--weights", "random", "--shards", "00000",
                                       "--batch-size", str(BATCH), "--no-progress"])
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and "units: 1 committed" in res.output, res.output
    assert "STORE ERROR: extract_report.json not written: Read-only file system" in res.output, res.output


def test_a_unit_that_hangs_fails_at_its_deadline_its_worker_is_replaced_and_the_rest_complete(tmp_path, ray_cluster):
    """Issue 14, "every unit has a deadline": a unit whose source read blocks forever (open() of a FIFO
    with no writer, in a real actor process) is reported failed once its actor shows no progress for
    the deadline; the blocked actor is killed and a fresh one takes its place; every other unit, the
    one queued behind the hang on the same actor included, completes. The rerun (the FIFO replaced by a
    readable file) redoes the unit. Before deadlines existed the job waited forever: the scheduler runs
    in a thread joined with a bound, so this test fails instead of hanging."""
    import threading

    from astrea.extract.run import _Scheduler

    log = tmp_path / "starts.jsonl"
    os.mkfifo(tmp_path / "hang")
    cls = ray.remote(_UnitsActor).options(num_cpus=0, max_concurrency=4, max_restarts=0, max_task_retries=0)
    actors = [cls.remote(str(log)) for _ in range(2)]
    created: list = []

    def replace():
        created.append(cls.remote(str(log)))
        return created[-1]

    def schedule(units: list[str]) -> list:
        sched = _Scheduler(actors, units, lambda a, u: a.run_unit.remote(u), deadline_s=4.0, replace=replace,
                           deadline_why=" (test)")
        out: list = []
        th = threading.Thread(target=lambda: out.extend(sched.results(lambda counts: None)), daemon=True)
        th.start()
        th.join(timeout=120)
        assert not th.is_alive(), "the job is still waiting for the hung unit: no deadline"
        return out

    try:
        ray.get([a.ready.remote() for a in actors])
        first = list(actors)
        out = schedule(["a", "hang", "b", "c", "d"])
        errors = {u: e for u, _, e in out if e is not None}
        assert sorted(u for u, r, e in out if e is None) == ["a", "b", "c", "d"]
        assert list(errors) == ["hang"]
        assert errors["hang"].startswith("deadline passed: no progress for 4 s (test)"), errors
        assert "replaced" in errors["hang"] and "rerun" in errors["hang"]
        # The hung process is gone and a fresh actor answers in its place.
        hung_pid = next(json.loads(line)["pid"] for line in log.read_text().splitlines() if '"hang"' in line)
        assert len(created) == 1 and created[0] in actors and sum(a is b for a, b in zip(actors, first)) == 1
        assert ray.get(created[0].ready.remote()) != hung_pid
        # The rerun, the source repaired, redoes the unit.
        (tmp_path / "hang").unlink()
        (tmp_path / "hang").write_bytes(b"readable now")
        again = schedule(["hang"])
        assert [(u, e) for u, _, e in again] == [("hang", None)]
    finally:
        for a in actors + created:
            ray.kill(a)


@pytest.mark.slow  # two model loads per replaced actor and a rerun: ~90 s on 2 busy cores
def test_units_past_their_deadline_fail_with_the_reason_and_the_rerun_writes_them(tmp_path, source_dir, ray_cluster):
    """The deadline wired through `astrea extract --image-timeout` to the real inference actors: with a
    deadline no unit can meet, units fail with the reason in the summary and the report (exit 1), the
    killed actors are replaced (not restarted); the rerun with the default
    deadline writes exactly those units, and the store verifies."""
    from typer.testing import CliRunner

    from astrea.cli import app
    from astrea.shards import Store
    from astrea.shards.audit import verify

    store = tmp_path / "store"
    args = ["extract", "--expert", "siglip", "--data", str(source_dir), "--store", str(store), "--small",
            "--weights", "random", "--batch-size", str(BATCH), "--shards", "00000-00001", "--no-progress",
            "--report", str(tmp_path / "report.json")]
    res = CliRunner().invoke(app, [*args, "--image-timeout", "0.001"])
    assert res.exit_code == 1, res.output
    r = json.loads((tmp_path / "report.json").read_text())["experts"][0]
    assert r["units_failed"], r
    for unit, reason in r["units_failed"].items():
        assert reason.startswith("deadline passed: no progress for 0.002 s (--image-timeout 0.001 x --batch-size 2)"), reason
        assert f"{unit}: deadline passed" in res.output
    assert sorted([*r["units_failed"], *r["units_committed"]]) == ["00000", "00001"]
    (edir,) = Store(store).experts(Store(store).datasets()[0])
    assert edir.committed_units() == sorted(r["units_committed"])  # a killed writer's temp is no unit
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    r2 = json.loads((tmp_path / "report.json").read_text())["experts"][0]
    assert sorted(r2["units_committed"]) == sorted(r["units_failed"])
    # A killed writer may outlive the job that killed it by a moment (a process blocked in the kernel
    # does not die at once), holding its unit's lock: its temp goes at the next job's cleanup.
    assert not edir.temp_files()
    assert verify(Store(store)).ok
