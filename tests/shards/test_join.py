"""JoinedDataset: join by key, skip-and-count failures, split over ranks and workers, seeded shuffling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from astrea.shards import JoinedDataset, StoreError
from tests.shards.helpers import features, keys_of, make_spec, write_unit

UNITS = ["00000", "00001", "00002", "00003", "00004"]
N = 6


@pytest.fixture
def two_experts(store):
    """siglip (zarr fp16) and sam2 (wds bf16) over 5 units; one key failed in sam2 only, one in siglip."""
    a = store.expert_dir("ds", make_spec("siglip"), create=True)
    b = store.expert_dir("ds", make_spec("sam2", fmt="wds", dtype="bfloat16", token_dim=4, pooled_dim=3), create=True)
    for u in UNITS:
        write_unit(a, u, N, failed={keys_of(u, N)[1]} if u == "00002" else ())
        write_unit(b, u, N, failed={keys_of(u, N)[4]} if u == "00000" else ())
    return store, a, b


def test_join_by_key_skips_and_counts_failed(two_experts):
    store, a, b = two_experts
    ds = JoinedDataset(store, "ds", ["siglip", "sam2"], shuffle=False)
    recs = list(ds)
    failed = {keys_of("00002", N)[1], keys_of("00000", N)[4]}
    every = [k for u in UNITS for k in keys_of(u, N)]
    assert [r["key"] for r in recs] == [k for k in every if k not in failed]  # shard order
    assert ds.counts["skipped_failed"] == 2 and ds.counts["yielded"] == len(every) - 2
    assert ds.counts["failed:sam2"] == 1 and ds.counts["failed:siglip"] == 1
    s = ds.summary()
    assert (s["records"], s["skipped_failed"], s["skipped_missing"]) == (len(every) - 2, 2, 0)
    r = recs[0]
    assert set(r["experts"]) == {"siglip", "sam2"} and r["caption"] == f"cap {r['key']}"
    assert r["experts"]["siglip"]["tokens"].dtype == np.float16 and r["experts"]["siglip"]["tokens"].shape == (9, 8)
    assert r["experts"]["sam2"]["tokens"].dtype == np.float32 and r["experts"]["sam2"]["tokens"].shape == (9, 4)
    t, p, out = features(r["key"], b.spec)
    np.testing.assert_allclose(r["experts"]["sam2"]["pooled"], p, rtol=8e-3, atol=1e-6)
    assert r["experts"]["sam2"]["outputs"] == out


def test_only_units_committed_for_every_expert_are_read(two_experts):
    store, a, b = two_experts
    write_unit(a, "00005", N)  # siglip ahead of sam2
    ds = JoinedDataset(store, "ds", ["siglip", "sam2"], shuffle=False)
    assert ds.units == UNITS and ds.units_not_joined == {"00005": {"sam2": "not extracted"}}
    with pytest.raises(StoreError, match="not committed for every expert"):
        JoinedDataset(store, "ds", ["siglip", "sam2"], units=["00005"])


def test_keys_missing_from_one_expert_are_skipped_and_counted(store):
    a = store.expert_dir("ds", make_spec("siglip"), create=True)
    b = store.expert_dir("ds", make_spec("sam2"), create=True)
    write_unit(a, "00000", 6)
    write_unit(b, "00000", 4)  # a shorter unit: the last two keys are absent
    ds = JoinedDataset(store, "ds", ["siglip", "sam2"], shuffle=False)
    assert [r["key"] for r in ds] == keys_of("00000", 4)
    assert ds.counts["skipped_missing"] == 2 and ds.summary()["skipped_missing"] == 2


def test_no_common_unit_is_an_error(store):
    write_unit(store.expert_dir("ds", make_spec("siglip"), create=True), "00000")
    write_unit(store.expert_dir("ds", make_spec("sam2"), create=True), "00001")
    with pytest.raises(StoreError, match="share no committed unit"):
        JoinedDataset(store, "ds", ["siglip", "sam2"])
    with pytest.raises(StoreError, match="rank=2"):
        JoinedDataset(store, "ds", ["siglip"], rank=2, world_size=2)


@pytest.mark.parametrize("shuffle", [False, True])
def test_ranks_times_workers_cover_every_key_once(two_experts, shuffle):
    store, *_ = two_experts
    world, workers = 2, 2
    seen: list[str] = []
    per_reader = []
    for rank in range(world):
        ds = JoinedDataset(store, "ds", ["siglip", "sam2"], shuffle=shuffle, seed=3, rank=rank, world_size=world)
        ds.set_epoch(1)
        dl = DataLoader(ds, batch_size=None, num_workers=workers, collate_fn=lambda r: r["key"])
        keys = list(dl)
        per_reader.append(set(keys))
        seen += keys
    every = JoinedDataset(store, "ds", ["siglip", "sam2"], shuffle=False)
    want = [r["key"] for r in every]
    assert sorted(seen) == sorted(want)  # each key exactly once, across 2 ranks x 2 workers
    assert not per_reader[0] & per_reader[1]


def test_worker_split_without_dataloader(two_experts):
    store, *_ = two_experts
    ds = JoinedDataset(store, "ds", ["siglip"], shuffle=True, seed=0, rank=1, world_size=2)
    parts = [ds.assigned_units(w, 3) for w in range(3)]
    flat = [u for p in parts for u in p]
    assert sorted(flat) == sorted(ds.unit_order()[1::2]) and len(flat) == len(set(flat))


def test_shuffle_is_seeded_per_epoch(two_experts):
    store, *_ = two_experts

    def order(seed, epoch):
        ds = JoinedDataset(store, "ds", ["siglip", "sam2"], shuffle=True, seed=seed, buffer_size=4)
        ds.set_epoch(epoch)
        return [r["key"] for r in ds]

    e0 = order(0, 0)
    assert e0 == order(0, 0)
    assert e0 != order(0, 1) and sorted(e0) == sorted(order(0, 1))
    assert e0 != order(1, 0)
    plain = [r["key"] for r in JoinedDataset(store, "ds", ["siglip", "sam2"], shuffle=False)]
    assert e0 != plain and sorted(e0) == sorted(plain)


def test_records_collate_into_tensors(two_experts):
    store, *_ = two_experts
    from astrea.shards.reader import to_torch

    ds = JoinedDataset(store, "ds", ["siglip", "sam2"], shuffle=False)
    rec = to_torch(next(iter(ds)))
    assert rec["experts"]["siglip"]["tokens"].dtype == torch.float16
