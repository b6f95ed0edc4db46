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
from collections import Counter
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
    # length-bucketed batches: batches already given from the pool that starts after ``consumed`` records
    in_pool: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed, "in_pool": self.in_pool}


class Collator:
    """Records -> a batch dict (see ``astrea.train.stages`` for its keys). Skipped records are counted.

    A target that does not fit ``max_text_tokens`` (prompt + target + EOS) first drops whole items
    (``Rendered.fit``; ``fit_targets=False``: never); what is still too long is cut. Nothing is lost
    silently: ``dropped_items[task]`` counts the items dropped to fit, ``cut_tasks[task]`` the targets
    whose ``task`` line lost content to the cut, ``truncated`` the targets cut at all.
    """

    def __init__(
        self, render: Callable[[dict[str, Any]], Any], tokenizer: Any, experts: list[str], max_text_tokens: int,
        *, fit_targets: bool = True,
    ):
        self.render, self.tok, self.experts, self.max_len = render, tokenizer, list(experts), max_text_tokens
        self.fit_targets = fit_targets
        self.skipped = 0  # records with no usable target or a missing expert
        self.truncated = 0  # targets cut at max_text_tokens
        self.targets = 0  # targets encoded
        self.fitted = 0  # targets that dropped items to fit
        self.dropped_items: Counter = Counter()  # task -> items dropped to fit
        self.cut_tasks: Counter = Counter()  # task -> targets whose task line was cut
        self.task_targets: Counter = Counter()  # task -> targets holding a line of that task

    def counts(self) -> dict[str, Any]:
        """What happened to the targets encoded so far (the run's summary and eval report these)."""
        from astrea.schemas.stages import TASKS

        def ordered(c: Counter) -> dict[str, int]:  # task order, whatever order things happened in
            return {t: c[t] for t in sorted(c, key=lambda t: (TASKS.index(t) if t in TASKS else len(TASKS), t))}

        return {
            "targets": self.targets,
            "truncated_targets": self.truncated,
            "fitted_targets": self.fitted,
            "dropped_items": ordered(self.dropped_items),
            "cut_tasks": ordered(self.cut_tasks),
            "task_targets": ordered(self.task_targets),
        }

    def n_tokens(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False).input_ids)

    def encode_row(self, r: Any) -> tuple[list[int], list[int], Any]:
        """Token ids, labels (-100: no loss) and the fitted rendering of one rendered sample (a single-turn
        :class:`~astrea.train.templates.Rendered` or a multi-turn instruction ``Dialogue``)."""
        from astrea.train.instructions import Dialogue, encode_dialogue

        if isinstance(r, Dialogue):
            r = r.rendered(self.tok)
            ids, labels, dropped, cut = encode_dialogue(r, self.tok, self.max_len)
            self.targets += 1
            self.task_targets[r.task] += 1
            if dropped:
                self.fitted += 1
                self.dropped_items[r.task] += dropped  # whole answer turns dropped to fit
            if cut:
                self.truncated += 1
                self.cut_tasks[r.task] += 1
            return ids, labels, r
        p, t, r = self.encode(r)
        return p + t, [IGNORE] * len(p) + t, r

    def encode(self, r: Any) -> tuple[list[int], list[int], Any]:
        """Prompt ids (BOS first), target ids (EOS last) and the fitted rendering of a rendered sample,
        at most ``max_text_tokens`` in all; updates the counters. A ``Dialogue``: the ids before its first
        answer, then the rest (later questions included; :meth:`encode_row` has the per-turn labels)."""
        from astrea.train.instructions import Dialogue

        if isinstance(r, Dialogue):
            ids, labels, r = self.encode_row(r)
            first = next((i for i, x in enumerate(labels) if x != IGNORE), len(ids))
            return ids[:first], ids[first:], r
        bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        p = bos + self.tok(r.prompt, add_special_tokens=False).input_ids
        room = max(self.max_len - len(p), 1)  # target + EOS
        lines = getattr(r, "lines", None) or []
        if self.fit_targets and lines:
            r, dropped = r.fit(self.n_tokens, room - 1)
            if dropped:
                self.fitted += 1
                self.dropped_items.update(dropped)
        self.targets += 1
        self.task_targets.update(t for t, _ in lines)
        t = self.tok(r.target, add_special_tokens=False).input_ids + [self.tok.eos_token_id]
        if len(t) > room:
            t = t[:room]
            self.truncated += 1
            if lines:
                for task, _, end in r.line_spans():
                    if self.n_tokens(r.target[:end]) > room:
                        self.cut_tasks[task] += 1
        return p, t, r

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
        for i, (rec, r) in enumerate(rows):
            x, y, r = self.encode_row(r)
            rows[i] = (rec, r)  # the fitted text: the batch's ``targets`` are what carries loss
            ids.append(x)
            labels.append(y)
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
            # False: a text-only instruction record (blank features); eval's image controls leave it out
            "has_image": [not rec.get("text_only", False) for rec, _ in rows],
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
    bucket: int = 0,
    length: Callable[[dict[str, Any]], int] | None = None,
    seed: int = 0,
) -> Iterator[tuple[dict[str, Any], Position]]:
    """Endless training batches and the stream position after each; resumes exactly at ``start``.

    ``bucket`` > 0 (with ``length(record)``): length-bucketed batches, see :func:`bucketed_batches`."""
    if bucket > 0 and length is not None:
        yield from bucketed_batches(open_epoch, collate, batch_size, heldout_fraction=heldout_fraction,
                                    shuffle=shuffle, start=start, bucket=bucket, length=length, seed=seed)
        return
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


