"""A dataset written by the real img2dataset (file:// URLs, offline), read back with open_source."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from astrea.data import open_source
from tests.data.builders import Img2datasetUnavailable, build_img2dataset, jpeg


@pytest.fixture(scope="module")
def i2d(tmp_path_factory):
    pytest.importorskip("img2dataset", reason="img2dataset is not installed (pip install -e .[dev])")
    try:
        return build_img2dataset(tmp_path_factory.mktemp("i2d"), n=5)
    except Img2datasetUnavailable as e:  # pragma: no cover - reported, not hidden
        pytest.fail(f"img2dataset could not build the fixture: {e}")


def test_reads_real_img2dataset_output(i2d):
    shards = open_source(str(i2d)).shards()
    assert [s.name for s in shards] == ["00000"]
    samples = list(shards[0])
    # img2dataset writes only successes to the tar; its order follows the download threads
    assert sorted(s.key for s in samples) == [f"{i:09d}" for i in range(5)]
    assert all(s.ok and s.image[:2] == b"\xff\xd8" for s in samples)
    by_key = {s.key: s for s in samples}
    assert by_key["000000003"].caption == "local test image 3"
    assert len(shards[0]) == 5  # from its stats file
    # its own index agrees: 5 successes, 1 failed download (no tar member for it)
    table = pq.read_table(i2d / "00000.parquet")
    status = dict(zip(table.column("key").to_pylist(), table.column("status").to_pylist()))
    assert status["000000005"] == "failed_to_download" and list(status.values()).count("success") == 5
    stats = json.loads((i2d / "00000_stats.json").read_text())
    assert stats["successes"] == 5 and stats["failed_to_download"] == 1


def test_keys_match_what_our_sample_writes(i2d):
    from astrea.data.sample import PARQUET_COLUMNS, img2dataset_key

    table = pq.read_table(i2d / "00000.parquet")
    assert set(PARQUET_COLUMNS) <= set(table.schema.names)
    assert img2dataset_key(0, 3) in table.column("key").to_pylist()
    assert jpeg()  # builders' helper stays importable for other areas
