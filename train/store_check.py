"""Before any step: does the store hold every expert the run's stages need, with the expected
fingerprints, on one common token grid? One error naming what is missing and how to fix it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from astrea.train.errors import TrainError


def resolve_experts(
    store_root: str, dataset: str, needed: list[str], expected: dict[str, str], *, needed_by: dict[str, str]
) -> dict[str, Any]:
    """name -> ExpertSpec for each needed expert; raises TrainError on the first problem (all listed)."""
    from astrea.shards import Store

    if not Path(store_root).is_dir():
        raise TrainError(f"feature store {store_root} does not exist; run `astrea extract` first or fix --from-shards")
    store = Store(store_root)
    datasets = list(store.datasets())
    if dataset not in datasets:
        raise TrainError(
            f"dataset {dataset!r} is not in the store {store_root}; it holds {sorted(datasets) or 'no datasets'}"
        )
    # By directory name: a broken or stray EXPERT@FP directory only matters to a run that needs that
    # expert (its resolve below reports it), not to every run on the dataset.
    available = {p.name.split("@", 1)[0] for p in store.expert_dirs(dataset)}
    problems = []
    specs: dict[str, Any] = {}
    for name in needed:
        want = expected.get(name)
        query = f"{name}@{want}" if want else name
        if name not in available:
            problems.append(
                f"expert {name!r} (needed by {needed_by.get(name, 'the run')}) is not in {store_root}/{dataset}; "
                f"it holds {sorted(available) or 'no experts'}. Extract it (astrea extract --expert {name}) "
                f"or pick another expert for that stage (stage_experts / target_sources)"
            )
            continue
        try:
            edir = store.resolve(dataset, query)
        except Exception as e:  # the store's own message says which fingerprints exist
            problems.append(f"expert {query}: {e}")
            continue
        spec = _spec(edir)
        if want and spec.fingerprint() != want:
            problems.append(
                f"expert {name}: the run expects fingerprint {want}, the store holds {spec.fingerprint()} "
                "(different weights, preprocessing or grid); re-extract or update expected_fingerprints"
            )
            continue
        specs[name] = spec
    if problems:
        raise TrainError("the store cannot serve this run:\n  - " + "\n  - ".join(problems))
    grids = {n: s.grid for n, s in specs.items()}
    if len(set(grids.values())) > 1:
        raise TrainError(
            f"experts are on different token grids {grids}; the residual attention and the MoE mix tokens "
            "position by position, so extract them all with the same --grid"
        )
    return specs


def _spec(edir: Any) -> Any:
    spec = getattr(edir, "spec", None)
    if spec is not None:
        return spec
    from astrea.schemas import ExpertSpec

    path = Path(edir.path) / "expert.json"
    return ExpertSpec.from_json(path.read_text(), source=str(path))
