"""`astrea extract` and `astrea experts ls` through the real CLI app (no Ray started here)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from astrea.cli import app

runner = CliRunner()


def test_extract_help_lists_the_options():
    res = runner.invoke(app, ["extract", "--help"])
    assert res.exit_code == 0, res.output
    for opt in ("--expert", "--data", "--store", "--arch", "--weights", "--small", "--format", "--dtype", "--grid",
                "--batch-size", "--workers", "--num-gpus", "--cpus-per-task", "--address", "--limit", "--shards",
                "--without-prerequisites"):
        assert opt in res.output, opt


def test_experts_help():
    res = runner.invoke(app, ["experts", "--help"])
    assert res.exit_code == 0 and "ls" in res.output


def test_extract_user_errors_exit_2_with_one_line():
    res = runner.invoke(app, ["extract", "--expert", "sam3", "--data", "x"])
    assert res.exit_code == 2
    assert "unknown expert 'sam3'" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["extract", "--expert", "siglip", "--data", "x", "--batch-size", "0"])
    assert res.exit_code == 2 and "batch_size" in res.output
    res = runner.invoke(app, ["extract", "--expert", "siglip", "--data", "x", "--weights", "sam2=/w.pt"])
    # 'sam2=' is not a selected expert's key, so the whole text is a (global) path: accepted as such,
    # then the data source is missing -> a one-line error naming --data.
    assert res.exit_code == 2 and "data" in res.output
    res = runner.invoke(app, ["extract", "--expert", "siglip", "--data", "x", "--arch", "sam2=sam2.hiera_tiny"])
    assert res.exit_code == 2 and "sam2" in res.output


def test_experts_ls_table_and_json():
    from astrea.extract.experts.registry import variants
    from astrea.schemas.stages import EXPERT_ORDER

    res = runner.invoke(app, ["experts", "ls"])
    assert res.exit_code == 0, res.output
    for name in EXPERT_ORDER:
        assert name in res.output
    res = runner.invoke(app, ["experts", "ls", "--json"])
    rows = json.loads(res.output)
    by = {(r["expert"], r.get("variant")): r for r in rows}
    so400m = by[("siglip", "siglip.so400m_14_384")]
    # fp16 at the default 24x24 grid: 576 tokens x 1152 dims x 2 bytes + pooled 1152 x 2
    assert so400m["bytes_per_image"] == 576 * 1152 * 2 + 1152 * 2
    assert so400m["default"] and so400m["default_weights"] == "timm/ViT-SO400M-14-SigLIP-384"
    for name in EXPERT_ORDER:
        for v, var in variants(name).items():
            r = by[(name, v)]
            assert r["token_dim"] == var.token_dim and r["image_size"] == var.image_size
    res = runner.invoke(app, ["experts", "ls", "--grid", "12", "--dtype", "float32", "--json"])
    r = {(x["expert"], x.get("variant")): x for x in json.loads(res.output)}[("siglip", "siglip.so400m_14_384")]
    assert r["bytes_per_image"] == (144 * 1152 + 1152) * 4
    res = runner.invoke(app, ["experts", "ls", "--grid", "24", "--dtype", "int8", "--json"])
    r = {(x["expert"], x.get("variant")): x for x in json.loads(res.output)}[("siglip", "siglip.so400m_14_384")]
    assert r["bytes_per_image"] == 576 * (1152 + 4) + (1152 + 4)  # one byte a value + a float32 scale per row
    res = runner.invoke(app, ["experts", "ls", "--dtype", "int4"])
    assert res.exit_code == 2 and "--dtype" in res.output


def test_extract_without_a_ray_cluster_at_address_exits_2_with_one_line(tmp_path):
    import os
    import subprocess
    import sys

    # A subprocess: this test process may hold a Ray session of another test, which the job would reuse.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", "from astrea.cli import main; main()", "extract", "--expert", "siglip", "--data", "sample",
                           "--small", "--weights", "random", "--store", str(tmp_path / "store"), "--address", "auto"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "could not connect to the Ray cluster at --address auto" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
