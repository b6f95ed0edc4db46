"""`astrea extract --address` on a Ray cluster of two nodes (two raylets on this machine, Ray's own
``cluster_utils.Cluster``): the job takes its multi-node path (the expert planned in a Ray task, not in the
driver; actors and decode tasks placed by Ray on either node), and the store holds exactly what a one-node
run writes.
Its own module: the job connects to that cluster, so no in-process Ray of another module may be running."""

from __future__ import annotations

import os

import pytest

ray = pytest.importorskip("ray")

from astrea.extract import ExtractConfig, run  # noqa: E402
from astrea.shards import Store  # noqa: E402
from astrea.shards.audit import verify  # noqa: E402
from tests.extract.test_run import BATCH, _assert_same_units, _two_shards  # noqa: E402


def _cfg(source, store, **kw) -> ExtractConfig:
    return ExtractConfig(experts=["siglip"], data=str(source), store=str(store), small=True, weights={"*": "random"},
                         batch_size=BATCH, progress=False, **kw)


def test_extract_on_a_two_node_cluster_writes_what_one_node_writes(tmp_path, monkeypatch):
    import tempfile

    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # The test cluster writes its address where a plain ray.init() on this machine looks for one: keep it
    # in a directory of its own (short: Ray's socket paths live under it).
    monkeypatch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    src = _two_shards(tmp_path / "src")
    if ray.is_initialized():  # a Ray left in this process would be used instead of the cluster
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        report = run(_cfg(src, tmp_path / "store", address=cluster.address, workers=2, cpus_per_worker=1.0,
                          cpus_per_task=1.0))
        assert report["ray"] == f"cluster {cluster.address}" and report["nodes"] == 2
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    r = report["experts"][0]
    assert r["status"] == "done" and sorted(r["units_committed"]) == ["00000", "00001"] and r["images_ok"] == 48
    assert verify(Store(tmp_path / "store")).ok

    ref = run(_cfg(src, tmp_path / "ref", num_cpus=2))  # one node, started for the job
    assert ref["nodes"] == 1 and ref["experts"][0]["fingerprint"] == r["fingerprint"]
    _assert_same_units(tmp_path / "ref", tmp_path / "store", ref["dataset"], "siglip", ["00000", "00001"])
