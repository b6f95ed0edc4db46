"""`astrea shards convert`: re-encode an expert directory (dtype/format) without running the expert:
new fingerprint with provenance, source untouched, atomic per unit, resumable after a kill."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from astrea.shards import Store
from astrea.shards.audit import verify
from astrea.shards.convert import ConvertConfig, ConvertError
from tests.shards.helpers import keys_of, make_spec, write_unit

N = 6
UNITS = ["00000", "00001", "00002"]
ROOT = Path(__file__).resolve().parents[2]


def _tree(root: Path) -> dict[str, str]:
    """Every file under root -> sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def source(tmp_path, monkeypatch):
    from astrea.shards import zarr_unit

    monkeypatch.setattr(zarr_unit, "CHUNK_BYTES", 1)  # several chunks and shard files per unit
    monkeypatch.setattr(zarr_unit, "SHARD_BYTES", 1)
    store = Store(tmp_path / "src")
    edir = store.expert_dir("ds", make_spec("siglip", grid=4, token_dim=32, pooled_dim=16), create=True)
    for u in UNITS:
        write_unit(edir, u, N, failed={keys_of(u, N)[3]})
    return store, edir


@pytest.mark.parametrize("dtype,fmt", [("int8", None), ("int8", "wds"), ("float32", "wds")])
def test_convert_reencodes_with_provenance_and_leaves_the_source(tmp_path, source, dtype, fmt):
    store, src = source
    before = _tree(store.root)
    rep = ConvertConfig(store=store.root, dataset="ds", expert="siglip", dtype=dtype, format=fmt).build().run()
    assert rep.converted == UNITS and rep.skipped == [] and rep.rows == N * len(UNITS)
    assert _tree(store.root / "ds" / src.name) == {k[len(f"ds/{src.name}/"):]: v for k, v in before.items()}
    dst = store.resolve("ds", f"siglip@{Path(rep.target).name.split('@')[1]}")
    assert dst.fingerprint != src.fingerprint and dst.spec.dtype == dtype and dst.spec.format == (fmt or "zarr")
    doc = json.loads((dst.path / "expert.json").read_text())
    assert doc["converted_from"] == {"fingerprint": src.fingerprint, "dtype": "float16", "format": "zarr",
                                     "by": "astrea shards convert"}
    st = dst.stats("00001")
    assert st["extra"]["converted_from"]["index_sha256"] == src.stats("00001")["index_sha256"]
    assert st["failed"] == 1 and st["failures_by_reason"] == src.stats("00001")["failures_by_reason"]
    for u in UNITS:
        a, b = list(src.iter_unit(u)), list(dst.iter_unit(u))
        assert [(r.key, r.status, r.caption, r.labels, r.outputs, r.error) for r in a] == \
               [(r.key, r.status, r.caption, r.labels, r.outputs, r.error) for r in b]
        for x, y in zip(a, b):
            if x.status != "ok":
                continue
            if dtype == "float32":  # widening float16 is exact
                assert np.array_equal(x.tokens.astype(np.float32), y.tokens)
            else:
                cos = np.sum(x.tokens * y.tokens, 1) / np.linalg.norm(x.tokens, axis=1) / np.linalg.norm(y.tokens, axis=1)
                assert cos.min() >= 0.999
    assert verify(store).ok
    # the same command again (the name now matches the source and its conversion): resumes, nothing to do
    again = ConvertConfig(store=store.root, dataset="ds", expert="siglip", dtype=dtype, format=fmt).build().run()
    assert again.skipped == UNITS and again.converted == [] and again.target == rep.target


def test_nothing_to_convert_and_bad_fields_are_refused(source):
    store, _ = source
    with pytest.raises(ConvertError, match="already float16 / zarr"):
        ConvertConfig(store=store.root, dataset="ds", expert="siglip", dtype="float16").build()
    with pytest.raises(ConvertError, match="dtype='int4'"):
        ConvertConfig(store=store.root, dataset="ds", expert="siglip", dtype="int4").build()
    with pytest.raises(ConvertError, match="format='hdf5'"):
        ConvertConfig(store=store.root, dataset="ds", expert="siglip", format="hdf5").build()


