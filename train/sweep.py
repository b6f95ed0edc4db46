"""`astrea sweep CONFIG`: train + evaluate a list of variants on one feature store, one comparison table.

CONFIG (YAML)::

    base: train.yaml            # optional TrainConfig file (relative to this file); else fields in `set`
    set:                        # optional overrides for every variant (dotted TrainConfig fields)
      store: ./store
      data: sample
      steps: 50
    out: runs/sweep             # one run directory per variant: OUT/<name>
    eval: {max_samples: 128}    # optional EvalConfig fields
    variants:
      - name: paper             # nothing changed
      - {name: top1, top_k: 1}                      # Tab. 3
      - {name: no-moco, no_moco: true}              # Tab. 4
      - {name: no-residual, no_residual: true}      # Tab. 4
      - {name: clip, stage_experts: {caption: clip}}  # Tab. 5 (merged into the base mapping)
      - {name: reversed, stage_order: reversed}     # Tab. 6; also all-at-once (Cap->All) or a list
      - {name: lr2, set: {optim.lr: 2.0e-4}}        # any other field

Variants run one after another; every one reads the same store and dataset (a variant may not change
them). A variant whose RUN already has ``eval.json`` from the same resolved config is reused; one with
checkpoints but no evaluation resumes. A failing variant is recorded in the table with its error and the
sweep goes on. Writes ``OUT/sweep.md``, ``OUT/sweep.csv`` and ``OUT/sweep.json``.
"""

from __future__ import annotations

import csv
import json
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from astrea.errors import AstreaError
from astrea.schemas.stages import ALL, MAIN, PRE_ALIGNMENT_STAGES, TASKS
from astrea.train.config import SHORTHANDS as ABLATIONS, TrainConfig, shorthand_overrides
from astrea.train.errors import TrainError

# the ablation shorthands (top_k, no_moco, no_residual) are the `astrea train` flags' table
SHORTHANDS = (*ABLATIONS, "stage_order", "stage_experts", "set")
ORDERS = ("default", "reversed", "all-at-once")
TOP_KEYS = ("base", "set", "out", "eval", "variants")


@dataclass
class SweepVariant:
    name: str
    spec: dict[str, Any] = field(default_factory=dict)  # the shorthand fields as written

    def describe(self) -> str:
        if not self.spec:
            return "(base)"
        return ", ".join(f"{k}={json.dumps(v, sort_keys=True)}" for k, v in self.spec.items())


@dataclass
class SweepSpec:
    base: Path | None
    common: dict[str, Any]
    out: Path
    eval: dict[str, Any]
    variants: list[SweepVariant]


def load_sweep(path: str | Path, *, overrides: dict[str, Any] | None = None) -> SweepSpec:
    p = Path(path)
    if not p.is_file():
        raise TrainError(f"sweep config {p} does not exist")
    try:
        doc = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise TrainError(f"sweep config {p} does not parse: {e}") from None
    if not isinstance(doc, dict):
        raise TrainError(f"sweep config {p}: expected a mapping with {list(TOP_KEYS)}")
    unknown = sorted(set(doc) - set(TOP_KEYS))
    if unknown:
        raise TrainError(f"sweep config {p}: unknown key(s) {unknown}; valid keys: {list(TOP_KEYS)}")
    base = None
    if doc.get("base"):
        base = Path(doc["base"])
        base = base if base.is_absolute() else p.parent / base
        if not base.is_file():
            raise TrainError(f"sweep config {p}: base config {base} does not exist")
    common = dict(doc.get("set") or {})
    ov = {k: v for k, v in (overrides or {}).items() if v is not None}
    cli_out = ov.pop("out", None)
    common.update(ov)
    set_out = common.pop("out", None)
    if cli_out:  # the command line wins, relative to the working directory
        out_p = Path(cli_out)
    elif doc.get("out") or set_out:  # the file's paths are relative to the file
        out_p = Path(doc.get("out") or set_out)
        out_p = out_p if out_p.is_absolute() else p.parent / out_p
    else:
        raise TrainError(f"sweep config {p}: give `out:` (the directory that gets one run per variant) or --out")
    raw = doc.get("variants")
    if not isinstance(raw, list) or not raw:
        raise TrainError(f"sweep config {p}: `variants:` must be a non-empty list")
    variants, seen = [], set()
    for i, v in enumerate(raw):
        if isinstance(v, str):
            v = {"name": v}
        if not isinstance(v, dict) or not v.get("name"):
            raise TrainError(f"sweep config {p}: variants[{i}] needs a `name`")
        name = str(v["name"])
        if name in seen or "/" in name or name.startswith("."):
            raise TrainError(f"sweep config {p}: variant name {name!r} is repeated or not a plain directory name")
        seen.add(name)
        spec = {k: val for k, val in v.items() if k != "name"}
        bad = sorted(set(spec) - set(SHORTHANDS))
        if bad:
            raise TrainError(
                f"sweep config {p}: variant {name!r} has unknown field(s) {bad}; use {list(SHORTHANDS)} "
                "(any other TrainConfig field goes under `set:` as a dotted name)"
            )
        for k in ("store", "data", "out"):
            if k in (spec.get("set") or {}):
                raise TrainError(f"sweep config {p}: variant {name!r} sets {k}; a sweep compares variants on one store")
        variants.append(SweepVariant(name, spec))
    return SweepSpec(base, common, out_p, dict(doc.get("eval") or {}), variants)


