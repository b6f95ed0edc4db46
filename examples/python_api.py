"""The Python API end to end, at toy size (random weights): what README's "Python API" section shows.

    python examples/python_api.py [WORKDIR]

Runs in about a minute on 2 CPU cores. tests/test_api_example.py executes this file.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import astrea.api as astrea


def main(work: Path) -> dict:
    # 1. a small dataset in img2dataset's format (photos shipped with scikit-image + generated scenes)
    data = astrea.sample_dataset(work / "sample", images=6, shards=2, seed=0)

    # 2. two frozen experts (small architectures, RANDOM weights) into a feature store, on local Ray
    report = astrea.extract(experts=["siglip", "ram_plus"], data=data, store=work / "store", dataset="sample",
                            small=True, weights={"*": "random"}, grid=4, batch_size=4, progress=False)
    print(f"extracted: {report['images_ok']} ok, {report['images_failed']} failed ({report['status']})")

    # 3. stream the store: both experts joined by key, failed keys skipped and counted
    ds = astrea.joined(work / "store", "sample", ["siglip", "ram_plus"], shuffle=False)
    first = next(iter(ds))
    shapes = {name: e["tokens"].shape for name, e in first["experts"].items()}
    print(f"record {first['key']}: caption={first['caption']!r}, tags={first['experts']['ram_plus']['outputs']['tags'][:3]}, token shapes {shapes}")

    # 4. train the caption stage against a tiny random LLM, then rebuild the model from the run
    summary = astrea.train(store=str(work / "store"), data="sample", out=str(work / "run"), stages=["caption"],
                           steps=2, batch_size=2, **{"llm.name": "tiny-random"})
    run = astrea.load_run(work / "run")
    print(f"trained {summary['global_steps']} steps; model experts: {sorted(run.model.projectors)}")
    return {"report": report, "record": first, "summary": summary, "run": run}


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="astrea_api_")))
