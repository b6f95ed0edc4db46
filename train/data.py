"""From the feature store to training batches: held-out split, collate, resumable endless stream.

- Samples come from ``astrea.shards.JoinedDataset`` (one record per key with every requested expert);
  it splits shards by rank, so ranks read disjoint data.
- Held-out split: a key is held out when a hash of it falls under ``heldout_fraction``; the same keys
  in every run, stage and world size, without a second pass over the store.
- The stream is endless (epoch after epoch, reshuffled per epoch (``JoinedDataset.set_epoch``)) so every rank runs the
  same number of steps whatever its share of shards; its :class:`Position` (epoch, records drawn from
  that epoch) is checkpointed, and a resumed stream skips exactly that many records.
- A background thread reads and collates ``prefetch`` batches ahead; the trainer times how long it
  waits for each batch (the data-wait fraction).
- Every row is verified by the store reader (checksum, inf/NaN). A damaged row stops the run with one
  line naming unit, key and repair command, unless ``dataset.skip_damaged``: then it is skipped and
  counted in :class:`StoreReadLog`, which the run summary reports with the units the store lists but
  could not join.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from astrea.train.errors import TrainError
from astrea.train.model import IGNORE

OpenEpoch = Callable[[int, bool], Iterable[dict[str, Any]]]  # (epoch, shuffle) -> records


def is_heldout(key: str, fraction: float) -> bool:
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return h < fraction * 2**64


@dataclass
class StoreReadLog:
    """What the store readers of one process left out: shared by every epoch's JoinedDataset."""

    skip_damaged: bool = False
    damaged: dict[tuple[str, str, str], str] = field(default_factory=dict)  # (expert, unit, key) -> why
    units_not_joined: dict[str, dict[str, str]] = field(default_factory=dict)  # unit -> {expert: why}

    def to_dict(self, limit: int = 20) -> dict[str, Any]:
        rows = sorted(self.damaged.items())
        return {
            "skip_damaged": self.skip_damaged,
            "damaged_rows_skipped": len(rows),
            "damaged": [f"{e}/{u}/{k}: {why}" for (e, u, k), why in rows[:limit]],
            "units_not_joined": self.units_not_joined,
        }


SKIP_HINT = "or train without damaged rows (skipped and counted): --set dataset.skip_damaged=true"


def _checked(ds: Any) -> Iterator[dict[str, Any]]:
    from astrea.shards.errors import DamagedRowError

    try:
        yield from ds
    except DamagedRowError as e:
        raise TrainError(f"{e.args[0]}; {SKIP_HINT}") from None


def store_opener(
    store: str, dataset: str, experts: list[str], *, seed: int, rank: int, world_size: int,
    log: StoreReadLog | None = None,
) -> OpenEpoch:
    """A function opening one epoch of the store's joined records for this rank (rows verified)."""
    log = log if log is not None else StoreReadLog()

    def open_epoch(epoch: int, shuffle: bool) -> Iterable[dict[str, Any]]:
        from astrea.shards import JoinedDataset, Store

        ds = JoinedDataset(Store(store), dataset, experts, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                           on_damaged="skip" if log.skip_damaged else "raise")
        ds.damaged = log.damaged  # one count across epochs and stages: a row skipped twice is one row
        log.units_not_joined.update(ds.units_not_joined)
        ds.set_epoch(epoch)
        return _checked(ds)

    return open_epoch


@dataclass
class Position:
    epoch: int = 0
    consumed: int = 0  # records drawn from this epoch's iterator (held-out and skipped ones included)

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}


