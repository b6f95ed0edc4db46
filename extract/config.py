"""What an extraction job is asked to do: ``ExtractConfig`` (typed, validated) -> ``ExtractPlan``.

The config is what the CLI and the Python API fill in; ``build()`` validates every field (errors name
the field and the fix), opens the data source, picks the shards, and turns the per-expert settings
(``arch``, ``weights``, ``options``, keyed by expert name or ``"*"`` for all) into one
:class:`~astrea.extract.experts.registry.ExpertConfig` per expert, in stage order.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from astrea.errors import AstreaError
from astrea.schemas.stages import ALL, EXPERT_ORDER
from astrea.extract.experts.registry import ExpertConfig as _Expert

COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class ExtractConfigError(AstreaError, ValueError):
    """A bad ``ExtractConfig`` field; the message names the field (CLI option) and the fix."""


def parse_keyed(values: list[str] | tuple[str, ...] | None, *, field_name: str, experts: list[str]) -> dict[str, str]:
    """``["random", "sam2=/w/sam2.pt"]`` -> ``{"*": "random", "sam2": "/w/sam2.pt"}``.

    A value is per-expert only when the text before the first ``=`` is an expert name, so paths and
    hub ids that contain ``=`` still work as global values.
    """
    out: dict[str, str] = {}
    for v in values or ():
        name, sep, rest = v.partition("=")
        key, val = (name, rest) if sep and name in experts else ("*", v)
        if not val:
            raise ExtractConfigError(f"{field_name}: empty value in {v!r}; write {field_name} EXPERT=VALUE or {field_name} VALUE")
        if key in out:
            raise ExtractConfigError(f"{field_name}: given twice for {'all experts' if key == '*' else key!r}")
        out[key] = val
    return out


def parse_options(values: list[str] | tuple[str, ...] | None, *, experts: list[str]) -> dict[str, dict[str, Any]]:
    """``["grounding_dino.box_threshold=0.3"]`` -> ``{"grounding_dino": {"box_threshold": 0.3}}``.

    Values are read as JSON when they parse (numbers, lists, booleans) and kept as strings otherwise.
    """
    out: dict[str, dict[str, Any]] = {}
    for v in values or ():
        lhs, sep, raw = v.partition("=")
        name, dot, key = lhs.partition(".")
        if not (sep and dot and key):
            raise ExtractConfigError(f"--option {v!r}: write --option EXPERT.KEY=VALUE, e.g. grounding_dino.box_threshold=0.3")
        if name not in experts:
            raise ExtractConfigError(f"--option {v!r}: {name!r} is not one of the experts being extracted {experts}")
        try:
            val: Any = json.loads(raw)
        except json.JSONDecodeError:
            val = raw
        out.setdefault(name, {})[key] = val
    return out


def select_shards(names: list[str], spec: str | None) -> list[str]:
    """Pick shards by ``"00000,00003-00005"`` (names and inclusive ranges), keeping source order."""
    if not spec:
        return list(names)
    wanted: set[str] = set()
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part in names:
            wanted.add(part)
            continue
        lo, dash, hi = part.partition("-")
        if dash and lo and hi:
            if lo.isdigit() and hi.isdigit():
                a, b = int(lo), int(hi)
                hit = [n for n in names if n.isdigit() and a <= int(n) <= b]
            else:
                hit = [n for n in names if lo <= n <= hi]
            if not hit:
                raise ExtractConfigError(f"--shards: range {part!r} matches no shard; {_list_names(names)}")
            wanted.update(hit)
            continue
        raise ExtractConfigError(f"--shards: no shard named {part!r}; {_list_names(names)}")
    return [n for n in names if n in wanted]


def _list_names(names: list[str]) -> str:
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    return f"the source has: {shown or 'no shards'}"


@dataclass
class ExtractConfig:
    """One ``astrea extract`` job. Per-expert dicts are keyed by expert name, ``"*"`` = every expert."""

    experts: list[str]  # expert names, or ["all"]: the stage table's EXPERT_ORDER
    data: str  # catalog name or path of the image source
    store: str | None = None  # default: astrea.config.default_store()
    dataset: str | None = None  # dataset name inside the store; default: the source's name
    source_format: str | None = None  # passed to astrea.data.open_source (None: detect)
    arch: dict[str, str] = field(default_factory=dict)
    weights: dict[str, str] = field(default_factory=dict)  # "random" | hub id | path; default: variant's hub id
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # expert-specific knobs
    small: bool = False  # each expert's DEFAULT_SMALL variant (test/demo size, random weights)
    # The storage settings and the seed default to ExpertConfig's (the one place they are written).
    format: str = _Expert.format
    codec: str = _Expert.codec  # zarr: raw | zstd (smaller by ~8% at float16, ~30x the read CPU)
    dtype: str = _Expert.dtype
    grid: int = _Expert.grid
    compute_dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu
    seed: int = _Expert.seed
    device: str = "auto"  # auto: cuda when the actors get GPUs, else cpu
    batch_size: int = 8  # images per forward on an inference actor
    # Every unit's deadline: a unit fails (and its actor is replaced) when its actor shows no progress
    # for image_timeout_s x batch_size seconds (one window: read, decode, forward, write), so a unit of N
    # images is bounded by about N x image_timeout_s. Generous: a real-size expert on CPU is slow.
    image_timeout_s: float = 120.0
    workers: int | None = None  # inference actors; default: one per GPU of the cluster (1 without GPUs)
    num_gpus: float | None = None  # GPUs per inference actor; default: 1 when the cluster has GPUs, else 0
    cpus_per_task: float = 1.0  # CPUs per read / decode task
    cpus_per_worker: float = 1.0  # CPUs reserved by each inference actor (its torch threads on CPU)
    address: str | None = None  # an existing Ray cluster; None: start a local one for the job
    num_cpus: int | None = None  # size of the local cluster (None: all cores)
    object_store_memory: int | None = None  # bytes, local cluster only
    limit: int | None = None  # whole source shards, in order, until they hold at least this many images
    shards: str | None = None  # "00000,00002-00004"
    prerequisites: dict[str, str] = field(default_factory=dict)  # e.g. {"ram_plus": "ram_plus@1a2b3c4d5e6f"}
    without_prerequisites: bool = False  # run dependent experts on their fallback prompts
    progress: bool = True

    # -- validation ---------------------------------------------------------------------------
    def expert_names(self) -> list[str]:
        from astrea.extract.experts.registry import EXPERTS
        from astrea.registry import UnknownNameError

        if not self.experts:
            raise ExtractConfigError(f"experts: give at least one --expert ({', '.join(EXPERT_ORDER)}, or {ALL})")
        names: list[str] = []
        for e in self.experts:
            for n in (p.strip() for p in str(e).split(",")):
                if n == ALL:
                    names.extend(EXPERT_ORDER)
                elif n not in EXPERTS:
                    raise UnknownNameError("expert", n, [*EXPERTS.names(), ALL])
                elif n:
                    names.append(n)
        # Stage order (coarse -> fine) so prerequisites are extracted before the experts they prompt.
        known = [n for n in EXPERT_ORDER if n in names]
        extra = [n for n in dict.fromkeys(names) if n not in EXPERT_ORDER]
        return known + extra

    def validate(self) -> list[str]:
        from astrea.registry import UnknownNameError
        from astrea.schemas import STORE_FORMATS, STORAGE_DTYPES
        from astrea.schemas.expert_spec import CODECS

        names = self.expert_names()

        def choice(fld: str, value: Any, valid: tuple | list) -> None:
            if value not in valid:
                raise ExtractConfigError(f"{fld}={value!r} is not valid; choose one of {list(valid)}")

        choice("format", self.format, STORE_FORMATS)
        choice("codec", self.codec, CODECS[self.format])
        choice("dtype", self.dtype, STORAGE_DTYPES)
        choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        if not _DEVICE_RE.match(str(self.device)):
            raise ExtractConfigError(f"device={self.device!r} is not valid; use auto, cpu, cuda or cuda:N")
        positive = {"grid": self.grid, "batch_size": self.batch_size, "cpus_per_task": self.cpus_per_task,
                    "cpus_per_worker": self.cpus_per_worker, "image_timeout_s": self.image_timeout_s}
        for fld, v in positive.items():
            if v is None or v <= 0:
                raise ExtractConfigError(f"{fld}={v!r} must be > 0")
        for fld, v in {"workers": self.workers, "limit": self.limit, "num_cpus": self.num_cpus}.items():
            if v is not None and v < 1:
                raise ExtractConfigError(f"{fld}={v!r} must be >= 1 (or left unset)")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ExtractConfigError(f"num_gpus={self.num_gpus!r} must be >= 0")
        if self.device.startswith("cuda") and self.num_gpus == 0:
            raise ExtractConfigError("device=cuda needs GPUs on the inference actors: set --num-gpus 1 (or --device cpu)")
        if not str(self.data).strip():
            raise ExtractConfigError("data: give a catalog name (astrea data ls) or a path with --data")
        from astrea.extract.experts.registry import EXPERTS

        for k, ref in self.prerequisites.items():
            if k not in EXPERTS or ref.split("@", 1)[0] != k:
                raise ExtractConfigError(f"prerequisites: {k!r}={ref!r} should be EXPERT or EXPERT@FINGERPRINT "
                                         f"of one of {EXPERTS.names()} (see astrea shards ls)")
        for fld, d in (("arch", self.arch), ("weights", self.weights), ("options", self.options)):
            for k in d:
                if k != "*" and k not in names:
                    raise ExtractConfigError(
                        f"{fld}: {k!r} is not one of the experts being extracted {names}; "
                        f"add --expert {k} or drop the {fld} entry")
        from astrea.extract.experts.registry import variants

        for n in names:
            arch = self.arch.get(n) or self.arch.get("*")
            if arch is not None:
                valid = list(variants(n))
                if arch not in valid:
                    raise UnknownNameError(f"{n} arch", arch, valid)
        return names

    # -- build --------------------------------------------------------------------------------
    def expert_configs(self, names: list[str], device: str, compute_dtype: str) -> list[Any]:
        from astrea.extract.experts.registry import ExpertConfig, default_variant, variants

        out = []
        for n in names:
            arch = self.arch.get(n) or self.arch.get("*") or default_variant(n, self.small)
            variant = variants(n)[arch]
            # No --weights: the variant's published weights (hub id); test-size variants have none
            # and are random by construction.
            weights = self.weights.get(n) or self.weights.get("*") or variant.default_weights or "random"
            opts = {**self.options.get("*", {}), **self.options.get(n, {})}
            out.append(ExpertConfig(name=n, arch=arch, weights=weights, grid=self.grid, dtype=self.dtype,
                                    format=self.format, codec=self.codec, seed=self.seed, device=device,
                                    compute_dtype=compute_dtype, options=opts))
        return out

    def store_root(self) -> Path:
        from astrea import config as user_config

        return Path(self.store).expanduser() if self.store else user_config.default_store()

    def build(self) -> "ExtractPlan":
        """Validate, open the source, select shards. Cheap: no model is built and Ray is not started."""
        names = self.validate()
        from astrea.data import open_source

        try:
            source = open_source(self.data, format=self.source_format)
            shards = list(source.shards())  # an empty folder is found here (DataError, a ValueError)
        except (FileNotFoundError, KeyError, ValueError) as e:
            msg = e.args[0] if e.args else str(e)
            raise ExtractConfigError(f"data={self.data!r}: {msg}") from None
        by_name = {s.name: s for s in shards}
        selected = select_shards([s.name for s in shards], self.shards)
        counts: dict[str, int | None] = {}
        if self.limit is not None:
            # Units are whole source shards (a committed unit is never partial), so --limit takes whole
            # shards in order until they hold at least `limit` images.
            total, keep = 0, []
            for n in selected:
                if total >= self.limit:
                    break
                c = _count(by_name[n])
                counts[n] = c
                total += c
                keep.append(n)
            selected = keep
        if not selected:
            raise ExtractConfigError(f"data={self.data!r}: no shards to extract (source has {len(shards)} shard(s), "
                                     f"--shards={self.shards!r})")
        dataset = self.dataset or getattr(source, "name", None) or Path(str(self.data)).name
        if not dataset or "/" in dataset or dataset.startswith("."):
            raise ExtractConfigError(f"dataset={dataset!r} is not a usable dataset name; pass --dataset NAME")
        from astrea.shards import Store
        from astrea.shards.errors import StoreError

        try:  # a read-only or mistyped --store fails here, before Ray starts and models load
            Store(self.store_root()).check_writable()
        except StoreError as e:
            raise ExtractConfigError(e.args[0]) from None
        return ExtractPlan(config=self, experts=names, source=source, dataset=dataset, shards=selected,
                           counts={n: counts.get(n, _len_or_none(by_name[n])) for n in selected},
                           store=self.store_root())


def _len_or_none(shard: Any) -> int | None:
    try:
        return len(shard)  # sources that know their size (img2dataset's parquet / stats) say so
    except TypeError:
        return None


def _count(shard: Any) -> int:
    n = _len_or_none(shard)
    if n is not None:
        return n
    return sum(1 for _ in shard)


@dataclass
class ExtractPlan:
    """A validated job: the experts in stage order, the source, the selected shards, the store.

    Run by :func:`astrea.extract.run.run_plan` (this module is below the job and never imports it)."""

    config: ExtractConfig
    experts: list[str]
    source: Any
    dataset: str
    shards: list[str]
    counts: dict[str, int | None]
    store: Path
