"""`astrea eval RUN`: held-out metrics of a finished (or interrupted) training run.

Writes ``RUN/eval.json`` and ``RUN/eval.md``:

- ``heldout.stages[<stage>]``: held-out L_reg (Eq. 1, mean per target token) of every pre-alignment stage,
  with its own cumulative targets and visual path, using the run's final weights;
- ``heldout.lines[<stage>][<task>]``: nats per held-out sample on each task line of the stage's target (the
  tokens that spell ``task: ...``; the newlines and EOS are in no line): the loss of one answer, not diluted by
  the other lines or by the target's length;
- ``residual_attention[<stage>][<expert>]``: for a pre-alignment stage with earlier experts (residual
  context), the mean entropy (nats) of the expert's residual attention rows over held-out samples beside
  ``log_P`` (uniform attention over its P tokens), as eval uses it (``residual_at_eval``);
- ``heldout.main[<task>]``: the main stage's held-out L_reg per task type (caption, tags, boxes, masks),
  every held-out image asked every task; ``heldout.main_mean`` weights tasks by their target tokens;
- ``retrieval``: image->text and text->image R@1 / R@5 with the MoCo online embeddings over the held-out
  images that have a caption (``gallery`` of them): any gallery item with the query's caption text is a
  match, ``chance`` is the expected R@k of a random ranking with those ties; when captions repeat,
  ``class_level`` ranks the unique captions (see :func:`retrieval_metrics`);
- ``targets``: per stage (and ``main/<task>``) how many held-out targets were cut at
  ``dataset.max_text_tokens`` per task and how many items were dropped to fit;
- ``routing``: per-expert routing mass overall and per task type, mean router entropy (nats; the
  maximum is log k) and load balance (1 = even, n = all on one expert);
- ``instructions`` (``--instructions FILE``): on the conversations about held-out images, exact-match answer
  accuracy (greedy answers, VQA normalisation: lower case, no punctuation or articles) of every assistant
  turn given the true earlier turns, and L_reg on the answer tokens; each beside the permuted-image control
  (every conversation asked about another held-out image's features).

The held-out split is the run's own (hash of the key, ``dataset.heldout_fraction``), and the store must
still hold the exact expert fingerprints the run trained on (checked before anything is computed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from astrea.train.errors import TrainError

from astrea.train.labels import IGNORE
from astrea.train.loaded_run import LoadedRun, load_run  # noqa: F401 - load_run: part of this module's API
from astrea.train.stages import Routing, Stage

EVAL_JSON = "eval.json"
EVAL_MD = "eval.md"


@dataclass
class EvalConfig:
    run: str
    # held-out images scored, read once and kept in memory (features of every expert) for all stages/tasks;
    # the run's dataset.heldout_max is not a cap here
    max_samples: int = 256
    batch_size: int = 16
    device: str = "auto"
    store: str = ""  # the store moved since training: its new path
    weights: str = ""  # a stage weights file / checkpoint dir; default: the run's newest weights
    # score the same weights with another residual.at_eval (expectation | average | all); "": the run's own
    residual_at_eval: str = ""
    # LLaVA-format instruction files scored on the held-out images (answer accuracy, L_reg, permuted control)
    instructions: list[str] = field(default_factory=list)
    max_new_tokens: int = 32  # per generated answer

    def validate(self) -> None:
        from astrea.train.residual import AT_EVAL

        for f in self.instructions:
            if not Path(f).expanduser().is_file():
                raise TrainError(f"eval --instructions {f}: no such file")
        if self.max_new_tokens < 1:
            raise TrainError(f"eval max_new_tokens={self.max_new_tokens} must be >= 1")

        if self.residual_at_eval and self.residual_at_eval not in AT_EVAL:
            raise TrainError(f"eval residual_at_eval={self.residual_at_eval!r} is not valid; choose one of {list(AT_EVAL)}")
        if self.max_samples < 1:
            raise TrainError(f"eval max_samples={self.max_samples} must be >= 1")
        if self.batch_size < 1:
            raise TrainError(f"eval batch_size={self.batch_size} must be >= 1")


# -- metrics ----------------------------------------------------------------------------------------
def recall_at_k(
    sim: torch.Tensor,
    ks: tuple[int, ...] = (1, 5),
    *,
    query_groups: list[Any] | None = None,
    gallery_groups: list[Any] | None = None,
) -> dict[str, float]:
    """R@k of queries (rows of ``sim`` [Q, G]) against a gallery (columns).

    A query's matches are the gallery items of its group (``query_groups[i] == gallery_groups[j]``,
    e.g. the same caption text); without groups, row i's only match is column i. The query is a hit at
    k when fewer than k *non-matching* items score >= its best match: items with the same text are
    never counted against it, while a score tie with a different text still counts against the match,
    so a constant similarity gives chance-or-worse, never a perfect score."""
    q, g = sim.shape
    if q == 0:
        return {}
    if query_groups is None or gallery_groups is None:
        match = torch.eye(q, g, dtype=torch.bool, device=sim.device)
    else:
        ids = {k: i for i, k in enumerate(dict.fromkeys([*query_groups, *gallery_groups]))}
        qg = torch.tensor([ids[k] for k in query_groups], device=sim.device)
        gg = torch.tensor([ids[k] for k in gallery_groups], device=sim.device)
        match = qg[:, None] == gg[None, :]
    best = sim.masked_fill(~match, -math.inf).max(1, keepdim=True).values
    rank = ((sim >= best) & ~match).sum(1)  # 0 = a match is strictly first
    rank = torch.where(match.any(1), rank, torch.full_like(rank, g))  # no match in the gallery: a miss
    return {f"R@{k}": float((rank < k).float().mean()) for k in ks}


def chance_at_k(matches: list[int], gallery: int, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Expected R@k of a random ranking when query i has ``matches[i]`` matching items among ``gallery``:
    mean of 1 - C(gallery - m, k) / C(gallery, k) (k / gallery when every query has one match)."""
    out = {}
    for k in ks:
        kk = min(k, gallery)
        vals = [1.0 - math.comb(gallery - m, kk) / math.comb(gallery, kk) for m in matches]
        out[f"R@{k}"] = sum(vals) / len(vals) if vals else math.nan
    return out


