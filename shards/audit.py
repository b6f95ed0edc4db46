"""What ``astrea shards ls|info|verify`` report: plain data here, formatting in ``astrea.cli.shards``.

``verify`` trusts nothing it can recompute: it re-hashes the parquet index against the stats file and
every stored row (tokens, pooled, outputs) against the index's checksum, and reads each container
end to end, so a flipped byte, a truncated tar or a deleted file is found.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from astrea.shards import fsutil
from astrea.shards.store import Damaged, ExpertDir, Store


@dataclass
class UnitInfo:
    unit: str
    ok: int = 0
    failed: int = 0
    bytes: int = 0
    failures_by_reason: dict[str, int] = field(default_factory=dict)


@dataclass
class ExpertInfo:
    dataset: str
    dir: str  # EXPERT@FINGERPRINT
    path: str
    error: str | None = None  # expert.json unreadable or invalid
    expert: str = ""
    fingerprint: str = ""
    arch: str = ""
    weights: str = ""
    random_weights: bool = False
    dtype: str = ""
    format: str = ""
    grid: int = 0
    token_dim: int = 0
    pooled_dim: int = 0
    converted_from: dict = field(default_factory=dict)  # set by `astrea shards convert`
    units: list[UnitInfo] = field(default_factory=list)
    uncommitted: list[str] = field(default_factory=list)  # data or index without a stats file
    temp_files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return sum(u.ok for u in self.units)

    @property
    def failed(self) -> int:
        return sum(u.failed for u in self.units)

    @property
    def bytes(self) -> int:
        return sum(u.bytes for u in self.units)

    @property
    def bytes_per_image(self) -> float:
        return self.bytes / self.ok if self.ok else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(ok=self.ok, failed=self.failed, bytes=self.bytes, bytes_per_image=round(self.bytes_per_image, 1))
        return d


def _select(store: Store, dataset: str | None) -> list[str]:
    if not store.root.is_dir():
        raise FileNotFoundError(f"feature store {store.root} does not exist; give the store path "
                                "(astrea shards ls STORE) or set `store:` in $ASTREA_HOME/config.yaml")
    if dataset is None:
        return store.datasets()
    store.expert_dirs(dataset)  # raises with the list of datasets when unknown
    return [dataset]


def _matches(path: Path, expert: str | None) -> bool:
    if expert is None:
        return True
    name, _, fp = expert.partition("@")
    e, _, f = path.name.partition("@")
    return e == name and f.startswith(fp)


def scan(store: Store, dataset: str | None = None, expert: str | None = None) -> list[ExpertInfo]:
    """One ExpertInfo per expert directory; a broken one is reported (``error``), not raised."""
    out: list[ExpertInfo] = []
    for ds in _select(store, dataset):
        for path in store.expert_dirs(ds):
            if not _matches(path, expert):
                continue
            info = ExpertInfo(dataset=ds, dir=path.name, path=str(path))
            out.append(info)
            try:
                edir = ExpertDir.open(path)
            except Exception as e:  # noqa: BLE001 - reported per directory
                info.error = e.args[0] if e.args else str(e)
                continue
            s = edir.spec
            info.expert, info.fingerprint, info.arch, info.weights = s.expert, s.fingerprint(), s.arch, s.weights
            info.random_weights, info.dtype, info.format = s.random_weights, s.dtype, s.format
            info.grid, info.token_dim, info.pooled_dim = s.grid, s.token_dim, s.pooled_dim
            info.converted_from = dict(s.converted_from)
            info.temp_files = [p.name for p in edir.temp_files()]
            for u in edir.units():
                if not edir.stats_path(u).exists():
                    info.uncommitted.append(u)
                    continue
                ui = UnitInfo(u)
                try:
                    st = json.loads(edir.stats_path(u).read_text())
                    ui.ok, ui.failed, ui.bytes = int(st["ok"]), int(st["failed"]), int(st["bytes"])
                    ui.failures_by_reason = dict(st.get("failures_by_reason", {}))
                except Exception:  # noqa: BLE001 - verify says what is wrong with it
                    pass
                info.units.append(ui)
    if expert is not None and not out:
        from astrea.registry import UnknownNameError

        names = sorted({p.name for ds in _select(store, dataset) for p in store.expert_dirs(ds)})
        raise UnknownNameError("expert", expert, names)
    return out


@dataclass
class Problem:
    kind: str  # corrupt | missing | uncommitted | invalid
    path: str
    detail: str
    repaired: str | None = None  # with repair: what was done about it


@dataclass
class VerifyReport:
    experts: int = 0
    units_checked: int = 0
    rows_checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)  # with repair: folders the damaged units went to

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "experts": self.experts, "units_checked": self.units_checked,
                "rows_checked": self.rows_checked, "problems": [asdict(p) for p in self.problems],
                "quarantined": self.quarantined}


def verify_unit(edir: ExpertDir, unit: str) -> tuple[int, list[Problem]]:
    """Recompute everything of one unit that has a stats file. -> (rows checked, problems)."""
    probs: list[Problem] = []
    for p in (edir.data_path(unit), edir.index_path(unit)):
        if not p.exists():
            probs.append(Problem("missing", str(p), "its stats file says committed but the file is gone"))
    if probs:
        return 0, probs
    sp = edir.stats_path(unit)
    try:
        stats = edir.stats(unit)
    except Exception as e:  # noqa: BLE001
        return 0, [Problem("corrupt", str(sp), e.args[0] if e.args else str(e))]
    ip = edir.index_path(unit)
    digest = hashlib.sha256(ip.read_bytes()).hexdigest()
    if stats.get("index_sha256") not in (None, digest):
        probs.append(Problem("corrupt", str(ip), "sha256 differs from the one recorded in its stats file"))
        return 0, probs
    rows = ok = 0
    damaged: list[str] = []
    try:
        # check_finite off: inf/NaN the expert produced are stored as produced and counted in the stats;
        # verify looks for bytes that changed after the commit.
        for row, stored in edir.iter_stored(unit, on_damaged="mark", check_finite=False):
            rows += 1
            if stored is None:
                continue
            ok += 1
            if isinstance(stored, Damaged):
                damaged.append(f"key {row['key']!r} (row {row['index']}): {stored.reason}")
    except Exception as e:  # noqa: BLE001 - a container that cannot be read to the end is corrupt
        msg = e.args[0] if e.args and isinstance(e.args[0], str) else f"{type(e).__name__}: {e}"
        probs.append(Problem("corrupt", str(edir.data_path(unit)), f"unreadable after {rows} row(s): {msg}"))
        return rows, probs
    if damaged:  # one problem per unit: a damaged chunk spoils every row it holds
        more = f"; and {len(damaged) - 3} more" if len(damaged) > 3 else ""
        probs.append(Problem("corrupt", str(edir.data_path(unit)),
                             f"{len(damaged)} damaged row(s): {'; '.join(damaged[:3])}{more}"))
    if rows != stats.get("images") or ok != stats.get("ok"):
        probs.append(Problem("corrupt", str(sp), f"stats say {stats.get('images')} keys / {stats.get('ok')} ok, "
                                                 f"the unit holds {rows} / {ok}"))
    return rows, probs


def verify(store: Store, dataset: str | None = None, expert: str | None = None, *, repair: bool = False) -> VerifyReport:
    """Check every unit; with ``repair``, move each corrupt or missing unit aside (``ExpertDir.quarantine``:
    the next extraction redoes it) and clean up what crashed writers left (``cleanup_temp``). Units a
    live writer holds are never touched. The report still lists what was found, with what was done."""
    rep = VerifyReport()
    for info in scan(store, dataset, expert):
        rep.experts += 1
        if info.error:
            rep.problems.append(Problem("invalid", str(Path(info.path) / "expert.json"), info.error))
            continue
        edir = ExpertDir.open(info.path)
        found: list[Problem] = []
        leftovers: list[tuple[Problem, Any]] = []  # (problem, "is it still there?")
        for u in info.uncommitted:
            found.append(Problem("uncommitted", str(edir.path / u),
                                 "data or index without a stats file (a writer crashed or is running); "
                                 "the next extraction run cleans it up and redoes the unit"))
            leftovers.append((found[-1], lambda u=u: u in edir.units()))
        for name in info.temp_files:
            t = fsutil.parse_temp(name)
            live = t is not None and t.owner_alive()
            found.append(Problem("uncommitted", str(edir.path / name),
                                 "temporary file of a running writer" if live else
                                 "temporary file of a crashed writer; removed by the next extraction run"))
            leftovers.append((found[-1], lambda p=edir.path / name: p.exists()))
        if repair and leftovers:
            edir.cleanup_temp()
            for p, still in leftovers:
                p.repaired = "left alone: a live writer holds the unit" if still() else "removed"
        for ui in info.units:
            rows, probs = verify_unit(edir, ui.unit)
            rep.units_checked += 1
            rep.rows_checked += rows
            if repair and any(p.kind in ("corrupt", "missing") for p in probs):
                why = "; ".join(f"{p.kind}: {p.path}: {p.detail}" for p in probs)
                q = edir.quarantine(ui.unit, f"astrea shards verify --repair: {why}")
                for p in probs:
                    p.repaired = (f"unit moved to {q}; the next `astrea extract` redoes it" if q is not None
                                  else "left alone: a live writer holds the unit")
                if q is not None:
                    rep.quarantined.append(str(q))
            found.extend(probs)
        rep.problems.extend(found)
    if rep.experts == 0:  # nothing checked is not "OK": a wrong path would pass silently
        rep.problems.append(Problem("invalid", str(store.root), "no expert directory (DATASET/EXPERT@FINGERPRINT) "
                                    "found: not an astrea store, or an empty one"))
    return rep
