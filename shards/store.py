"""The store: ``STORE/DATASET/EXPERT@FINGERPRINT/`` directories of immutable units.

```
STORE/DATASET/EXPERT@FINGERPRINT/expert.json        the full ExpertSpec + created_by
STORE/DATASET/EXPERT@FINGERPRINT/NNNNN.zarr|.tar    data: ok keys only, source order
STORE/DATASET/EXPERT@FINGERPRINT/NNNNN.parquet      index: one row per key, failed ones included
STORE/DATASET/EXPERT@FINGERPRINT/NNNNN_stats.json   written last: present <=> committed
```
Same spec -> same fingerprint -> same directory, so every experiment reuses finished units; a spec that
differs in anything that changes the features gets its own directory.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from astrea.registry import UnknownNameError
from astrea.schemas.expert_spec import ExpertSpec, SpecError
from astrea.schemas.unit import INDEX_SCHEMA, STATUS_OK, UNIT_SCHEMA_VERSION, check_row
from astrea.shards import fsutil
from astrea.shards.dtypes import from_storage, nonfinite_in_storage
from astrea.shards.errors import DamagedRowError, StoreError, UnitBusyError, UnitCommittedError
from astrea.shards.formats import get_format
from astrea.shards.writer import UnitWriter, created_by

SPEC_FILE = "expert.json"
STATS_SUFFIX = "_stats.json"
INDEX_SUFFIX = ".parquet"
STALE_AFTER_S = 6 * 3600  # a temp file from another host is assumed dead after this long
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME_OK.match(name):
        raise StoreError(f"{kind} name {name!r} is not valid: use letters, digits, '_' and '-' "
                         "(it becomes a file name in the store)")
    return name


STATUS_DAMAGED = "damaged"  # Record.status of a row a skipping reader could not use (never in an index)
NONFINITE = "non-finite values"


@dataclass(frozen=True)
class Damaged:
    """What ``iter_stored(on_damaged="mark")`` yields in place of a row's arrays when the row is unusable."""

    reason: str


@dataclass
class Record:
    """One key of one unit. Failed keys have ``status='failed'``, ``error`` set and no arrays."""

    key: str
    status: str
    tokens: np.ndarray | None
    pooled: np.ndarray | None
    outputs: dict[str, Any] | None
    caption: str | None
    labels: dict[str, Any] | None
    error: str | None
    unit: str = ""
    index: int | None = None