def retrieval_metrics(q_v: torch.Tensor, q_t: torch.Tensor, captions: list[str] | None = None) -> dict[str, Any]:
    """Image<->text retrieval over paired embeddings (row i of ``q_v`` is the image of caption i).

    With ``captions``, every gallery item carrying the query's caption text is a match (a repeated
    caption is not a miss), the chance level accounts for those ties, and when captions repeat a
    class-level R@k ranks the unique captions (image -> text: the C unique texts; text -> image: each
    unique text against the C groups of images sharing a caption, a group scoring its best image)."""
    sim = q_v.float() @ q_t.float().t()
    n = sim.shape[0]
    groups = [" ".join(str(c).split()) for c in captions] if captions is not None else list(range(n))
    if len(groups) != n:
        raise ValueError(f"{len(groups)} captions for {n} image/text pairs")
    sizes = {g: groups.count(g) for g in set(groups)}
    out: dict[str, Any] = {
        "gallery": n,
        "unique_captions": len(sizes),
        "image_to_text": recall_at_k(sim, query_groups=groups, gallery_groups=groups),
        "text_to_image": recall_at_k(sim.t(), query_groups=groups, gallery_groups=groups),
        "chance": chance_at_k([sizes[g] for g in groups], n) if n else {"R@1": math.nan, "R@5": math.nan},
        "class_level": None,
    }
    if n and len(sizes) < n:
        classes = list(dict.fromkeys(groups))
        member = torch.tensor([[g == c for g in groups] for c in classes], dtype=torch.float32)  # [C, n]
        # image -> unique texts: identical texts embed alike, so a class's score is its texts' mean
        i2t = sim @ member.t() / member.sum(1)
        # unique text -> groups of images: the text's row (mean over its copies), best image per group
        rows = member @ sim.t() / member.sum(1, keepdim=True)  # [C, n images]
        t2i = torch.stack([rows[:, member[c].bool()].max(1).values for c in range(len(classes))], dim=1)  # [C, C]
        out["class_level"] = {
            "classes": len(classes),
            "image_to_text": recall_at_k(i2t, query_groups=groups, gallery_groups=classes),
            "text_to_image": recall_at_k(t2i, query_groups=classes, gallery_groups=classes),
            "chance": chance_at_k([1] * len(classes), len(classes)),
        }
    return out


