"""A writer process for the crash test: writes a unit, then stops at a chosen point and waits to be killed.

    python -m tests.shards.crash_writer STORE FMT UNIT N STOP     STOP: adding | before-stats | pause-before-stats

``pause-before-stats`` is the live-writer case: it stops after the data rename and the index, prints
``stopped``, waits for one line on stdin, then writes its stats and prints ``committed``.

The test writes its reference and rerun units in-process with ``write_unit``, the same rows.
"""

from __future__ import annotations

import sys

from astrea.shards import Store, fsutil
from tests.shards.helpers import features, keys_of, make_spec, write_unit


def _hang(msg: str) -> None:
    print(msg, flush=True)
    sys.stdin.read()  # blocks until the parent kills us (SIGKILL: no cleanup runs)


def main() -> None:
    root, fmt, unit, n, stop = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    edir = Store(root).expert_dir("ds", make_spec(fmt=fmt), create=True)
    if stop in ("before-stats", "pause-before-stats"):
        real = fsutil.write_atomic

        def write_atomic(final, data, **kw):  # stop after the data rename and the index, before stats
            if final.name.endswith("_stats.json"):
                if stop == "before-stats":
                    _hang("stopped")
                print("stopped", flush=True)
                sys.stdin.readline()  # the parent's go-ahead: an event, not a timer
            return real(final, data, **kw)

        fsutil.write_atomic = write_atomic  # type: ignore[assignment]
    if stop == "adding":
        w = edir.open_unit(unit)
        for key in keys_of(unit, n)[: n // 2]:
            t, p, out = features(key, edir.spec)
            w.add(key, t, p, out, caption=f"cap {key}", labels={"k": key})
        _hang("stopped")
    write_unit(edir, unit, n)  # the same rows as the test's reference unit
    print("committed", flush=True)


if __name__ == "__main__":
    main()
