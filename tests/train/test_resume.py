"""Kill a training process mid-run, resume it: the loss curve joins the uninterrupted one exactly."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from astrea.train.config import TrainConfig
from astrea.train.metrics import read_metrics
from astrea.train.runner import run_local

SETTINGS = {
    "stages": "caption,classification", "steps": 3, "batch_size": 4, "optim.lr": 3e-3,
    "dataset.heldout_fraction": 0.2, "save_every": 1, "progress": False, "residual.p": 0.5,
}


def _losses(out):
    rows = read_metrics(out / "metrics.jsonl")
    return {(r["kind"], r["stage"], r["step"]): r["loss" if r["kind"] == "train" else "loss_reg"]
            for r in rows if r["kind"] in ("train", "heldout")}


def test_killed_run_resumes_exactly(toy_store, tmp_path):
    ref = tmp_path / "ref"
    run_local(TrainConfig.load(None, {"store": str(toy_store), "data": "toy", "out": str(ref), **SETTINGS}))

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "astrea.train", "--from-shards", str(toy_store), "--data", "toy", "--out", str(killed)]
    for k, v in SETTINGS.items():
        cmd += ["--set", f"{k}={v}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # same arithmetic as the in-process reference
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 240
    # Kill once a checkpoint inside the second stage exists (global step 4 = classification step 1),
    # so the resumed part needs the optimizer, scheduler, RNG (residual draws) and data position.
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() >= "step-00000004":
            proc.kill()
            break
        time.sleep(0.02)
    rc = proc.wait()
    if (killed / "summary.json").exists():
        pytest.fail(f"the run finished before it could be killed (rc={rc}); the test did not test resume")
    assert rc != 0, proc.stderr.read().decode()[-2000:]

    run_local(TrainConfig.load(None, {"store": str(toy_store), "data": "toy", "out": str(killed), "resume": True, **SETTINGS}))
    # each (kind, stage, step) once in the file itself, not only through read_metrics' last-row-wins
    import json

    raw = [json.loads(ln) for ln in (killed / "metrics.jsonl").read_text().splitlines()]
    seen = [(r["kind"], r["stage"], r["step"]) for r in raw]
    assert len(seen) == len(set(seen)), sorted(k for k in seen if seen.count(k) > 1)
    a, b = _losses(ref), _losses(killed)
    assert a.keys() == b.keys() and len([k for k in a if k[0] == "train"]) == 6
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-7), k


def test_trim_metrics_drops_what_the_killed_run_logged_after_its_checkpoint(tmp_path):
    import json

    from astrea.train.metrics import trim_metrics

    rows = [{"kind": "heldout", "stage": "caption", "step": 0, "global_step": 0},
            {"kind": "train", "stage": "caption", "step": 1, "global_step": 1},
            {"kind": "train", "stage": "caption", "step": 2, "global_step": 2},
            {"kind": "heldout", "stage": "caption", "step": 2, "global_step": 2},
            {"kind": "heldout", "stage": "classification", "step": 0, "global_step": 2},
            {"kind": "train", "stage": "classification", "step": 1, "global_step": 3}]
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "train", "sta')  # cut by the kill
    assert trim_metrics(p, 2, "caption") == 3
    assert [json.loads(ln) for ln in p.read_text().splitlines()] == rows[:4]
    # resumed mid-stage: the stage logs its stage-start "targets" row again, so the old one goes
    targets = {"kind": "targets", "stage": "caption", "step": 0, "global_step": 0}
    p.write_text("".join(json.dumps(r) + "\n" for r in [targets, *rows[:3]]))
    assert trim_metrics(p, 1, "caption", stage_done=False) == 2
    assert [json.loads(ln) for ln in p.read_text().splitlines()] == rows[:2]