def heldout_records(open_epoch: Any, fraction: float, max_samples: int) -> list[dict[str, Any]]:
    """The first ``max_samples`` held-out records of an unshuffled pass (the trainer's split and order)."""
    from astrea.train.data import is_heldout

    out = []
    for rec in open_epoch(0, False):
        if is_heldout(rec["key"], fraction):
            out.append(rec)
            if len(out) >= max_samples:
                break
    return out


class _LossSum:
    def __init__(self) -> None:
        self.loss, self.tokens, self.samples = 0.0, 0, 0

    def add(self, loss: torch.Tensor, n: torch.Tensor, samples: int) -> None:
        self.loss += float(loss) * int(n)
        self.tokens += int(n)
        self.samples += samples

    def value(self) -> float | None:
        return self.loss / self.tokens if self.tokens else None


class _LineNats:
    """Nats per sample on each task line of the target (see the module doc, ``heldout.lines``)."""

    def __init__(self) -> None:
        self.nats: dict[str, float] = {}
        self.samples: dict[str, int] = {}

    def add(self, token_losses: torch.Tensor, labels: torch.Tensor, targets: list[str], n_tokens: Any) -> None:
        from astrea.schemas.stages import TASKS

        for i, target in enumerate(targets):
            losses = token_losses[i][labels[i] != IGNORE].tolist()  # the target's tokens, in order
            start = 0
            for line in target.split("\n"):
                end = start + len(line)
                task = line.split(":", 1)[0]
                if task in TASKS and ":" in line:
                    a, z = n_tokens(target[:start]), n_tokens(target[:end])
                    self.nats[task] = self.nats.get(task, 0.0) + sum(losses[a:z])
                    self.samples[task] = self.samples.get(task, 0) + 1
                start = end + 1

    def value(self) -> dict[str, float]:
        return {t: self.nats[t] / self.samples[t] for t in self.nats}


def _entropy_summary(ent: torch.Tensor, held: list[dict[str, Any]], expert: str, context: list[str]) -> dict[str, Any]:
    used = ent[~ent.isnan()]
    tokens = int(held[0]["experts"][expert]["tokens"].shape[0]) if held else 0
    return {
        "context": list(context),
        "entropy": float(used.mean()) if len(used) else None,
        "log_P": math.log(tokens) if tokens else None,
        "tokens": tokens,
        "samples": int(len(used)),
    }


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out = dict(batch)
    for k in ("input_ids", "attention_mask", "labels"):
        out[k] = batch[k].to(device)
    for k in ("tokens", "pooled"):
        out[k] = {e: t.to(device).float() for e, t in batch[k].items()}
    return out


@torch.no_grad()
def evaluate(ecfg: EvalConfig) -> dict[str, Any]:
    """Compute the metrics, write RUN/eval.json and RUN/eval.md, and return the metrics."""
    from astrea.train.metrics import dumps_strict

    ecfg.validate()
    lr = load_run(ecfg.run, device=ecfg.device, store=ecfg.store, weights=ecfg.weights,
                  residual_at_eval=ecfg.residual_at_eval)
    frac = lr.cfg.dataset.heldout_fraction
    if frac <= 0:
        raise TrainError(f"the run has dataset.heldout_fraction={frac}: it kept no held-out images to evaluate on")
    held, store_log = _heldout(lr, ecfg.max_samples)
    out = _report_skeleton(lr, ecfg, store_log.to_dict())
    scorer = _Scorer(lr, held, ecfg.batch_size)
    for stage in lr.stages:
        if stage.routing() is None:  # a routing stage is scored per task type below
            _score_stage(stage, scorer, out)
    main = next((s for s in lr.stages if s.routing() is not None), None)
    if main is None:
        out["notes"].append("the run has no main stage: no routing or retrieval metrics")
    else:
        _score_routing_stage(main, main.routing(), scorer, out)
    if ecfg.instructions:
        if main is None:
            raise TrainError("eval --instructions: the run has no main stage (instruction data trains the main stage)")
        out["instructions"] = instruction_metrics(lr, main, held, ecfg)
    _targets_and_notes(out, lr, scorer.collators)
    run_dir = Path(ecfg.run)
    (run_dir / EVAL_JSON).write_text(dumps_strict(out))
    (run_dir / EVAL_MD).write_text(eval_markdown(out))
    return out