class ExpertDir:
    """One expert's features for one dataset: ``STORE/DATASET/EXPERT@FINGERPRINT``."""

    def __init__(self, path: Path, spec: ExpertSpec, dataset: str):
        self.path, self.spec, self.dataset = Path(path), spec, dataset

    # -- opening ----------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, expect: ExpertSpec | None = None) -> ExpertDir:
        """Open an existing directory, validating its expert.json (schema version, fingerprint, name)."""
        path = Path(path)
        spec_path = path / SPEC_FILE
        if not spec_path.is_file():
            raise StoreError(f"{spec_path}: missing; {path} is not an expert directory of an astrea store "
                             "(or its writer crashed before writing the spec: delete the directory)")
        spec = ExpertSpec.from_json(spec_path.read_text(), source=str(spec_path))
        if path.name != spec.dirname:
            raise SpecError(f"{spec_path}: the directory is named {path.name!r} but its spec hashes to "
                            f"{spec.dirname!r}; the directory was renamed or the spec edited. Nothing was "
                            "changed; move it back or re-extract")
        if expect is not None and expect.hashed_fields() != spec.hashed_fields():
            a, b = expect.hashed_fields(), spec.hashed_fields()
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise SpecError(f"{spec_path}: does not match the spec being written (fields differ: {diff}); "
                            "nothing was overwritten")
        return cls(path, spec, path.parent.name)

    # -- names ------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def expert(self) -> str:
        return self.spec.expert

    @property
    def fingerprint(self) -> str:
        return self.spec.fingerprint()

    def data_path(self, unit: str) -> Path:
        return self.path / f"{unit}{get_format(self.spec.format).suffix}"

    def index_path(self, unit: str) -> Path:
        return self.path / f"{unit}{INDEX_SUFFIX}"

    def stats_path(self, unit: str) -> Path:
        return self.path / f"{unit}{STATS_SUFFIX}"

    def __repr__(self) -> str:
        return f"ExpertDir({str(self.path)!r})"

    # -- units ------------------------------------------------------------------------------------
    def units(self) -> list[str]:
        """Every unit with any final-named file (committed or not), sorted."""
        suffix = get_format(self.spec.format).suffix
        found = set()
        for p in self.path.iterdir():
            n = p.name
            if n.startswith("."):
                continue
            for s in (STATS_SUFFIX, INDEX_SUFFIX, suffix):
                if n.endswith(s) and len(n) > len(s):
                    found.add(n[: -len(s)])
        return sorted(found)

    def is_committed(self, unit: str) -> bool:
        return (self.stats_path(unit).is_file() and self.index_path(unit).is_file()
                and self.data_path(unit).exists())

    def committed_units(self) -> list[str]:
        return [u for u in self.units() if self.is_committed(u)]

    def temp_files(self) -> list[Path]:
        return sorted(p for p in self.path.iterdir() if fsutil.parse_temp(p.name) is not None)

    def unit_lock(self, unit: str) -> fsutil.UnitLock:
        return fsutil.UnitLock(fsutil.lock_path(self.path, unit))

    def cleanup_temp(self, *, stale_after_s: float = STALE_AFTER_S) -> int:
        """Remove what crashed writers left: temp files whose writer is gone, data or index files of
        units that never got their stats file, and stale lock files; quarantine units whose stats file
        is there but whose data or index is gone (see ``quarantine``), so a rerun writes them again.
        Returns how many paths were removed or moved.

        A unit whose lock a live writer holds (``open_unit`` to the end of ``commit``) is never touched,
        whatever its files look like: between its data rename and its stats file it has no stats yet.
        Temp files are also kept while their pid is alive on this host, and, from another host (its
        process cannot be checked from here), until older than ``stale_after_s``.
        """
        removed = 0
        temps: dict[str, list[Path]] = {}
        for p in self.temp_files():
            t = fsutil.parse_temp(p.name)
            assert t is not None
            temps.setdefault(t.unit, []).append(p)
        locks = {p.name[1:-len(fsutil.LOCK_SUFFIX)] for p in self.path.iterdir()
                 if p.name.startswith(".") and p.name.endswith(fsutil.LOCK_SUFFIX) and fsutil.TMP_MARK not in p.name}
        for u in sorted(set(temps) | set(self.units()) | locks):
            if u not in temps and u not in locks and self.is_committed(u):
                continue
            lock = self.unit_lock(u)
            if not lock.acquire():
                continue  # a live writer owns it
            try:
                live_temp = False  # a writer the lock cannot see (another host over NFS): hands off
                for p in temps.get(u, []):
                    t = fsutil.parse_temp(p.name)
                    alive = t.owner_alive() if t is not None else None
                    if alive is None:
                        alive = (time.time() - p.lstat().st_mtime) < stale_after_s
                    if alive:
                        live_temp = True
                        continue
                    fsutil.remove(p)
                    removed += 1
                if live_temp or self.is_committed(u):
                    pass
                elif self.stats_path(u).exists():
                    removed += self._quarantine_locked(u, "stats file present, data or index gone (found by cleanup)")
                else:
                    for p in (self.data_path(u), self.index_path(u)):
                        if p.exists():
                            fsutil.remove(p)
                            removed += 1
            finally:
                lock.release()  # also removes a crashed writer's lock file
        if removed:
            fsutil.fsync_path(self.path)
        return removed

    QUARANTINE = ".quarantine"

    def quarantine(self, unit: str, why: str) -> Path | None:
        """Move a unit's stats, index and data aside to ``.quarantine/UNIT-<time>-<pid>/`` (with ``why.txt``),
        so the unit is no longer committed and the next extraction writes it again; nothing is deleted.
        Returns that folder; None when a live writer holds the unit (left alone) or it has no files."""
        _check_name("unit", unit)
        with self.unit_lock(unit) as lock:
            if not lock.acquire():
                return None
            return self._quarantine_dir(unit, why)

    def _quarantine_locked(self, unit: str, why: str) -> int:
        q = self._quarantine_dir(unit, why)
        return sum(1 for p in q.iterdir() if p.name != "why.txt") if q is not None else 0

    def _quarantine_dir(self, unit: str, why: str) -> Path | None:
        parts = [p for p in (self.stats_path(unit), self.index_path(unit), self.data_path(unit)) if p.exists()]
        if not parts:
            return None
        q = self.path / self.QUARANTINE / f"{unit}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        n = 1
        while q.exists():
            q, n = q.with_name(f"{q.name.rsplit('~', 1)[0]}~{n}"), n + 1
        q.mkdir(parents=True)
        (q / "why.txt").write_text(why.rstrip() + "\n")
        for p in parts:  # stats first: from its rename on, no reader takes the unit for committed
            os.rename(p, q / p.name)
        fsutil.fsync_path(q)
        fsutil.fsync_path(self.path)
        return q

    def open_unit(self, unit: str) -> UnitWriter:
        """A writer for ``unit`` in this expert's format. Refuses a committed unit or one being written.

        The writer holds the unit's lock until its commit ends (or it aborts). A unit left with a stats
        file but without its data or index is quarantined first, so that it can be written again."""
        _check_name("unit", unit)
        lock = self.unit_lock(unit)
        if not lock.acquire():
            raise UnitBusyError(f"{lock.path}: unit {unit} is being written by {_lock_owner(lock.path)}; "
                                "one writer per unit")
        try:
            if self.is_committed(unit):
                raise UnitCommittedError(f"{self.stats_path(unit)}: unit {unit} is already committed; committed "
                                         "units are immutable (delete the unit's files by hand to redo it)")
            for p in self.temp_files():
                t = fsutil.parse_temp(p.name)
                if t is not None and t.unit == unit and t.pid != os.getpid() and t.owner_alive():
                    raise UnitBusyError(f"{p}: unit {unit} is being written by process {t.pid}; one writer per unit")
            if self.stats_path(unit).exists():
                self._quarantine_dir(unit, "stats file present, data or index gone (found when opening the unit)")
            w = get_format(self.spec.format).writer(self, unit)
        except BaseException:
            lock.release()
            raise
        w._lock = lock
        return w

    # -- reading ----------------------------------------------------------------------------------
    def _require_committed(self, unit: str) -> None:
        if not self.is_committed(unit):
            have = self.committed_units()
            raise StoreError(f"{self.path}: unit {unit!r} is not committed (no complete "
                             f"{unit}{STATS_SUFFIX} + data + index); committed units: "
                             f"{', '.join(have[:10]) + (' ...' if len(have) > 10 else '') or 'none'}")

    def stats(self, unit: str) -> dict[str, Any]:
        self._require_committed(unit)
        p = self.stats_path(unit)
        try:
            stats = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreError(f"{p}: not valid JSON ({e}); the file is corrupt") from None
        if stats.get("schema_version") != UNIT_SCHEMA_VERSION:
            raise StoreError(f"{p}: unit schema version {stats.get('schema_version')}, this astrea reads "
                             f"{UNIT_SCHEMA_VERSION}; use a matching astrea release or re-extract")
        return stats

    def read_index(self, unit: str) -> pa.Table:
        self._require_committed(unit)
        p = self.index_path(unit)
        try:
            table = pq.read_table(p)
        except (pa.ArrowException, OSError) as e:
            raise StoreError(f"{p}: unreadable parquet index ({e}); run `astrea shards verify`") from None
        version = (table.schema.metadata or {}).get(b"astrea.unit_schema_version", b"?").decode()
        if version != str(UNIT_SCHEMA_VERSION):
            raise StoreError(f"{p}: unit schema version {version}, this astrea reads {UNIT_SCHEMA_VERSION}")
        missing = [n for n in INDEX_SCHEMA.names if n not in table.column_names]
        if missing:
            raise StoreError(f"{p}: index lacks column(s) {missing}")
        return table

    def unit_problem(self, unit: str) -> str | None:
        """Why ``unit`` cannot be read (None when it is committed): what a reader that leaves it out says."""
        stats, index, data = (self.stats_path(unit).is_file(), self.index_path(unit).is_file(),
                              self.data_path(unit).exists())
        if stats and index and data:
            return None
        if not (stats or index or data):
            return "not extracted"
        if not stats:
            return "not committed (data or index without a stats file: a writer crashed or is still running)"
        gone = [n for n, there in (("data", data), ("index", index)) if not there]
        return (f"MISSING {' and '.join(gone)} (its stats file says committed); "
                f"repair: {self.repair_command()}, then rerun astrea extract")

    def repair_command(self) -> str:
        return f"astrea shards verify {self.path.parent.parent} --dataset {self.dataset} --expert {self.name} --repair"

    def damaged_error(self, unit: str, key: str, reason: str) -> DamagedRowError:
        if reason.startswith(NONFINITE):
            fix = ("the expert produced them (stats nonfinite_rows); re-extract with --dtype bfloat16 or float32, "
                   "whose range holds them")
        else:
            fix = f"repair: {self.repair_command()}, then rerun astrea extract (it redoes the unit)"
        where = self.data_path(unit)
        return DamagedRowError(f"{where}: damaged row: unit {unit}, key {key!r}: {reason}; {fix}",
                               path=str(where), unit=unit, key=key, reason=reason)

    def _may_hold_nonfinite(self, unit: str) -> bool:
        # A row whose checksum matches holds exactly the bytes the writer counted: when the writer saw no
        # inf/NaN in the unit, no row can hold one and the per-row scan is skipped.
        try:
            return int(self.stats(unit).get("nonfinite_rows", 1)) != 0
        except (StoreError, TypeError, ValueError):
            return True

    def iter_stored(self, unit: str, *, block_rows: int | None = None, verify: bool = True,
                    check_finite: bool = True, on_damaged: str = "raise",
                    ) -> Iterator[tuple[dict[str, Any], tuple[np.ndarray, np.ndarray, str] | Damaged | None]]:
        """(index row, (tokens, pooled, outputs_json) in storage dtype, or None for failed keys), source order.

        ``verify``: every ok row is checked against its index checksum, and, when the unit's stats count
        any inf/NaN (``check_finite``), for finiteness. A row that fails, or that the container cannot give
        back (undecodable chunk, truncated tar, data and index out of step), is damaged: ``on_damaged=
        "raise"`` raises :class:`DamagedRowError` naming unit and key; ``"mark"`` yields ``Damaged(reason)``
        in place of its arrays and goes on with the next row.
        """
        if on_damaged not in ("raise", "mark"):
            raise ValueError(f"on_damaged={on_damaged!r}: use 'raise' or 'mark'")
        table = self.read_index(unit)
        rows = table.select(["key", "status", "error", "caption", "labels", "index", "checksum"]).to_pylist()
        finite = verify and check_finite and self._may_hold_nonfinite(unit)
        dtype = self.spec.dtype
        first = next((r["checksum"] for r in rows if r["status"] == STATUS_OK and r["checksum"]), None)
        if verify and first is not None:
            try:  # a checksum this environment cannot compute: one error naming the unit, before any row
                check_row(first, np.zeros(0, np.uint8), np.zeros(0, np.uint8), "")
            except ValueError as e:
                raise StoreError(f"{self.index_path(unit)}: {e}") from None
        data = get_format(self.spec.format).iter_rows(self.data_path(unit), block_rows)
        broken: str | None = None  # the container cannot be read past this point: every later row is damaged
        for row in rows:
            if row["status"] != STATUS_OK:
                yield row, None
                continue
            reason = broken
            if broken is None:
                try:
                    i, key, t, p, out = next(data)
                except StopIteration:
                    reason = broken = "the container ends before this key (truncated)"
                except Exception as e:  # tarfile / zarr / numpy errors on damaged bytes
                    reason = broken = f"unreadable ({_describe(e)})"
                else:
                    if i != row["index"] or key != row["key"]:
                        reason = broken = (f"the container holds key {key!r} at row {i} where the index expects "
                                           f"this key at row {row['index']} (data and index disagree)")
                    elif isinstance(t, Exception):  # a format that isolates an undecodable chunk
                        reason = f"unreadable ({_describe(t)})"
                    elif verify and not check_row(row["checksum"], t, p, out):
                        reason = "checksum mismatch (the stored bytes differ from what was written)"
                    elif finite and (nonfinite_in_storage(t, dtype) or nonfinite_in_storage(p, dtype)):
                        reason = f"{NONFINITE} (inf/NaN in the stored features)"
            if reason is None:
                yield row, (t, p, out)
                continue
            if on_damaged == "raise":
                raise self.damaged_error(unit, row["key"], reason)
            yield row, Damaged(reason)
        if broken is None:
            try:
                extra = next(data, None)
            except Exception as e:  # noqa: BLE001 - damage past the last indexed row touches no row
                extra, broken = None, _describe(e)
            if extra is not None and on_damaged == "raise":
                raise StoreError(f"{self.data_path(unit)}: holds key {extra[1]!r} beyond the keys its index lists; "
                                 f"repair: {self.repair_command()}")

    def iter_unit(self, unit: str, *, include_failed: bool = True, block_rows: int | None = None,
                  verify: bool = True, on_damaged: str = "raise") -> Iterator[Record]:
        """Every key of a committed unit in source order. Arrays come back in the storage dtype
        (float16 / float32), bfloat16 as float32; failed keys (``include_failed``) carry no arrays.

        Rows are verified (see ``iter_stored``); ``on_damaged="skip"`` yields a damaged row as a Record with
        ``status="damaged"``, ``error`` saying why and no arrays, instead of raising."""
        if on_damaged not in ("raise", "skip"):
            raise ValueError(f"on_damaged={on_damaged!r}: use 'raise' or 'skip'")
        dtype = self.spec.dtype
        mode = "mark" if on_damaged == "skip" else "raise"
        for row, stored in self.iter_stored(unit, block_rows=block_rows, verify=verify, on_damaged=mode):
            labels = json.loads(row["labels"]) if row["labels"] else None
            if isinstance(stored, Damaged):
                yield Record(row["key"], STATUS_DAMAGED, None, None, None, row["caption"], labels,
                             stored.reason, unit, row["index"])
                continue
            if stored is None:
                if include_failed:
                    yield Record(row["key"], row["status"], None, None, None, row["caption"], labels,
                                 row["error"], unit, None)
                continue
            t, p, out = stored
            yield Record(row["key"], STATUS_OK, from_storage(t, dtype), from_storage(p, dtype), json.loads(out),
                         row["caption"], labels, None, unit, row["index"])


