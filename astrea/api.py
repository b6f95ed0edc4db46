"""The Python API: what the CLI commands do, as functions for notebooks and scripts. It calls the same
run functions the CLI calls (the CLI does not go through this module).

```python
import astrea.api as astrea

src = astrea.sample_dataset("data/sample")                     # astrea data sample
report = astrea.extract(experts=["siglip", "ram_plus"], data=src, store="store",
                        small=True, weights={"*": "random"})     # astrea extract
store = astrea.open_store("store")                             # astrea shards ls / info
for rec in astrea.joined("store", "sample", ["siglip", "ram_plus"], shuffle=False):
    rec["experts"]["siglip"]["tokens"]                         # [G*G, D] numpy, stored dtype
summary = astrea.train(store="store", data="sample", out="runs/a", stages=["caption"], steps=10)
run = astrea.load_run("runs/a")                                # config + model with trained weights
out = astrea.generate("runs/it", "What colour is it?", key="000010003")  # astrea generate; out["answer"]
```

Imports are lazy: ``import astrea.api`` loads neither torch nor Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def sample_dataset(out: str | Path | None = None, **kwargs: Any) -> Path:
    """Write (or reuse) the embedded sample dataset in img2dataset's format; returns its directory."""
    from astrea.data.sample import ensure_sample

    return Path(ensure_sample(out, **kwargs))


def open_source(name_or_path: str | Path, format: str | None = None, **opts: Any) -> Any:
    """A data source by catalog name or path: ``.shards()`` -> shards yielding ``Sample``s."""
    from astrea.data import open_source as _open

    return _open(str(name_or_path), format=format, **opts)


def extract(**config: Any) -> dict[str, Any]:
    """Run the extraction job; keyword arguments are :class:`astrea.extract.ExtractConfig` fields."""
    from astrea.extract import ExtractConfig
    from astrea.extract import run as _run

    if "data" in config:
        config["data"] = str(config["data"])
    return _run(ExtractConfig(**config))


def open_store(root: str | Path) -> Any:
    """The feature store at ``root`` (:class:`astrea.shards.Store`)."""
    from astrea.shards import Store

    return Store(root)


def joined(store: str | Path | Any, dataset: str, experts: list[str], **kwargs: Any) -> Any:
    """Iterate several experts of one dataset joined by key (:class:`astrea.shards.JoinedDataset`)."""
    from astrea.shards import JoinedDataset

    return JoinedDataset(store, dataset, experts, **kwargs)


def train(config_file: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """Train; ``overrides`` are TrainConfig fields (dotted keys for nested ones, e.g. ``**{"optim.lr": 1e-4}``)."""
    from astrea.train import TrainConfig
    from astrea.train import run as _run

    return _run(TrainConfig.load(config_file, overrides))


def load_run(run: str | Path, **kwargs: Any) -> Any:
    """A finished run rebuilt: ``.cfg``, ``.model`` (AstreaModel with trained weights), ``.stages``."""
    from astrea.train.eval import load_run as _load

    return _load(run, **kwargs)


def generate(run: str | Path, prompt: str, *, key: str = "", image: str | Path = "", on_text: Any = None,
             **kwargs: Any) -> dict[str, Any]:
    """One answer about one image (a store ``key`` or an ``image`` file, experts run online); ``kwargs`` are
    :class:`astrea.generate.GenerateConfig` fields (max_new_tokens, temperature, top_p, seed, data, ...).
    ``on_text(piece)`` receives the answer as it is generated. Returns ``{"answer", "source", ...}``."""
    from astrea.generate import GenerateConfig, run_generate

    return run_generate(GenerateConfig(run=str(run), prompt=prompt, key=key, image=str(image) if image else "",
                                       **kwargs), on_text=on_text)


def evaluate(run: str | Path, **kwargs: Any) -> dict[str, Any]:
    from astrea.train.eval import EvalConfig
    from astrea.train.eval import evaluate as _eval

    return _eval(EvalConfig(run=str(run), **kwargs))


def report(run: str | Path, **kwargs: Any) -> Path:
    from astrea.train.report import report as _report

    return _report(run, **kwargs)
