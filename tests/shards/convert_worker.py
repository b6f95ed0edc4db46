"""A converter process for the kill test: converts, then stops at a chosen row and waits to be killed.

    python -m tests.shards.convert_worker SRC_STORE OUT_STORE DTYPE FORMAT UNIT ROW

After handing row ROW of unit UNIT to the writer it prints ``stopped`` and blocks on stdin: the parent
SIGKILLs it there (an event, not a timer), mid-unit, with earlier units committed and this one's temp
container on disk.
"""

from __future__ import annotations

import sys

from astrea.shards.convert import ConvertConfig


def main() -> None:
    src, out, dtype, fmt, unit, row = sys.argv[1:7]

    def on_row(u: str, i: int) -> None:
        if u == unit and i == int(row):
            print("stopped", flush=True)
            sys.stdin.read()  # until killed

    ConvertConfig(store=src, dataset="ds", expert="siglip", dtype=dtype, format=fmt, out=out).build().run(on_row)
    print("finished", flush=True)


if __name__ == "__main__":
    main()
