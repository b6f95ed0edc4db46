"""`astrea shards estimate` against a real store: for every expert directory of a dataset, the estimate made
from its expert.json alone (images and images per unit taken from the store) next to the bytes and files
on disk.

    .venv/bin/python benchmarks/estimate.py STORE [--dataset sample]

Rows: the default assumptions (outputs JSON per expert from ``OUTPUTS_BYTES``, zarr arrays uncompressed),
then the same with the outputs bytes and the zarr compression ratio measured on the store itself, to show
which part of the gap each assumption makes.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def on_disk(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".") and ".quarantine" not in p.parts]
    return sum(p.stat().st_size for p in files), len(files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--dataset", default="sample")
    a = ap.parse_args()
    from astrea.shards import Store
    from astrea.extract.estimate import EstimateConfig

    store = Store(a.store)
    print("| expert | dtype / format | images (ok) | per unit | on disk | files | estimate (defaults) | ratio | "
          "estimate (measured outputs + zstd ratio) | ratio | files estimated |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for edir in store.experts(a.dataset):
        units = edir.committed_units()
        stats = [edir.stats(u) for u in units]
        ok = sum(s["ok"] for s in stats)
        per_unit = max(s["ok"] for s in stats)
        real, files = on_disk(edir.path)
        base = EstimateConfig(specs=[edir.path], images=ok, images_per_unit=per_unit)
        est = base.build().run()
        # what the assumptions would have to be: outputs text and zstd ratio measured on this store
        outputs = sum(len(r.outputs and __import__("json").dumps(r.outputs, separators=(",", ":")) or "{}")
                      for u in units for r in edir.iter_unit(u) if r.status == "ok") / max(1, ok)
        ratio = None
        if edir.spec.format == "zarr" and edir.spec.codec == "zstd":
            arrays = [p for n in ("tokens", "pooled") for p in edir.path.glob(f"*.zarr/{n}/c/**/*") if p.is_file()]
            parts = est.experts[0].parts
            ratio = (sum(p.stat().st_size for p in arrays) - parts["shard_index"]) / (parts["tokens"] + parts["pooled"])
        base.outputs_bytes = {edir.expert: int(outputs)}
        base.compression = ratio
        est2 = base.build().run()
        print(f"| {edir.expert} | {edir.spec.dtype} / {edir.spec.format} | {ok} | {per_unit} | {real:,} | {files} | "
              f"{est.bytes:,} | {est.bytes / real:.3f} | {est2.bytes:,} | {est2.bytes / real:.3f} | {est.files} |")


if __name__ == "__main__":
    main()