def test_a_damaged_source_row_stops_its_unit_and_writes_nothing_of_it(tmp_path, source):
    from astrea.shards import DamagedRowError

    store, src = source
    tar_src = Store(tmp_path / "tsrc")
    e = tar_src.expert_dir("ds", make_spec("siglip", fmt="wds"), create=True)
    for u in UNITS:
        write_unit(e, u, N)
    data = bytearray(e.data_path("00001").read_bytes())
    data[data.index(f"{keys_of('00001', N)[2]}.tokens.npy".encode()) + 512 + 200] ^= 1
    e.data_path("00001").write_bytes(bytes(data))
    conv = ConvertConfig(store=tar_src.root, dataset="ds", expert="siglip", dtype="int8", out=tmp_path / "o").build()
    with pytest.raises(DamagedRowError):
        conv.run()
    dst = Store(tmp_path / "o").resolve("ds", "siglip")
    assert dst.committed_units() == ["00000"] and not dst.temp_files()


def test_killed_mid_unit_then_rerun_equals_a_full_conversion(tmp_path, source):
    store, src = source
    before = _tree(store.root)
    out, ref = tmp_path / "out", tmp_path / "ref"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tests.shards.convert_worker", str(store.root), str(out), "int8",
                             "wds", "00001", "2"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env=env)
    try:
        line = proc.stdout.readline()  # the converter says it stopped mid-unit: the event we kill on
        assert line.strip() == "stopped", line
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    dst = Store(out).resolve("ds", "siglip")
    assert dst.committed_units() == ["00000"]  # unit 00001 was mid-way: not visible
    assert dst.temp_files(), "the killed writer's temp container should be on disk"
    rep = ConvertConfig(store=store.root, dataset="ds", expert="siglip", dtype="int8", format="wds",
                        out=out).build().run()
    assert rep.skipped == ["00000"] and rep.converted == ["00001", "00002"]
    assert not dst.temp_files()
    full = ConvertConfig(store=store.root, dataset="ds", expert="siglip", dtype="int8", format="wds",
                         out=ref).build().run()
    assert Path(full.target).name == dst.name  # same spec, same fingerprint
    got, want = _tree(dst.path), _tree(Path(full.target))
    stats = [k for k in want if k.endswith("_stats.json") or k == "expert.json"]  # these say when
    assert {k: v for k, v in got.items() if k not in stats} == {k: v for k, v in want.items() if k not in stats}
    assert sorted(got) == sorted(want)
    for k in stats:  # equal except when they were written
        a, b = (json.loads((p / k).read_text()) for p in (dst.path, Path(full.target)))
        a.pop("created_by"), b.pop("created_by")
        assert a == b
    assert _tree(store.root) == before  # the source's bytes never changed
    assert verify(Store(out)).ok


def test_cli_convert_then_info_shows_provenance(source):
    from typer.testing import CliRunner

    from astrea.cli import app

    store, src = source
    runner = CliRunner()
    res = runner.invoke(app, ["shards", "convert", str(store.root), "-d", "ds", "-e", "siglip", "--dtype", "int8",
                              "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["converted"] == UNITS and rep["target_bytes"] < rep["source_bytes"]
    res = runner.invoke(app, ["shards", "info", str(store.root), "-e", f"siglip@{Path(rep['target']).name[7:]}"])
    assert res.exit_code == 0 and f"converted from siglip@{src.fingerprint} (float16, zarr)" in res.output
    res = runner.invoke(app, ["shards", "convert", str(store.root), "-d", "ds", "-e", "siglip", "--dtype", "int4"])
    assert res.exit_code == 2 and "dtype='int4'" in res.output