class Collator:
    """Records -> a batch dict (see ``astrea.train.stages`` for its keys). Skipped records are counted."""

    def __init__(self, render: Callable[[dict[str, Any]], Any], tokenizer: Any, experts: list[str], max_text_tokens: int):
        self.render, self.tok, self.experts, self.max_len = render, tokenizer, list(experts), max_text_tokens
        self.skipped = 0  # records with no usable target or a missing expert
        self.truncated = 0  # targets cut at max_text_tokens

    def __call__(self, records: list[dict[str, Any]]) -> dict[str, Any] | None:
        rows = []
        for rec in records:
            feats = rec.get("experts") or {}
            if any(e not in feats for e in self.experts):
                self.skipped += 1
                continue
            r = self.render(rec)
            if r is None:
                self.skipped += 1
                continue
            rows.append((rec, r))
        if not rows:
            return None
        ids, labels = [], []
        bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        for _, r in rows:
            p = bos + self.tok(r.prompt, add_special_tokens=False).input_ids
            t = self.tok(r.target, add_special_tokens=False).input_ids + [self.tok.eos_token_id]
            room = max(self.max_len - len(p), 1)
            if len(t) > room:
                t = t[:room]
                self.truncated += 1
            ids.append(p + t)
            labels.append([IGNORE] * len(p) + t)
        n = max(len(x) for x in ids)
        pad = self.tok.pad_token_id
        batch: dict[str, Any] = {
            "keys": [rec["key"] for rec, _ in rows],
            "input_ids": torch.tensor([x + [pad] * (n - len(x)) for x in ids], dtype=torch.long),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids], dtype=torch.long),
            "labels": torch.tensor([x + [IGNORE] * (n - len(x)) for x in labels], dtype=torch.long),
            "prompts": [r.prompt for _, r in rows],
            "targets": [r.target for _, r in rows],
            "tasks": [r.task for _, r in rows],
            "captions": [rec.get("caption") for rec, _ in rows],
            "tokens": {},
            "pooled": {},
        }
        for e in self.experts:
            batch["tokens"][e] = torch.from_numpy(np.stack([np.asarray(rec["experts"][e]["tokens"]) for rec, _ in rows]))
            batch["pooled"][e] = torch.from_numpy(np.stack([np.asarray(rec["experts"][e]["pooled"]) for rec, _ in rows]))
        return batch


def batches(
    open_epoch: OpenEpoch,
    collate: Collator,
    batch_size: int,
    *,
    heldout_fraction: float,
    shuffle: bool = True,
    start: Position | None = None,
) -> Iterator[tuple[dict[str, Any], Position]]:
    """Endless training batches and the stream position after each; resumes exactly at ``start``."""
    pos = start or Position()
    epoch, skip = pos.epoch, pos.consumed
    while True:
        consumed, buf, produced = 0, [], 0
        for rec in open_epoch(epoch, shuffle):
            consumed += 1
            if consumed <= skip or is_heldout(rec["key"], heldout_fraction):
                continue
            buf.append(rec)
            if len(buf) == batch_size:
                b = collate(buf)
                buf = []
                if b is not None:
                    produced += 1
                    yield b, Position(epoch, consumed)
        if buf and (b := collate(buf)) is not None:  # the epoch's last, smaller batch
            produced += 1
            yield b, Position(epoch, consumed)
        if produced == 0 and skip == 0:
            raise TrainError(
                f"epoch {epoch} gave no training batch on this rank: every record was held out, skipped "
                f"({collate.skipped} without a usable target or expert) or the rank got no shard; "
                "use more data, fewer ranks, or a smaller dataset.heldout_fraction"
            )
        epoch, skip = epoch + 1, 0


def heldout_batches(
    open_epoch: OpenEpoch, collate: Collator, batch_size: int, *, heldout_fraction: float, max_samples: int
) -> list[dict[str, Any]]:
    """The first ``max_samples`` held-out records of an unshuffled pass, collated (same every time)."""
    out, buf, n = [], [], 0
    if heldout_fraction <= 0 or max_samples <= 0:
        return out
    for rec in open_epoch(0, False):
        if not is_heldout(rec["key"], heldout_fraction):
            continue
        buf.append(rec)
        n += 1
        if len(buf) == batch_size or n == max_samples:
            if (b := collate(buf)) is not None:
                out.append(b)
            buf = []
        if n >= max_samples:
            break
    if buf and (b := collate(buf)) is not None:
        out.append(b)
    return out


class Prefetcher:
    """Runs an iterator in a background thread, ``depth`` items ahead; errors re-raise in the consumer."""

    _END = object()

    def __init__(self, it: Iterator[Any], depth: int):
        self._q: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(it,), daemon=True, name="astrea-prefetch")
        self._thread.start()

    def _run(self, it: Iterator[Any]) -> None:
        try:
            for item in it:
                if not self._put(("item", item)):
                    return
            self._put(("end", None))
        except BaseException as e:  # handed to the consumer, which raises it with its traceback
            self._put(("error", e))

    def _put(self, msg: tuple[str, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(msg, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> Any:
        kind, value = self._q.get()
        if kind == "item":
            return value
        if kind == "error":
            raise value
        raise StopIteration

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