def bucketed_batches(
    open_epoch: OpenEpoch,
    collate: Collator,
    batch_size: int,
    *,
    heldout_fraction: float,
    shuffle: bool,
    start: Position | None,
    bucket: int,
    length: Callable[[dict[str, Any]], int],
    seed: int,
) -> Iterator[tuple[dict[str, Any], Position]]:
    """Length-bucketed training batches: training records are read in pools of ``bucket * batch_size``,
    sorted by ``length``, cut into batches (little padding: similar lengths together), and a pool's
    batches given in a seeded random order (no long-to-short drift through the epoch).

    Pools start at fixed stream positions, so a position ``(epoch, consumed at the pool's start, batches
    given from it)`` resumes exactly: the same pool is rebuilt and its first ``in_pool`` batches skipped."""
    pos = start or Position()
    epoch, skip, skip_batches = pos.epoch, pos.consumed, pos.in_pool
    size = bucket * batch_size
    while True:
        consumed, produced, pool, pool_start = 0, 0, [], skip

        def emit(pool: list[dict[str, Any]], begin: int, end: int, skip_batches: int):
            order = sorted(range(len(pool)), key=lambda i: (length(pool[i]), i))
            chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
            if shuffle:
                np.random.default_rng([seed, epoch, begin]).shuffle(chunks)
            for j, chunk in enumerate(chunks):
                if j < skip_batches:
                    continue
                b = collate([pool[i] for i in chunk])
                last = j == len(chunks) - 1
                p = Position(epoch, end, 0) if last else Position(epoch, begin, j + 1)
                if b is not None:
                    yield b, p

        for rec in open_epoch(epoch, shuffle):
            consumed += 1
            if consumed <= skip:
                continue
            if not is_heldout(rec["key"], heldout_fraction):
                pool.append(rec)
            if len(pool) == size:
                for item in emit(pool, pool_start, consumed, skip_batches):
                    produced += 1
                    yield item
                pool, pool_start, skip_batches = [], consumed, 0
        if pool:
            for item in emit(pool, pool_start, consumed, skip_batches):
                produced += 1
                yield item
        if produced == 0 and skip == 0:
            raise TrainError(
                f"epoch {epoch} gave no training batch on this rank: every record was held out or skipped "
                f"({collate.skipped} without a usable target or expert); use more data or a smaller "
                "dataset.heldout_fraction"
            )
        epoch, skip, skip_batches = epoch + 1, 0, 0


def scan_targets(
    open_epoch: OpenEpoch, collate: Collator, *, heldout_fraction: float, max_samples: int
) -> dict[str, Any]:
    """Counts (``Collator.counts``) over the first ``max_samples`` training (not held-out) records of an
    unshuffled pass, rendered and fitted as training will; ``collate``'s own counters are left alone."""
    c = Collator(collate.render, collate.tok, collate.experts, collate.max_len, fit_targets=collate.fit_targets)
    n = 0
    if max_samples > 0:
        for rec in open_epoch(0, False):
            if is_heldout(rec["key"], heldout_fraction):
                continue
            n += 1
            feats = rec.get("experts") or {}
            r = c.render(rec) if all(e in feats for e in c.experts) else None
            if r is not None:
                c.encode_row(r)
            if n >= max_samples:
                break
    return {"records": n, **c.counts()}


def target_loss_message(stage: str, counts: dict[str, Any], max_text_tokens: int) -> str | None:
    """A one-line warning when targets lose content to ``max_text_tokens`` (None when nothing is lost)."""
    cut, dropped = counts.get("cut_tasks") or {}, counts.get("dropped_items") or {}
    if not cut and not dropped:
        return None
    n = counts.get("targets", 0)
    parts = []
    if cut:
        parts.append("cut mid-line (content lost), targets per task: " + ", ".join(f"{t} {v}/{n}" for t, v in cut.items()))
    if dropped:
        parts.append(
            f"{counts.get('fitted_targets', 0)}/{n} targets dropped whole items to fit, items per task: "
            + ", ".join(f"{t} {v}" for t, v in dropped.items())
        )
    return (f"stage {stage}: {n} training targets checked against dataset.max_text_tokens={max_text_tokens}: "
            + "; ".join(parts) + " (raise dataset.max_text_tokens or lower dataset.max_objects to keep them)")


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


def derangement(n: int, seed: int = 0) -> list[int]:
    """A seeded permutation with no fixed point (``out[i] != i`` for every i; identity for n < 2).

    Built as one cycle through a shuffled order, so every sample gets another sample's features."""
    if n < 2:
        return list(range(n))
    order = np.random.default_rng(seed).permutation(n)
    out = [0] * n
    for j in range(n):
        out[int(order[j])] = int(order[(j + 1) % n])
    return out


def with_permuted_features(batches: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """The same batches, each sample's expert features (tokens, pooled) replaced by another sample's.

    The control that says whether the visual path is used: texts, targets and keys stay; only which
    image's features precede them changes (a derangement over all samples of all batches, so a batch
    of one is permuted too). A model that ignores the image scores the same on both."""
    sizes = [len(b["keys"]) for b in batches]
    perm = derangement(sum(sizes), seed)
    out = [dict(b, tokens={}, pooled={}) for b in batches]
    for field_ in ("tokens", "pooled"):
        for e in (batches[0][field_] if batches else {}):
            flat = torch.cat([b[field_][e] for b in batches])[perm]
            for o, chunk in zip(out, flat.split(sizes), strict=True):
                o[field_][e] = chunk
    return out