def _lock_owner(path: Path) -> str:
    try:
        host, pid = path.read_text().split()
        return f"process {pid} (host {host})"
    except (OSError, ValueError):
        return "another live process"


def _describe(e: BaseException) -> str:
    detail = e.args[0] if e.args and isinstance(e.args[0], str) else ""
    detail = " ".join(detail.split())[:300]  # one line: the reason ends up in a one-line error
    return f"{type(e).__name__}: {detail}" if detail else type(e).__name__


class Store:
    """A feature store rooted at ``root`` (created on first write)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def check_writable(self, flag: str = "--store") -> None:
        """Before any work: the root is a directory this process can create files in, or can be created.
        One StoreError naming the path otherwise (a file, a read-only filesystem, no permission). Creates
        nothing: a job that fails later for another reason leaves no empty store behind."""
        import errno

        root = self.root
        if root.exists() and not root.is_dir():
            raise StoreError(f"{flag} {root}: is a file, not a directory; point {flag} at a directory "
                             "(created when missing)")
        try:
            if root.is_dir():
                probe = fsutil.temp_path(root / ".write-probe")
                with open(probe, "xb"):
                    pass
                probe.unlink()
                return
            parent = root.parent
            while not parent.exists() and parent != parent.parent:
                parent = parent.parent
            if not parent.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(parent))
            # access(2) reports a read-only filesystem (EROFS) even to root, without writing anything
            if not os.access(parent, os.W_OK | os.X_OK):
                ro = os.statvfs(parent).f_flag & os.ST_RDONLY
                code = errno.EROFS if ro else errno.EACCES
                raise OSError(code, os.strerror(code), str(parent))
        except OSError as e:
            where = e.filename or root
            raise StoreError(f"{flag} {root}: cannot write there ({e.strerror or type(e).__name__}: {where}); "
                             f"the store must be writable: fix its permissions or mount, or point {flag} "
                             "elsewhere") from None

    def datasets(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def _dataset_dir(self, dataset: str) -> Path:
        _check_name("dataset", dataset)  # "../x" would look outside the store
        d = self.root / dataset
        if not d.is_dir():
            if not self.root.is_dir():
                raise FileNotFoundError(f"feature store {self.root} does not exist; run `astrea extract` first "
                                        "or point --store at an existing store")
            raise UnknownNameError("dataset", dataset, self.datasets())
        return d

    def expert_dirs(self, dataset: str) -> list[Path]:
        """Expert directory paths of a dataset, without validating them (see ``experts``)."""
        d = self._dataset_dir(dataset)
        return sorted(p for p in d.iterdir() if p.is_dir() and "@" in p.name and not p.name.startswith("."))

    def experts(self, dataset: str) -> list[ExpertDir]:
        """Every expert directory of a dataset, validated (a broken expert.json raises, naming the file)."""
        return [ExpertDir.open(p) for p in self.expert_dirs(dataset)]

    def expert_dir(self, dataset: str, spec: ExpertSpec, *, create: bool = False) -> ExpertDir:
        """``STORE/DATASET/EXPERT@FP`` for ``spec``; with ``create``, made (expert.json written) if absent.
        An existing directory is validated against ``spec``; nothing in it is ever overwritten."""
        _check_name("dataset", dataset)
        path = self.root / dataset / spec.dirname
        if not (path / SPEC_FILE).exists():
            if not create:
                if not (self.root / dataset).is_dir():
                    self._dataset_dir(dataset)
                raise FileNotFoundError(f"{path}: no such expert directory (expert {spec.expert} with fingerprint "
                                        f"{spec.fingerprint()} was never extracted for dataset {dataset!r})")
            path.mkdir(parents=True, exist_ok=True)
            doc = spec.to_dict()
            doc["created_by"] = created_by()
            try:
                fsutil.write_atomic(path / SPEC_FILE, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
            except FileExistsError:
                pass  # another writer created it meanwhile: validate theirs below
            fsutil.fsync_path(path.parent)
        return ExpertDir.open(path, expect=spec)

    def resolve(self, dataset: str, ref: str) -> ExpertDir:
        """``"sam2"`` (the only sam2 directory) or ``"sam2@FINGERPRINT"`` (a prefix is enough) -> ExpertDir.

        Directories without an ``expert.json`` (a stray ``x@y`` folder, a writer that died before its spec)
        are not expert directories and do not count."""
        paths = [p for p in self.expert_dirs(dataset) if (p / SPEC_FILE).is_file()]
        name, _, fp = ref.partition("@")
        by_name = [p for p in paths if p.name.split("@", 1)[0] == name]
        if not by_name:
            raise UnknownNameError("expert", name, sorted({p.name.split("@", 1)[0] for p in paths}))
        if fp:
            hits = [p for p in by_name if p.name.split("@", 1)[1].startswith(fp)]
            if not hits:
                raise UnknownNameError(f"{name} fingerprint", fp, [p.name.split("@", 1)[1] for p in by_name])
            by_name = hits
        if len(by_name) > 1:
            raise StoreError(f"{self.root / dataset}: {ref!r} is ambiguous, it matches "
                             f"{', '.join(p.name for p in by_name)}; name one as EXPERT@FINGERPRINT")
        return ExpertDir.open(by_name[0])