def variant_config(spec: SweepSpec, v: SweepVariant) -> TrainConfig:
    """The resolved TrainConfig of one variant (base < sweep `set` < the variant's fields)."""
    base_cfg = TrainConfig.load(spec.base, spec.common)
    ov: dict[str, Any] = dict(spec.common)
    s = v.spec
    ov.update(shorthand_overrides({k: s[k] for k in ABLATIONS if k in s}, where=f"variant {v.name}"))
    if "stage_experts" in s:
        if not isinstance(s["stage_experts"], dict):
            raise TrainError(f"variant {v.name}: stage_experts must be a mapping stage -> expert, e.g. {{caption: clip}}")
        ov["stage_experts"] = {**base_cfg.stage_experts, **s["stage_experts"]}
    if "stage_order" in s:
        ov["stages"] = stage_order(base_cfg.stages, s["stage_order"], v.name)
    for k, val in (s.get("set") or {}).items():
        ov[k] = val
    ov["out"] = str(spec.out / v.name)
    cfg = TrainConfig.load(spec.base, ov)
    cfg.validate()
    return cfg


def stage_order(base: list[str], order: Any, name: str) -> list[str]:
    tail = [MAIN] if MAIN in base else []
    pre = [s for s in base if s in PRE_ALIGNMENT_STAGES] or list(PRE_ALIGNMENT_STAGES)
    if isinstance(order, list):
        return [str(x) for x in order]
    if order == "default":
        return pre + tail
    if order == "reversed":
        return pre[::-1] + tail
    if order in ("all-at-once", "cap-all"):  # Tab. 6 "Cap->All": caption first, then the rest at once
        return [PRE_ALIGNMENT_STAGES[0], ALL] + tail
    raise TrainError(f"variant {name}: stage_order={order!r} is not valid; use one of {list(ORDERS)} or a list of stages")


# -- the table --------------------------------------------------------------------------------------
COLUMNS = [
    ("variant", "variant"), ("changes", "changes"), ("status", "status"),
    ("L_reg main", "lreg_main"), *((f"L_reg {t}", f"lreg_{t}") for t in TASKS),
    ("L_reg last pre-align", "lreg_prealign"),
    ("i2t R@1", "i2t_r1"), ("i2t R@5", "i2t_r5"), ("t2i R@1", "t2i_r1"), ("t2i R@5", "t2i_r5"),
    ("router entropy", "entropy"), ("load balance", "load_balance"),
]


def table_row(v: SweepVariant, status: str, m: dict[str, Any] | None) -> dict[str, Any]:
    row: dict[str, Any] = {"variant": v.name, "changes": v.describe(), "status": status}
    if not m:
        return row
    h = m.get("heldout", {})
    row["lreg_main"] = h.get("main_mean")
    for t in TASKS:
        row[f"lreg_{t}"] = h.get("main", {}).get(t)
    stages = h.get("stages", {})
    row["lreg_prealign"] = list(stages.values())[-1] if stages else None
    r = m.get("retrieval") or {}
    row["i2t_r1"] = r.get("image_to_text", {}).get("R@1")
    row["i2t_r5"] = r.get("image_to_text", {}).get("R@5")
    row["t2i_r1"] = r.get("text_to_image", {}).get("R@1")
    row["t2i_r5"] = r.get("text_to_image", {}).get("R@5")
    ro = (m.get("routing") or {}).get("overall") or {}
    row["entropy"] = ro.get("entropy")
    row["load_balance"] = ro.get("load_balance")
    return row


