"""`TrainConfig`: every knob of a training run, settable from a YAML/TOML file and overridable per flag.

Precedence (lowest to highest): dataclass defaults < config file < CLI flags / ``overrides``.
The resolved config is written to ``RUN/config.yaml`` so a run can be repeated from that file alone.
Unknown keys are refused with the full dotted name (``optim.lr`` not ``lr``) so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from astrea.schemas.stages import TASKS, default_stage_experts, default_stages, default_target_sources
from astrea.train.errors import TrainError
from astrea.train.instructions import InstructionConfig
from astrea.train.moco import MoCoConfig
from astrea.train.moe import MoEConfig
from astrea.train.targets import TARGET_FORMATS

# The training compute dtype's words (torch's dtype names, as in `astrea extract --compute-dtype`).
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
# `precision` (before it was named compute_dtype) -> its words in compute_dtype
_LEGACY_PRECISION = {"auto": "auto", "fp32": "float32", "bf16": "bfloat16"}


@dataclass
class LLMConfig:
    # "tiny-random" builds a small Llama from a config with random weights (tests, demo, CPU);
    # anything else is a transformers hub id or a local directory.
    name: str = "tiny-random"
    freeze: bool = True
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # tiny-random architecture (ignored for a real LLM)
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 128
    max_positions: int = 2048
    seed: int = 0
    # tiny-random only: text-only warm-up on the training split's target texts before the first stage
    # (astrea.train.text_warmup); 0 keeps the LLM random. A hub/local LLM is never warmed up.
    text_warmup_steps: int = 400  # at most; fewer when text_warmup_epochs passes over the texts end sooner
    text_warmup_epochs: float = 12.0
    text_warmup_lr: float = 3e-3
    text_warmup_batch: int = 16
    text_warmup_texts: int = 4096  # distinct (prompt, target) pairs read at most
    # tiny-random only: "fitted" trains a byte-level BPE of at most tokenizer_vocab entries on the warm-up's
    # texts (training split) before the LLM is built; "bytes" is one token per byte. Without warm-up texts
    # (text_warmup_steps: 0) the tokenizer is bytes either way; run.json records which one was used.
    tokenizer: str = "fitted"
    tokenizer_vocab: int = 1024


@dataclass
class ProjectorConfig:
    # LLaVA-1.5's "mlp2x_gelu": Linear(D_e, H) -> GELU -> Linear(H, H).
    layers: int = 2


@dataclass
class ResidualConfig:
    enabled: bool = True
    p: float = 0.5  # Bernoulli probability p_res of each earlier expert's residual (Eq. 3)
    gamma: float = 1.0  # initial value of the learnable weight gamma (Eq. 3)
    # "skip": f' = f + attn (METHOD.md); "attn": f' = attn, the paper's printed Eq. 2.
    reading: str = "skip"
    heads: int = 1
    # What eval (held-out L_reg, `astrea eval`, the main stage's eval) uses in place of the Bernoulli draw:
    # "all": w_i = 1, every residual connection added (Eq. 3's p_i in {0, 1}; the training computation of
    # the draw with all context); "expectation": w_i = p fed into Q (the pre-issue-13 reading, a query
    # scale training never produced); "average": the output averaged over the 2^n draws, E_w[f'(w)].
    # Training is the same for all three. Measured: docs/train.md "Residual attention: what it is for".
    at_eval: str = "all"


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.05
    warmup: float = 0.15  # fraction of each stage's steps
    schedule: str = "cosine"  # cosine | constant
    grad_accum: int = 1
    clip_grad: float = 1.0  # 0 disables


@dataclass
class DataConfig:
    heldout_fraction: float = 0.05  # deterministic hash of the key: same split in every run
    heldout_max: int = 64  # held-out samples scored per evaluation
    shuffle: bool = True
    max_text_tokens: int = 384  # prompt + target + EOS; see fit_targets, then cut and counted
    max_objects: int = 8  # boxes / masks rendered per image
    # box/mask text (train/targets.py): "compact" = 0..99 integer bins, masks as box + hex occupancy
    # grid; "decimal" = the pre-issue-13 text (2-decimal boxes, convex-hull polygons)
    target_format: str = "compact"
    mask_grid: int = 4  # compact masks: g x g cells over the mask's box (g * ceil(g/4) hex digits)
    box_decimals: int = 2  # decimal format only
    polygon_points: int = 8  # decimal format only
    # drop whole items (lowest-ranked objects/tags of the longest line) until the target fits, instead
    # of cutting it mid-line; both are counted (summary, eval)
    fit_targets: bool = True
    target_check: int = 64  # training targets scanned per rank at each stage start; a warning says what is lost
    prefetch: int = 2  # batches read ahead by a background thread (0: read inline)
    # A row whose bytes fail their checksum (or hold inf/NaN) stops the run; true skips and counts it.
    skip_damaged: bool = False


@dataclass
class MainConfig:
    """What the main stage teaches and trains besides the MoE (``moe``) and MoCo (``moco``) sections."""

    # one task per sample, drawn from these (Fig. 2 measures routing per task type)
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    train_projectors: bool = False  # true unfreezes the pre-alignment projectors and residual attentions

    def validate(self) -> None:
        from astrea.registry import check_choice

        if not self.tasks:
            raise ValueError("main.tasks is empty; name at least one of " + ", ".join(TASKS))
        for t in self.tasks:
            check_choice("main.tasks", t, TASKS)


# The ablation shorthands, one table for the `astrea train` flags and the sweep's variant fields:
# shorthand -> (dotted TrainConfig field, whether the shorthand's boolean is the field's negation).
SHORTHANDS: dict[str, tuple[str, bool]] = {
    "top_k": ("moe.top_k", False),  # --top-k K (Tab. 3)
    "no_moco": ("moco.enabled", True),  # --no-moco (Tab. 4)
    "no_residual": ("residual.enabled", True),  # --no-residual (Tab. 4)
}


def shorthand_overrides(values: dict[str, Any], *, where: str = "config") -> dict[str, Any]:
    """Dotted overrides for the given shorthands (None: not given), e.g. ``{"top_k": 1}`` -> ``{"moe.top_k": 1}``."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        if value is None:
            continue
        if name not in SHORTHANDS:
            raise TrainError(f"{where}: unknown shorthand {name!r}; valid: {sorted(SHORTHANDS)}")
        key, negate = SHORTHANDS[name]
        out[key] = (not _coerce(bool, value, name, where)) if negate else value
    return out


