"""`astrea report RUN`: pictures and a markdown summary of a training run.

Writes into RUN:
- ``loss.png``: training L_reg per stage over global steps (the paper's Fig. 3 tracks its metrics per
  alignment stage the same way), held-out L_reg as markers, stage boundaries as vertical lines, and the
  main stage's weighted MoCo term;
- ``routing.png``: per-expert routing mass for each task type's prompts (the paper's Fig. 2);
- ``report.md``: what was trained on what (saying plainly when the LLM or the experts had random
  weights), per-stage results, the evaluation tables, and both pictures.

Needs ``RUN/eval.json`` for the routing picture and the metric tables; it is computed first when
missing (``evaluate=False`` skips that and reports training curves only).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from astrea.train.errors import TrainError

LOSS_PNG = "loss.png"
ROUTING_PNG = "routing.png"
REPORT_MD = "report.md"


def plot_losses(rows: list[dict[str, Any]], path: Path) -> bool:
    """Training/held-out loss per stage over global steps; False when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = sorted((r for r in rows if r.get("kind") == "train"), key=lambda r: r.get("global_step", 0))
    held = sorted((r for r in rows if r.get("kind") == "heldout"), key=lambda r: r.get("global_step", 0))
    if not train and not held:
        return False
    stages = list(dict.fromkeys(r["stage"] for r in [*train, *held]))
    colors = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(stages)}
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    ax2 = None
    for s in stages:
        tr = [r for r in train if r["stage"] == s]
        if tr:
            ax.plot([r["global_step"] for r in tr], [r["loss_reg"] for r in tr], color=colors[s], lw=1.4, label=f"{s}: L_reg")
            moco = [r for r in tr if "loss_moco" in r]
            if moco:  # own axis: its scale (mu * InfoNCE) has nothing to do with L_reg's
                if ax2 is None:
                    ax2 = ax.twinx()
                    ax2.set_ylabel("mu * L_moco (dashed)")
                ax2.plot([r["global_step"] for r in moco], [r["loss_moco"] for r in moco], color=colors[s], lw=1.0,
                         ls="--", label=f"{s}: mu*L_moco")
        hd = [r for r in held if r["stage"] == s and r.get("loss_reg") is not None]
        if hd:
            ax.plot([r["global_step"] for r in hd], [r["loss_reg"] for r in hd], color=colors[s], marker="o", ls="none",
                    ms=5, mec="black", mew=0.6, label=f"{s}: held-out")
    starts = {}
    for r in [*train, *held]:
        starts[r["stage"]] = min(starts.get(r["stage"], r["global_step"]), r["global_step"])
    for s, x in list(starts.items())[1:]:
        ax.axvline(x, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("global optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("Loss per stage (cf. paper Fig. 3)")
    handles, labels = ax.get_legend_handles_labels()
    if ax2 is not None:
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=7, ncol=2, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_routing(routing: dict[str, Any], path: Path) -> bool:
    """Grouped bars: for each task type's prompts, the routing mass of each expert (Fig. 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = routing["experts"]
    groups = [("all", routing["overall"]), *routing["per_task"].items()]
    groups = [(t, st) for t, st in groups if st.get("tokens")]
    if not groups:
        return False
    x = np.arange(len(groups))
    w = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4), dpi=110)
    for i, e in enumerate(names):
        ax.bar(x + (i - (len(names) - 1) / 2) * w, [st["mass"][i] for _, st in groups], w, label=e)
    ax.set_xticks(x, [t for t, _ in groups])
    ax.set_xlabel("prompts of task type")
    ax.set_ylabel("routing mass (mean P_i over tokens)")
    ax.set_ylim(0, 1)
    ax.axhline(1 / len(names), color="grey", lw=0.8, ls=":", label="uniform")
    ax.set_title(f"Router: mass per expert per task (top-{routing['top_k']}, cf. paper Fig. 2)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _f(v: Any, fmt: str = ".4f") -> str:
    return format(v, fmt) if isinstance(v, int | float) else "-"


def report(run: str | Path, *, evaluate: bool = True, eval_kwargs: dict[str, Any] | None = None) -> Path:
    """Write the plots and RUN/report.md; returns the report's path."""
    from astrea.train.eval import EVAL_JSON, EvalConfig, eval_markdown
    from astrea.train.eval import evaluate as run_eval
    from astrea.train.metrics import read_metrics

    run_dir = Path(run)
    if not (run_dir / "config.yaml").is_file():
        raise TrainError(f"{run_dir} is not a training run (no config.yaml); give the --out directory of `astrea train`")
    info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    rows = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    metrics = None
    if (run_dir / EVAL_JSON).is_file():
        metrics = json.loads((run_dir / EVAL_JSON).read_text())
    elif evaluate:
        metrics = run_eval(EvalConfig(run=str(run_dir), **(eval_kwargs or {})))

    lines = [f"# Astrea run `{run_dir}`", ""]
    llm = info.get("llm", {})
    rnd_experts = [e for e, r in info.get("experts_random_weights", {}).items() if r]
    if llm.get("random_weights") or rnd_experts:
        parts = []
        if llm.get("random_weights") and llm.get("text_warmup"):
            w = llm["text_warmup"]
            parts.append(f"the LLM ({llm.get('source')}) has RANDOM-init weights warmed up by astrea on this "
                         f"dataset's training-split target texts only ({w['steps']} steps, {w['texts']} texts, "
                         "no images): not a pretrained model")
            tok = llm.get("tokenizer") or {}
            if tok.get("kind") == "fitted":
                parts.append(f"its tokenizer is a byte-level BPE of {tok['vocab']} entries fitted on the same texts")
        elif llm.get("random_weights"):
            parts.append(f"the LLM ({llm.get('source')}) has RANDOM WEIGHTS")
        if rnd_experts:
            parts.append(f"the experts {', '.join(rnd_experts)} had RANDOM WEIGHTS when the store was extracted")
        lines += [f"> **Random weights:** {'; '.join(parts)}. Every number and picture below exercises the "
                  "pipeline; none of them measures what Astrea can do.", ""]
    else:
        lines += ["Pretrained LLM and experts (no random weights).", ""]
    lines += [
        f"- LLM: `{llm.get('source', '?')}` (hidden size {llm.get('hidden_size', '?')})",
        "- experts (store fingerprints): " + ", ".join(f"`{e}@{fp}`" for e, fp in info.get("experts", {}).items()),
        f"- stages: {' -> '.join(info.get('stages', []))}",
        "",
    ]
    if summary.get("stages"):
        lines += ["## Stages", "", "| stage | steps | held-out L_reg before | after | permuted images | image gain "
                  "| samples/s | data wait |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for s in summary["stages"]:
            after, perm = s.get("heldout_after"), s.get("heldout_permuted_after")
            gain = perm - after if isinstance(after, int | float) and isinstance(perm, int | float) else None
            lines.append(
                f"| {s['name']} | {s['steps']} | {_f(s.get('heldout_before'))} | {_f(after)} | {_f(perm)} | "
                f"{_f(gain, '+.4f')} | {_f(s.get('samples_per_s'), '.1f')} | {_f(s.get('data_wait_fraction'), '.1%')} |"
            )
        lines += ["", "*permuted images*: the same held-out texts, each image's features replaced by another "
                  "held-out image's; *image gain* = permuted - after, in nats per target token (about 0: the "
                  "model does not use the image).", ""]
    if plot_losses(rows, run_dir / LOSS_PNG):
        lines += ["## Loss per stage", "", f"![loss per stage]({LOSS_PNG})", ""]
    else:
        lines += ["No training metrics were logged (empty or missing metrics.jsonl).", ""]
    if metrics is not None:
        if metrics.get("routing") and plot_routing(metrics["routing"], run_dir / ROUTING_PNG):
            lines += ["## Routing per task", "", f"![routing mass per expert and task]({ROUTING_PNG})", ""]
        lines.append(eval_markdown(metrics, heading="##"))
    else:
        lines += ["No evaluation (run `astrea eval` for held-out, retrieval and routing metrics).", ""]
    out = run_dir / REPORT_MD
    out.write_text("\n".join(lines))
    return out
