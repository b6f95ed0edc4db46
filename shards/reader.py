"""Join several experts of one dataset by key, as a torch ``IterableDataset``.

- Units: only those committed for *every* requested expert (an expert still being extracted never
  shows up half-done); ``units_not_joined`` says which units were left out and why (per expert: not
  extracted, not committed, or MISSING data/index under a stats file).
- Verified: every row read is checked against its index checksum (and for inf/NaN when the unit's
  stats count any). A damaged row raises ``DamagedRowError`` naming unit, key and the repair command;
  with ``on_damaged="skip"`` the key is skipped, counted (``skipped_damaged``) and listed in ``damaged``.
- Keys: in shard (source) order; a key that failed in any expert is skipped and counted, never
  zero-filled; a key missing from an expert's unit is skipped and counted too.
- Splitting: the unit list (shuffled per epoch when ``shuffle``) is dealt round-robin over the
  ranks, then over each rank's DataLoader workers, so each key goes to exactly one (rank, worker).
  A reader with no unit yields nothing; use at least as many units as readers.
- Shuffling: unit order from ``seed`` and the epoch, then a small in-unit shuffle buffer seeded from
  ``(seed, epoch, rank, worker)``: the same seed and epoch give the same stream.
- Reading: each unit's arrays are read in large chunk-aligned blocks (see ``zarr_unit.READ_BLOCK_BYTES``),
  never one zarr call per key.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from astrea.schemas.unit import STATUS_OK
from astrea.shards.errors import StoreError
from astrea.shards.store import STATUS_DAMAGED, ExpertDir, Record, Store


class JoinedDataset(IterableDataset):
    """Records ``{"key", "unit", "caption", "labels", "experts": {name: {"tokens", "pooled", "outputs"}}}``.

    ``experts``: names (``"sam2"``) or ``"sam2@FINGERPRINT"``; the record's ``experts`` dict is keyed by
    the expert name. ``counts`` holds what this process skipped (per DataLoader worker when workers are
    used); ``summary()`` counts from the parquet indexes alone, for the whole selection.
    """

    def __init__(self, store: Store | str | Path, dataset: str, experts: Sequence[str], *, shuffle: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1, buffer_size: int = 64,
                 units: Sequence[str] | None = None, block_rows: int | None = None, on_damaged: str = "raise"):
        super().__init__()
        if on_damaged not in ("raise", "skip"):
            raise StoreError(f"JoinedDataset: on_damaged={on_damaged!r}: use 'raise' or 'skip'")
        self.on_damaged = on_damaged
        # (expert, unit, key) -> why, for rows skipped as damaged; a caller may pass in a shared dict
        self.damaged: dict[tuple[str, str, str], str] = {}
        self.store = store if isinstance(store, Store) else Store(store)
        self.dataset = dataset
        if not experts:
            raise StoreError("JoinedDataset: give at least one expert (experts=[...])")
        if world_size < 1 or not 0 <= rank < world_size:
            raise StoreError(f"JoinedDataset: rank={rank} must be in [0, world_size={world_size})")
        if buffer_size < 1:
            raise StoreError(f"JoinedDataset: buffer_size={buffer_size} must be >= 1")
        self.edirs: dict[str, ExpertDir] = {}
        for ref in experts:
            edir = self.store.resolve(dataset, ref)
            if edir.expert in self.edirs:
                raise StoreError(f"JoinedDataset: expert {edir.expert!r} requested twice "
                                 f"({self.edirs[edir.expert].name} and {edir.name}); records are keyed by name")
            self.edirs[edir.expert] = edir
        listed = {n: e.units() for n, e in self.edirs.items()}
        committed = {n: {u for u in listed[n] if self.edirs[n].is_committed(u)} for n in self.edirs}
        common = set.intersection(*committed.values())
        everywhere = set().union(*(set(v) for v in listed.values()))
        # unit -> {expert: why it cannot be read}: every unit some expert lists but not all can serve
        self.units_not_joined: dict[str, dict[str, str]] = {
            u: {n: self.edirs[n].unit_problem(u) or "" for n in self.edirs if u not in committed[n]}
            for u in sorted(everywhere - common)}
        if units is not None:
            bad = [u for u in units if u not in common]
            if bad:
                raise StoreError(f"JoinedDataset: unit(s) {bad} are not committed for every expert of "
                                 f"{dataset!r}; committed for all: {sorted(common) or 'none'}")
            common = set(units)
        if not common:
            have = {n: sorted(c)[:8] for n, c in committed.items()}
            raise StoreError(f"{self.store.root / dataset}: experts {list(self.edirs)} share no committed unit "
                             f"(committed: {have}); finish extracting them over the same shards")
        self.units = sorted(common)
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.buffer_size, self.block_rows = buffer_size, block_rows
        self.epoch = 0
        self.counts: Counter[str] = Counter()  # yielded, skipped_failed, skipped_missing, failed:<expert>

    # -- splitting ---------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for this epoch (same seed + epoch -> same order on every rank)."""
        self.epoch = int(epoch)

    def unit_order(self) -> list[str]:
        order = list(self.units)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch])
            order = [order[i] for i in rng.permutation(len(order))]
        return order

    def assigned_units(self, worker: int = 0, num_workers: int = 1) -> list[str]:
        """The units read by (this rank, DataLoader worker ``worker`` of ``num_workers``)."""
        # By rank first, then by worker: a rank's share does not depend on its DataLoader worker count.
        return self.unit_order()[self.rank::self.world_size][worker::num_workers]

    # -- iteration ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        records = (r for u in self.assigned_units(wid, nw) for r in self.join_unit(u))
        if not self.shuffle:
            yield from records
            return
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, wid])
        buf: list[dict[str, Any]] = []
        for rec in records:
            if len(buf) < self.buffer_size:
                buf.append(rec)
                continue
            i = int(rng.integers(len(buf)))
            buf[i], rec = rec, buf[i]
            yield rec
        while buf:
            yield buf.pop(int(rng.integers(len(buf))))

    def join_unit(self, unit: str) -> Iterator[dict[str, Any]]:
        """One unit's joined records in source order (no shuffling); skipped keys go to ``counts``."""
        names = list(self.edirs)
        keys = {n: self.edirs[n].read_index(unit).column("key").to_pylist() for n in names}
        primary = keys[names[0]]
        shared = set(primary).intersection(*(set(k) for k in keys.values()))
        order = [k for k in primary if k in shared]
        for n in names[1:]:
            if [k for k in keys[n] if k in shared] != order:
                raise StoreError(f"{self.edirs[n].index_path(unit)}: keys are in a different order than in "
                                 f"{self.edirs[names[0]].index_path(unit)}; both should follow the source shard")
        streams = {n: self.edirs[n].iter_unit(unit, include_failed=True, block_rows=self.block_rows,
                                              on_damaged=self.on_damaged)
                   for n in names}
        for key in primary:
            if key not in shared:
                self.counts["skipped_missing"] += 1
                continue
            recs: dict[str, Record] = {}
            for n in names:
                for r in streams[n]:
                    if r.key == key:
                        recs[n] = r
                        break
            damaged = [n for n, r in recs.items() if r.status == STATUS_DAMAGED]
            if damaged:
                self.counts["skipped_damaged"] += 1
                for n in damaged:
                    self.counts[f"damaged:{n}"] += 1
                    self.damaged[(n, unit, key)] = recs[n].error or "damaged"
                continue
            failed = [n for n, r in recs.items() if r.status != STATUS_OK]
            if failed:
                self.counts["skipped_failed"] += 1
                for n in failed:
                    self.counts[f"failed:{n}"] += 1
                continue
            first = recs[names[0]]
            self.counts["yielded"] += 1
            yield {
                "key": key, "unit": unit, "caption": first.caption, "labels": first.labels,
                "experts": {n: {"tokens": r.tokens, "pooled": r.pooled, "outputs": r.outputs} for n, r in recs.items()},
            }
        for n in names[1:]:  # keys only other experts hold
            self.counts["skipped_missing"] += sum(1 for k in keys[n] if k not in shared)

    # -- accounting --------------------------------------------------------------------------------
    def summary(self, *, all_ranks: bool = True) -> dict[str, Any]:
        """Counts from the indexes alone: keys, joinable records, keys skipped (failed / missing)."""
        units = self.units if all_ranks else self.assigned_units()
        out: Counter[str] = Counter()
        for unit in units:
            tables = {n: e.read_index(unit).select(["key", "status"]).to_pydict() for n, e in self.edirs.items()}
            status = {n: dict(zip(t["key"], t["status"], strict=True)) for n, t in tables.items()}
            allkeys = set().union(*(s.keys() for s in status.values()))
            for k in allkeys:
                have = [s.get(k) for s in status.values()]
                if any(h is None for h in have):
                    out["skipped_missing"] += 1
                elif any(h != STATUS_OK for h in have):
                    out["skipped_failed"] += 1
                    for n, s in status.items():
                        if s[k] != STATUS_OK:
                            out[f"failed:{n}"] += 1
                else:
                    out["records"] += 1
        return {"units": len(units), "records": out["records"], "skipped_failed": out["skipped_failed"],
                "skipped_missing": out["skipped_missing"],
                "failed_by_expert": {n: out[f"failed:{n}"] for n in self.edirs},
                "units_not_joined": self.units_not_joined}


def to_torch(rec: dict[str, Any]) -> dict[str, Any]:
    """A record with its arrays as tensors (float16 stays float16), e.g. for a DataLoader collate."""
    return {**rec, "experts": {n: {**e, "tokens": torch.from_numpy(e["tokens"]), "pooled": torch.from_numpy(e["pooled"])}
                               for n, e in rec["experts"].items()}}