def _heldout(lr: LoadedRun, max_samples: int) -> tuple[list[dict[str, Any]], Any]:
    """One pass over the store collects the held-out records with every expert any stage reads; each
    stage and task then collates them from memory (8 passes over a large store would read it 8 times)."""
    from astrea.train.data import StoreReadLog, store_opener

    cfg = lr.cfg
    union = list(dict.fromkeys(e for s in lr.stages for e in s.required_experts()))
    store_log = StoreReadLog(skip_damaged=cfg.dataset.skip_damaged)
    opener = store_opener(cfg.store, cfg.data, union, seed=cfg.seed, rank=0, world_size=1, log=store_log)
    return heldout_records(opener, cfg.dataset.heldout_fraction, max_samples), store_log


def _report_skeleton(lr: LoadedRun, ecfg: EvalConfig, store: dict[str, Any]) -> dict[str, Any]:
    """eval.json's keys, in their order, before anything is scored (see the module doc)."""
    cfg = lr.cfg
    return {
        "run": str(lr.cfg.out or ecfg.run),
        "weights": lr.weights,
        "llm": lr.info.get("llm", {"source": cfg.llm.name}),
        "experts_random_weights": lr.info.get("experts_random_weights", {}),
        "heldout_fraction": cfg.dataset.heldout_fraction,
        "heldout": {"stages": {}, "lines": {}, "main": {}, "main_mean": None, "samples": {}},
        "heldout_permuted": {"stages": {}, "lines": {}, "main": {}, "main_mean": None, "samples": {}},
        "residual_at_eval": cfg.residual.at_eval,
        "residual_attention": {},
        "retrieval": None,
        "routing": None,
        # held-out targets against dataset.max_text_tokens, per stage (and main/<task>): targets cut
        # per task (content lost) and whole items dropped to fit (data.Collator.counts)
        "targets": {},
        "notes": [],
        "store": store,
    }