@dataclass
class TrainConfig:
    store: str = ""
    data: str = ""
    out: str = ""
    # The defaults come from the stage table (astrea.schemas.stages): the paper's stage order, the store
    # expert serving each pre-alignment stage (Tab. 5: any expert in the store may be put instead, e.g.
    # ``caption: clip``) and the expert whose stored predictions become each target text.
    stages: list[str] = field(default_factory=default_stages)
    stage_experts: dict[str, str] = field(default_factory=default_stage_experts)
    target_sources: dict[str, str] = field(default_factory=default_target_sources)
    # expert name -> fingerprint the run must read; empty: whatever the store holds (recorded in RUN)
    expected_fingerprints: dict[str, str] = field(default_factory=dict)
    llm: LLMConfig = field(default_factory=LLMConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    residual: ResidualConfig = field(default_factory=ResidualConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dataset: DataConfig = field(default_factory=DataConfig)
    # the main stage's instruction data (LLaVA-format files joined with the store by image key)
    instructions: InstructionConfig = field(default_factory=InstructionConfig)
    steps: int = 200  # optimizer steps per stage
    stage_steps: dict[str, int] = field(default_factory=dict)  # per-stage override of `steps`
    batch_size: int = 8  # per process, per micro-batch
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto (bfloat16 autocast on GPU, float32 on CPU) | float32 | bfloat16: the words `astrea extract
    # --compute-dtype` uses (configs written before say `precision: auto|bf16|fp32`, read with a warning)
    compute_dtype: str = "auto"
    compile: bool = False
    save_every: int = 100  # steps; 0: only at stage ends
    keep_checkpoints: int = 2  # step checkpoints kept (stage-end weights in RUN/stages/ are always kept)
    eval_every: int = 0  # steps; 0: held-out L_reg only before and after each stage
    log_every: int = 1
    progress: bool = True
    resume: bool = False
    init_from: str = ""  # RUN dir or checkpoint dir whose Astrea weights initialise this run
    workers: int = 1  # >1: Ray Train workers
    address: str = ""  # Ray cluster address ("auto", "ray://host:10001"); empty: local
    # the main stage (paper Sec. 3.2): MoE fusion (Eq. 9-10), MoCo (Eq. 5-8, 11), tasks; docs/main_stage.md
    moe: MoEConfig = field(default_factory=MoEConfig)
    moco: MoCoConfig = field(default_factory=MoCoConfig)
    main: MainConfig = field(default_factory=MainConfig)

    def steps_for(self, stage: str) -> int:
        return int(self.stage_steps.get(stage, self.steps))

    def validate(self) -> None:
        from astrea.registry import check_choice

        try:
            check_choice("residual.reading", self.residual.reading, ("skip", "attn"))
            check_choice("residual.at_eval", self.residual.at_eval, ("expectation", "average", "all"))
            check_choice("optim.schedule", self.optim.schedule, ("cosine", "constant"))
            check_choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
            check_choice("dataset.target_format", self.dataset.target_format, TARGET_FORMATS)
        except ValueError as e:
            raise TrainError(str(e)) from None
        self.validate_main()
        checks = [
            ("store", bool(self.store), "give the feature store (--from-shards STORE)"),
            ("data", bool(self.data), "give the dataset name in the store (--data NAME)"),
            ("out", bool(self.out), "give the run directory (--out RUN)"),
            ("stages", bool(self.stages), "name at least one stage"),
            ("steps", self.steps >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("optim.grad_accum", self.optim.grad_accum >= 1, "must be >= 1"),
            ("optim.lr", self.optim.lr > 0, "must be > 0"),
            ("optim.warmup", 0.0 <= self.optim.warmup < 1.0, "must be in [0, 1)"),
            ("residual.p", 0.0 <= self.residual.p <= 1.0, "must be in [0, 1]"),
            ("dataset.heldout_fraction", 0.0 <= self.dataset.heldout_fraction < 1.0, "must be in [0, 1)"),
            ("dataset.mask_grid", 1 <= self.dataset.mask_grid <= 16, "must be in 1..16"),
            ("dataset.max_text_tokens", self.dataset.max_text_tokens >= 2, "must be >= 2"),
            ("dataset.target_check", self.dataset.target_check >= 0, "must be >= 0"),
            ("workers", self.workers >= 1, "must be >= 1"),
            ("llm.text_warmup_steps", self.llm.text_warmup_steps >= 0, "must be >= 0 (0: no warm-up)"),
            ("llm.text_warmup_lr", self.llm.text_warmup_lr > 0, "must be > 0"),
            ("llm.text_warmup_epochs", self.llm.text_warmup_epochs > 0, "must be > 0"),
            ("llm.text_warmup_batch", self.llm.text_warmup_batch >= 1, "must be >= 1"),
            ("llm.text_warmup_texts", self.llm.text_warmup_texts >= 1, "must be >= 1"),
            ("llm.tokenizer", self.llm.tokenizer in ("fitted", "bytes"), "must be 'fitted' or 'bytes'"),
            ("llm.tokenizer_vocab", self.llm.tokenizer_vocab >= 260, "must be >= 260 (4 specials + 256 bytes)"),
        ]
        for name, ok, fix in checks:
            if not ok:
                raise TrainError(f"config field {name}={_get(self, name)!r}: {fix}")
        self.instructions.validate()
        if self.instructions.files and "main" not in self.stages:
            raise TrainError(f"config field instructions.files is set but stages={self.stages} has no main stage; "
                             "instruction data trains the main stage (add main to --stages)")
        if len(set(self.stages)) != len(self.stages):
            raise TrainError(f"config field stages={self.stages}: a stage is listed twice")
        out, store = Path(self.out).expanduser().resolve(), Path(self.store).expanduser().resolve()
        if out == store or out.is_relative_to(store):
            # A run directory inside the store would be listed as a dataset (and its checkpoints
            # walked by `astrea shards`); runs and features live apart.
            raise TrainError(f"config field out={self.out!r} is inside the feature store {self.store}; "
                             "put the run directory elsewhere (--out RUN outside --from-shards)")

    def validate_main(self, experts: list[str] | None = None) -> None:
        """The main stage's sections (``moe``, ``moco``, ``main``); ``experts`` bounds ``moe.top_k``."""
        try:
            self.moe.validate(experts)
            self.moco.validate()
            self.main.validate()
        except ValueError as e:
            raise TrainError(f"config field {e}") from None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["optim"]["betas"] = list(self.optim.betas)
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> "TrainConfig":
        return _build(cls, _legacy_precision(_legacy_extras(d, source), source), prefix="", source=source)

    @classmethod
    def load(
        cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None
    ) -> "TrainConfig":
        """Defaults < file (``.yaml``/``.yml``/``.toml``) < ``overrides`` (dotted keys, e.g. ``optim.lr``)."""
        data: dict[str, Any] = {}
        if path:
            data = read_config_file(path)
        for key, value in (overrides or {}).items():
            if value is None:
                continue
            _set_dotted(data, key, value)
        return cls.from_dict(data, source=str(path) if path else "config")


def read_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise TrainError(f"config file {p} does not exist")
    text = p.read_text()
    try:
        if p.suffix == ".toml":
            data = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml", ".json"):
            data = yaml.safe_load(text) or {}
        else:
            raise TrainError(f"config file {p}: unknown extension {p.suffix!r}; use .yaml, .yml or .toml")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        raise TrainError(f"config file {p} does not parse: {e}") from None
    if not isinstance(data, dict):
        raise TrainError(f"config file {p}: expected a mapping at the top level")
    return data


# `extras` (before the main stage had typed sections): legacy key -> typed field. Runs' config.yaml files,
# user configs and sweep files that still say `extras: {top_k: 1, moe: {...}}` load through this.
_LEGACY_EXTRAS = {"top_k": "moe.top_k", "mu": "moco.mu", "tasks": "main.tasks",
                  "train_projectors": "main.train_projectors"}
_LEGACY_SECTIONS = ("moe", "moco")


def _legacy_extras(d: dict[str, Any], source: str) -> dict[str, Any]:
    """``d`` with a legacy ``extras`` mapping moved onto the typed fields (one FutureWarning saying so)."""
    if not isinstance(d, dict) or "extras" not in d:
        return d
    d = dict(d)
    extras = d.pop("extras")
    if extras in (None, {}):  # every config.yaml written before had `extras: {}`
        return d
    if not isinstance(extras, dict):
        raise TrainError(f"{source}: config field extras must be a mapping, got {extras!r}")
    moved: dict[str, Any] = {}
    for k, v in extras.items():
        if k in _LEGACY_SECTIONS:
            if not isinstance(v, dict):
                raise TrainError(f"{source}: config field extras.{k} must be a mapping, got {v!r}")
            moved.update({f"{k}.{sk}": sv for sk, sv in v.items()})
        elif k == "no_moco":
            moved.update(shorthand_overrides({k: v}, where=f"{source}: config field extras"))
        elif k in _LEGACY_EXTRAS:
            moved[_LEGACY_EXTRAS[k]] = v
        else:
            valid = sorted(["extras." + n for n in (*_LEGACY_EXTRAS, *_LEGACY_SECTIONS, "no_moco")])
            raise TrainError(f"{source}: unknown config field(s) ['extras.{k}']; valid fields here: {valid}")
    for key, value in moved.items():
        section, name = key.split(".", 1)
        have = d.get(section)
        if have is not None and not isinstance(have, dict):
            raise TrainError(f"{source}: config field {section} must be a mapping, got {have!r}")
        if have and name in have and have[name] != value:
            raise TrainError(f"{source}: config gives both {key}={have[name]!r} and the legacy extras form of it "
                             f"({value!r}); keep {key} only")
        d[section] = {**(have or {}), name: value}
    warnings.warn(f"{source}: config field `extras` is deprecated; read as {moved} (write these dotted fields "
                  "instead; docs/main_stage.md)", FutureWarning, stacklevel=3)
    return d


def _legacy_precision(d: dict[str, Any], source: str) -> dict[str, Any]:
    """``d`` with a legacy ``precision`` (auto | bf16 | fp32) read as ``compute_dtype`` (one FutureWarning).

    Every config.yaml written before the rename holds ``precision``; resuming or evaluating such a run
    reads it here."""
    if not isinstance(d, dict) or "precision" not in d:
        return d
    d = dict(d)
    old = d.pop("precision")
    if old not in _LEGACY_PRECISION:
        raise TrainError(f"{source}: config field precision={old!r} (the old name of compute_dtype) is not valid; "
                         f"write compute_dtype: one of {list(COMPUTE_DTYPES)}")
    new = _LEGACY_PRECISION[old]
    if "compute_dtype" in d and d["compute_dtype"] != new:
        raise TrainError(f"{source}: config gives both compute_dtype={d['compute_dtype']!r} and the legacy "
                         f"precision={old!r} ({new!r}); keep compute_dtype only")
    d["compute_dtype"] = new
    warnings.warn(f"{source}: config field `precision: {old}` is deprecated; read as compute_dtype: {new}",
                  FutureWarning, stacklevel=3)
    return d


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        d = d.setdefault(part, {})
        if not isinstance(d, dict):
            raise TrainError(f"override {key}: {part} is not a section")
    d[parts[-1]] = value


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _build(cls: type, d: dict[str, Any], *, prefix: str, source: str) -> Any:
    if not isinstance(d, dict):
        raise TrainError(f"{source}: {prefix.rstrip('.') or 'top level'} must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise TrainError(
            f"{source}: unknown config field(s) {[prefix + u for u in unknown]}; "
            f"valid fields here: {sorted(prefix + f for f in fields)}"
        )
    kwargs = {}
    for name, value in d.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name, source)
        f = fields[name]
        if typing.get_origin(hints[name]) is dict and f.default_factory is not dataclasses.MISSING:
            # Maps with defaults (stage_experts, target_sources) are merged: naming one stage's expert
            # keeps the others.
            kwargs[name] = {**f.default_factory(), **kwargs[name]}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, name: str, source: str) -> Any:
    """Check and convert one value to its declared type; strings from the CLI are parsed."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=name + ".", source=source)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = TrainError(f"{source}: config field {name}={value!r} is not a valid {_type_name(tp)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise bad
    if tp in (int, float):
        if isinstance(value, bool):
            raise bad
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise bad from None
        if tp is int and isinstance(value, float) and value != out:
            raise bad
        return out
    if tp is str:
        if not isinstance(value, str | int | float):
            raise bad
        return str(value)
    if tp is Any:
        return value
    if origin in (list, tuple):
        if isinstance(value, str):  # "a,b,c" from a CLI flag
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise bad
        if origin is tuple:
            if len(value) != len(args):
                raise bad
            return tuple(_coerce(a, v, name, source) for a, v in zip(args, value, strict=True))
        return [_coerce(args[0], v, name, source) for v in value]
    if origin is dict:
        if isinstance(value, str):  # "caption=clip,classification=ram" from a CLI flag
            pairs = [p for p in value.split(",") if p.strip()]
            if not all("=" in p for p in pairs):
                raise bad
            value = dict(p.split("=", 1) for p in pairs)
        if not isinstance(value, dict):
            raise bad
        return {str(k).strip(): _coerce(args[1], v, f"{name}.{k}", source) for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        for a in args:
            try:
                return _coerce(a, value, name, source)
            except TrainError:
                continue
        raise bad
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))