def write_table(rows: list[dict[str, Any]], out: Path, notes: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([c for c, _ in COLUMNS])
        for r in rows:
            w.writerow(["" if r.get(k) is None else r.get(k) for _, k in COLUMNS])

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v).replace("|", "\\|")

    lines = ["# Sweep", ""]
    lines += [f"> {n}" for n in notes]
    lines += ["", "| " + " | ".join(c for c, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r.get(k)) for _, k in COLUMNS) + " |" for r in rows]
    lines += ["", "Held-out metrics from each variant's `eval.json`; L_reg lower is better, R@k higher is better.", ""]
    (out / "sweep.md").write_text("\n".join(lines))
    (out / "sweep.json").write_text(json.dumps({"rows": rows, "notes": notes}, indent=2))


def run_sweep(
    path: str | Path,
    *,
    overrides: dict[str, Any] | None = None,
    echo: Callable[[str], None] = print,
    train_fn: Callable[[TrainConfig], Any] | None = None,
) -> list[dict[str, Any]]:
    """Train and evaluate every variant in turn; returns the table rows (also written to OUT)."""
    from astrea.train.eval import EVAL_JSON, EvalConfig, evaluate

    from astrea.train.stages import build_stages

    if train_fn is None:
        from astrea.train.runner import run as train_fn  # type: ignore[assignment]
    spec = load_sweep(path, overrides=overrides)
    # resolve every variant and build its stages first: a typo or a bad option in the last variant
    # fails before hours of training (problems only the store can show are recorded per variant)
    cfgs = {v.name: variant_config(spec, v) for v in spec.variants}
    for name, c in cfgs.items():
        try:
            build_stages(c)
        except (AstreaError, ValueError) as e:
            raise TrainError(f"sweep variant {name!r}: {e.args[0] if e.args else e}") from None
    stores = {(c.store, c.data) for c in cfgs.values()}
    if len(stores) != 1:
        raise TrainError(f"sweep variants read different stores/datasets {sorted(stores)}; a sweep compares one store")
    rows: list[dict[str, Any]] = []
    random_notes: set[str] = set()
    for v in spec.variants:
        cfg = cfgs[v.name]
        run_dir = Path(cfg.out)
        echo(f"[sweep] {v.name}: {v.describe()} -> {run_dir}")
        status, metrics = "ok", None
        try:
            saved = run_dir / "config.yaml"
            done = (run_dir / EVAL_JSON).is_file() and saved.is_file() and _same_config(saved, cfg)
            if done:
                status = "reused"
                metrics = json.loads((run_dir / EVAL_JSON).read_text())
            else:
                if (run_dir / "checkpoints").is_dir():
                    if not saved.is_file() or not _same_config(saved, cfg):
                        raise TrainError(
                            f"{run_dir} holds a run with a different config; remove it or rename the variant"
                        )
                    cfg.resume = True
                train_fn(cfg)
                metrics = evaluate(EvalConfig(run=str(run_dir), **spec.eval))
        except (AstreaError, ValueError) as e:
            status = "failed: " + _one_line(str(e.args[0] if e.args else e))
        except Exception as e:  # one broken variant must not cost the others; its trace goes to the log
            echo(traceback.format_exc())
            status = f"failed: {type(e).__name__}: {_one_line(str(e))}"
        if metrics:
            random_notes.update(n for n in metrics.get("notes", []) if n.startswith("RANDOM"))
        echo(f"[sweep] {v.name}: {status}")
        rows.append(table_row(v, status, metrics))
        write_table(rows, spec.out, sorted(random_notes))  # after every variant: a killed sweep keeps its rows
    return rows


def _one_line(msg: str, limit: int = 300) -> str:
    msg = " ".join(msg.split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _same_config(saved: Path, cfg: TrainConfig) -> bool:
    # through TrainConfig: a run saved with the legacy `extras` form compares by what it means
    try:
        a = TrainConfig.from_dict(yaml.safe_load(saved.read_text()) or {}, source=str(saved)).to_dict()
    except (TrainError, yaml.YAMLError):
        return False
    b = cfg.to_dict()
    for d in (a, b):
        for k in ("resume", "progress"):
            d.pop(k, None)
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)