class _Scorer:
    """The held-out records collated for one (stage, render) from memory, and L_reg of a batch; keeps
    each collator by name (its counts of cut targets go to eval.json)."""

    def __init__(self, lr: LoadedRun, held: list[dict[str, Any]], batch_size: int) -> None:
        self.lr, self.cfg, self.model, self.held, self.batch_size = lr, lr.cfg, lr.model, held, batch_size
        self.collators: dict[str, Any] = {}

    def batches(self, stage: Stage, render: Any, name: str) -> list[dict[str, Any]]:
        from astrea.train.data import Collator

        cfg = self.cfg
        collate = Collator(render, self.model.tokenizer, stage.required_experts(), cfg.dataset.max_text_tokens,
                           fit_targets=cfg.dataset.fit_targets)
        self.collators[name] = collate
        out = []
        for i in range(0, len(self.held), self.batch_size):
            b = collate(self.held[i : i + self.batch_size])
            if b is not None:
                out.append(b)
        return out

    def permuted(self, bs: list[dict[str, Any]]) -> Any:
        """The control: the same texts, each image's features replaced by another held-out image's (a
        derangement). A model that ignores the image scores the same on both."""
        from astrea.train.data import with_permuted_features

        return with_permuted_features(bs, seed=self.cfg.seed)

    def lreg(self, stage: Stage, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        visual = stage.visual_tokens(self.model, batch)
        loss, n = self.model.lm_loss(visual, batch["input_ids"], batch["attention_mask"], batch["labels"])
        return loss, n, visual


def _score_stage(stage: Stage, sc: _Scorer, out: dict[str, Any]) -> None:
    """A non-routing (pre-alignment) stage: L_reg and nats per target line on its own cumulative target,
    true and permuted images, and the entropy of its residual attention."""
    model, device = sc.model, sc.lr.device
    bs = sc.batches(stage, stage.render, stage.name)
    n_tokens = sc.collators[stage.name].n_tokens
    ent: dict[str, list[torch.Tensor]] = {}
    for part, batches_ in (("heldout", bs), ("heldout_permuted", sc.permuted(bs))):
        acc, lines = _LossSum(), _LineNats()
        for b in batches_:
            b = _to_device(b, device)
            tl = model.token_losses(stage.visual_tokens(model, b), b["input_ids"], b["attention_mask"], b["labels"])
            n = (b["labels"] != IGNORE).sum()
            acc.add(tl.sum() / n.clamp(min=1), n, len(b["keys"]))
            lines.add(tl, b["labels"], b["targets"], n_tokens)
            if part == "heldout":
                for e, v in stage.residual_entropy(model, b).items():
                    ent.setdefault(e, []).append(v.float().cpu())
        out[part]["stages"][stage.name] = acc.value()
        out[part]["samples"][stage.name] = acc.samples
        out[part]["lines"][stage.name] = lines.value()
    if ent:
        out["residual_attention"][stage.name] = {
            e: _entropy_summary(torch.cat(v), sc.held, e, stage.context_experts) for e, v in ent.items()
        }


def _score_routing_stage(main: Stage, routing: Routing, sc: _Scorer, out: dict[str, Any]) -> None:
    """The routing (main) stage: every held-out image asked each task alone; L_reg per task, true and
    permuted images, routing statistics per task, and image-text retrieval on the caption task."""
    from astrea.train.moe import RoutingStats

    per_task = {t: RoutingStats(len(routing.experts), routing.top_k) for t in main.tasks()}
    total, total_perm = _LossSum(), _LossSum()
    q_v, q_t, caps = [], [], []
    for task in main.tasks():
        bs = sc.batches(main, main.render_task(task), f"main/{task}")
        acc = _LossSum()
        for b in bs:
            b = _to_device(b, sc.lr.device)
            loss, n, visual = sc.lreg(main, b)
            acc.add(loss, n, len(b["keys"]))
            total.add(loss, n, len(b["keys"]))
            per_task[task].add(main.routing_probs())
            pairs = main.retrieval_embeddings(sc.model, b, visual) if task == "caption" else None
            if pairs is not None:
                q_v.append(pairs[0].cpu())
                q_t.append(pairs[1].cpu())
                caps += pairs[2]
        out["heldout"]["main"][task] = acc.value()
        out["heldout"]["samples"][f"main/{task}"] = acc.samples
        acc = _LossSum()
        for b in sc.permuted(bs):
            b = _to_device(b, sc.lr.device)
            loss, n, _ = sc.lreg(main, b)
            acc.add(loss, n, len(b["keys"]))
            total_perm.add(loss, n, len(b["keys"]))
        out["heldout_permuted"]["main"][task] = acc.value()
        out["heldout_permuted"]["samples"][f"main/{task}"] = acc.samples
    out["heldout_permuted"]["main_mean"] = total_perm.value()
    out["heldout"]["main_mean"] = total.value()
    out["routing"] = _routing_summary(routing.experts, routing.top_k, per_task)
    if not main.has_retrieval(sc.model):
        out["notes"].append("trained with moco.enabled: false (--no-moco): no MoCo embeddings, "
                            "no retrieval metrics")
    elif q_v and sum(len(x) for x in q_v) >= 2:
        out["retrieval"] = retrieval_metrics(torch.cat(q_v), torch.cat(q_t), caps)
    else:
        out["notes"].append("fewer than 2 held-out images with a caption: no retrieval metrics")


def _routing_summary(names: list[str], top_k: int, per_task: dict[str, Any]) -> dict[str, Any]:
    from astrea.train.moe import RoutingStats

    overall = RoutingStats(len(names), top_k)
    for st in per_task.values():
        overall.tokens += st.tokens
        overall.mass += st.mass
        overall.selected += st.selected
        overall.entropy += st.entropy
    return {
        "experts": list(names),
        "top_k": top_k,
        "overall": overall.summary(),
        "per_task": {t: st.summary() for t, st in per_task.items()},
    }


def _targets_and_notes(out: dict[str, Any], lr: LoadedRun, collators: dict[str, Any]) -> None:
    """What max_text_tokens did to the held-out targets, and the notes that qualify every number."""
    cfg = lr.cfg
    out["targets"] = {
        "max_text_tokens": cfg.dataset.max_text_tokens, "format": cfg.dataset.target_format,
        "fit_targets": cfg.dataset.fit_targets, "stages": {n: c.counts() for n, c in collators.items()},
    }
    lost = {n: c.cut_tasks for n, c in collators.items() if c.cut_tasks}
    if lost:
        out["notes"].append(
            f"held-out targets cut at dataset.max_text_tokens={cfg.dataset.max_text_tokens} (content lost): "
            + "; ".join(f"{n}: " + ", ".join(f"{t} {v}" for t, v in cut.items()) for n, cut in lost.items())
        )
    if lr.info.get("llm", {}).get("random_weights") or any(out["experts_random_weights"].values()):
        out["notes"].append(
            "RANDOM WEIGHTS: the LLM and/or the experts had random weights; these numbers test the pipeline, "
            "they say nothing about the method's quality"
        )


@torch.no_grad()
def instruction_metrics(lr: LoadedRun, main: Stage, held: list[dict[str, Any]], ecfg: EvalConfig) -> dict[str, Any]:
    """Answer accuracy and answer-token L_reg on the conversations about held-out images (module doc)."""
    from astrea.train.data import Collator, derangement, with_permuted_features
    from astrea.train.generate import GenerateOptions, generate
    from astrea.train.instructions import InstructionConfig, join, normalize_answer, prompt_text

    cfg, model = lr.cfg, lr.model
    ic = InstructionConfig(files=list(ecfg.instructions), match=cfg.instructions.match,
                           template=cfg.instructions.template)
    convs = ic.build()
    by_key = {r["key"]: r for r in held}
    joined = join(convs, set(by_key), ic.match)
    samples = [{**by_key[k], "instruction": c} for k, cs in joined.by_key.items() for c in cs]
    collate = Collator(main.render, model.tokenizer, main.required_experts(), cfg.dataset.max_text_tokens,
                       fit_targets=cfg.dataset.fit_targets)
    bs = [b for i in range(0, len(samples), ecfg.batch_size) if (b := collate(samples[i : i + ecfg.batch_size]))]
    lreg = {}
    for part, batches_ in (("true", bs), ("permuted", with_permuted_features(bs, seed=cfg.seed))):
        acc = _LossSum()
        for b in batches_:
            b = _to_device(b, lr.device)
            loss, n = model.lm_loss(main.visual_tokens(model, b), b["input_ids"], b["attention_mask"], b["labels"])
            acc.add(loss, n, len(b["keys"]))
        lreg[part] = acc.value()
    # greedy answers, each assistant turn given the true turns before it; the control asks the same
    # conversation about another held-out image (a derangement over the conversations)
    perm = derangement(len(samples), cfg.seed)
    opts = GenerateOptions(max_new_tokens=ecfg.max_new_tokens)
    right = {"true": 0, "permuted": 0}
    answers, examples = 0, []
    for i, smp in enumerate(samples):
        turns = smp["instruction"].turns
        for j, (role, truth) in enumerate(turns):
            if role != "assistant":
                continue
            prompt = prompt_text(turns[:j], model.tokenizer, ic.template)
            got = {}
            for part, src in (("true", smp), ("permuted", samples[perm[i]])):
                got[part] = generate(model, main, src["experts"], prompt, opts, key=src["key"])
                right[part] += normalize_answer(got[part]) == normalize_answer(truth)
            answers += 1
            if len(examples) < 6:
                examples.append({"key": smp["key"], "question": turns[j - 1][1], "answer": truth,
                                 "generated": got["true"], "generated_permuted_image": got["permuted"]})
    return {
        "files": list(ecfg.instructions),
        "conversations": len(samples),
        "images": len(joined.by_key),
        "answers": answers,
        "accuracy": right["true"] / answers if answers else None,
        "accuracy_permuted": right["permuted"] / answers if answers else None,
        "lreg": lreg["true"],
        "lreg_permuted": lreg["permuted"],
        "not_heldout_or_unmatched": len(joined.unmatched),
        "text_only_not_scored": len(joined.text_only),
        "examples": examples,
    }


# -- markdown ---------------------------------------------------------------------------------------
def _f(v: Any, fmt: str = ".4f") -> str:
    return format(v, fmt) if isinstance(v, int | float) and not (isinstance(v, float) and math.isnan(v)) else "-"


def _gain(true: Any, permuted: Any) -> float | None:
    ok = all(isinstance(v, int | float) and math.isfinite(v) for v in (true, permuted))
    return permuted - true if ok else None


def eval_markdown(m: dict[str, Any], *, heading: str = "#") -> str:
    """eval.json as Markdown: one section per part of the metrics, in a fixed order, absent parts left out."""
    lines = [f"{heading} Evaluation of `{m['run']}`", ""]
    for note in m.get("notes", []):
        lines.append(f"> {note}")
    lines += ["", f"Weights: `{m['weights']}`; held-out fraction {m['heldout_fraction']}.", ""]
    for section in (_md_heldout_stages, _md_lines, _md_residual, _md_main, _md_targets, _md_retrieval,
                    _md_instructions, _md_routing):
        lines += section(m, heading)
    return "\n".join(lines) + "\n"


def _permuted(m: dict[str, Any]) -> dict[str, Any]:
    return m.get("heldout_permuted") or {"stages": {}, "main": {}, "main_mean": None}


def _md_heldout_stages(m: dict[str, Any], heading: str) -> list[str]:
    h, hp, lines = m["heldout"], _permuted(m), []
    if h["stages"] or h["main"]:
        lines += [
            "Control: *permuted* scores the same held-out texts with each image's expert features replaced by "
            "another held-out image's. The image gain (permuted - true, nats/token) is what the visual path "
            "contributes; about 0 means the model does not use the image.", "",
        ]
    if h["stages"]:
        lines += [f"{heading}# Held-out L_reg per pre-alignment stage", "",
                  "| stage | L_reg | L_reg permuted images | image gain | images |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {s} | {_f(v)} | {_f(hp['stages'].get(s))} | {_f(_gain(v, hp['stages'].get(s)))} | "
                  f"{h['samples'].get(s, 0)} |" for s, v in h["stages"].items()]
        lines.append("")
    return lines


def _md_lines(m: dict[str, Any], heading: str) -> list[str]:
    h, hp = m["heldout"], _permuted(m)
    if not any(h.get("lines", {}).values()):
        return []
    lines = [f"{heading}# Held-out nats per sample on each target line", "",
             "The loss of one answer line (`task: ...`), summed over its tokens, per sample: not diluted by "
             "constant text elsewhere in the target.", "",
             "| stage | line | nats/sample | permuted images | image gain |", "|---|---|---:|---:|---:|"]
    for s_, per in h["lines"].items():
        for t, v in per.items():
            pv = (hp.get("lines") or {}).get(s_, {}).get(t)
            lines.append(f"| {s_} | {t} | {_f(v)} | {_f(pv)} | {_f(_gain(v, pv))} |")
    return lines + [""]


def _md_residual(m: dict[str, Any], heading: str) -> list[str]:
    ra = m.get("residual_attention") or {}
    if not ra:
        return []
    lines = [f"{heading}# Residual attention on held-out images (at eval: {m.get('residual_at_eval', '-')})", "",
             "| stage | expert | context | entropy (nats) | log P (uniform) | entropy / log P | samples |",
             "|---|---|---|---:|---:|---:|---:|"]
    for s_, per in ra.items():
        for e, r in per.items():
            ratio = r["entropy"] / r["log_P"] if r.get("entropy") is not None and r.get("log_P") else None
            lines.append(f"| {s_} | {e} | {', '.join(r['context'])} | {_f(r['entropy'], '.3f')} | "
                         f"{_f(r['log_P'], '.3f')} | {_f(ratio, '.3f')} | {r['samples']} |")
    return lines + [""]


def _md_main(m: dict[str, Any], heading: str) -> list[str]:
    h, hp = m["heldout"], _permuted(m)
    if not h["main"]:
        return []
    lines = [f"{heading}# Main stage: held-out L_reg per task type", "",
             "| task | L_reg | L_reg permuted images | image gain | images |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {t} | {_f(v)} | {_f(hp['main'].get(t))} | {_f(_gain(v, hp['main'].get(t)))} | "
              f"{h['samples'].get('main/' + t, 0)} |" for t, v in h["main"].items()]
    return lines + [f"| **all (token-weighted)** | {_f(h['main_mean'])} | {_f(hp.get('main_mean'))} | "
                    f"{_f(_gain(h['main_mean'], hp.get('main_mean')))} | |", ""]


def _md_targets(m: dict[str, Any], heading: str) -> list[str]:
    tg = m.get("targets") or {}
    if not tg.get("stages"):
        return []
    lines = [
        f"{heading}# Held-out targets vs max_text_tokens ({tg['max_text_tokens']}, {tg['format']} text)", "",
        "| stage | targets | cut (content lost) per task | items dropped to fit per task |", "|---|---:|---|---|",
    ]
    for name, c in tg["stages"].items():
        cut = ", ".join(f"{t} {v}" for t, v in c["cut_tasks"].items()) or "none"
        dropped = ", ".join(f"{t} {v}" for t, v in c["dropped_items"].items()) or "none"
        lines.append(f"| {name} | {c['targets']} | {cut} | {dropped} |")
    return lines + [""]


def _md_recall_row(name: str, d: dict[str, Any]) -> str:
    return f"| {name} | {_f(d.get('R@1'), '.3f')} | {_f(d.get('R@5'), '.3f')} |"


def _md_retrieval(m: dict[str, Any], heading: str) -> list[str]:
    r = m.get("retrieval")
    if not r:
        return []
    row = _md_recall_row
    uniq = r.get("unique_captions")
    lines = [
        f"{heading}# Image-text retrieval (MoCo embeddings, gallery {r['gallery']}"
        + (f", {uniq} unique captions" if uniq is not None else "") + ")", "",
        "| direction | R@1 | R@5 |", "|---|---:|---:|",
        row("image -> text", r["image_to_text"]), row("text -> image", r["text_to_image"]),
        row("chance", r["chance"]), "",
        "Any gallery item with the query's caption text is a match; a score tie with a different text "
        "counts as a miss; chance accounts for repeated captions.", "",
    ]
    cl = r.get("class_level")
    if cl:
        lines += [
            f"Class level (the {cl['classes']} unique captions ranked; images grouped by caption):", "",
            "| direction | R@1 | R@5 |", "|---|---:|---:|",
            row("image -> caption", cl["image_to_text"]), row("caption -> image group", cl["text_to_image"]),
            row("chance", cl["chance"]), "",
        ]
    return lines


def _md_instructions(m: dict[str, Any], heading: str) -> list[str]:
    ins = m.get("instructions")
    if not ins:
        return []
    lines = [
        f"{heading}# Instructions: held-out answers ({ins['answers']} answers in {ins['conversations']} "
        f"conversations about {ins['images']} held-out images)", "",
        "| | true images | permuted images |", "|---|---:|---:|",
        f"| exact-match accuracy | {_f(ins['accuracy'], '.3f')} | {_f(ins['accuracy_permuted'], '.3f')} |",
        f"| L_reg (answer tokens) | {_f(ins['lreg'])} | {_f(ins['lreg_permuted'])} |", "",
        "Greedy answers, each turn given the true turns before it; exact match after lower-casing and removing "
        "punctuation and articles. Permuted: the same conversation asked about another held-out image.", "",
    ]
    if ins.get("examples"):
        lines += ["| key | question | answer | generated | generated, permuted image |", "|---|---|---|---|---|"]
        lines += [f"| {e['key']} | {e['question']} | {e['answer']} | {e['generated']!r} | "
                  f"{e['generated_permuted_image']!r} |" for e in ins["examples"]]
        lines.append("")
    return lines


def _md_routing(m: dict[str, Any], heading: str) -> list[str]:
    ro = m.get("routing")
    if not ro:
        return []
    names = ro["experts"]
    lines = [
        f"{heading}# Routing (top-{ro['top_k']} of {len(names)} experts)", "",
        "| prompts | " + " | ".join(names) + " | entropy | load balance |",
        "|---|" + "---:|" * (len(names) + 2),
    ]
    for t, st in [("all", ro["overall"])] + list(ro["per_task"].items()):
        lines.append(
            f"| {t} | " + " | ".join(_f(x, ".3f") for x in st["mass"])
            + f" | {_f(st['entropy'], '.3f')} | {_f(st['load_balance'], '.3f')} |"
        )
    return lines + ["", "Entropy in nats (max log k); load balance 1 = even, n = all tokens on one expert.", ""]
