"""The permuted-image control (issue 13.1) and the tiny LLM's text-only warm-up (issue 13.2)."""

from __future__ import annotations

import json

import pytest
import torch

from astrea.train.data import derangement, with_permuted_features
from tests.train.test_eval import train_tiny


@pytest.mark.parametrize("n", [2, 3, 7, 64])
def test_derangement_moves_every_sample_and_is_seeded(n):
    d = derangement(n, seed=1)
    assert sorted(d) == list(range(n))
    assert all(d[i] != i for i in range(n))
    assert d == derangement(n, seed=1)
    assert derangement(1) == [0]


def test_permuted_features_keep_texts_and_move_features_across_batches():
    def batch(keys):
        n = len(keys)
        ids = torch.arange(n)[:, None].float()
        return {"keys": keys, "input_ids": torch.zeros(n, 3), "targets": [f"t{k}" for k in keys],
                "tokens": {"a": ids.expand(n, 4)[:, :, None].clone()}, "pooled": {"a": ids.clone()}}

    bs = [batch(["k0", "k1", "k2"]), batch(["k3"])]
    bs[1]["tokens"]["a"] += 3
    bs[1]["pooled"]["a"] += 3
    out = with_permuted_features(bs, seed=0)
    perm = derangement(4, seed=0)
    got = [int(v) for b in out for v in b["pooled"]["a"][:, 0]]
    assert got == perm  # sample i now carries sample perm[i]'s features
    assert [b["keys"] for b in out] == [b["keys"] for b in bs] and out[1]["targets"] == ["tk3"]
    assert all(int(b["tokens"]["a"][i, 0, 0]) == int(b["pooled"]["a"][i, 0]) for b in out for i in range(len(b["keys"])))
    assert [int(v) for v in bs[0]["pooled"]["a"][:, 0]] == [0, 1, 2]  # the input is not modified


def test_eval_and_summary_carry_the_permuted_control(tmp_path):
    from astrea.train.eval import EvalConfig, evaluate

    from tests.train.test_eval import TINY_TRAIN

    run = train_tiny(tmp_path, stages=["caption", "main"], steps=3, llm={"text_warmup_steps": 0},
                     moe={"top_k": 1})
    m = evaluate(EvalConfig(run=str(run)))
    for part in ("heldout", "heldout_permuted"):
        assert set(m[part]["stages"]) == {"caption"}
        assert set(m[part]["main"]) == {"caption", "tags", "boxes", "masks"}
        assert m[part]["main_mean"] is not None
    assert m["heldout_permuted"]["stages"]["caption"] != m["heldout"]["stages"]["caption"]
    md = (run / "eval.md").read_text()
    assert "L_reg permuted images" in md and "image gain" in md
    summary = json.loads((run / "summary.json").read_text())
    assert all(isinstance(s["heldout_permuted_after"], float) for s in summary["stages"])
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows if r.get("kind") == "heldout_permuted"} == {"caption", "main"}


def test_text_warmup_trains_the_tiny_llm_on_training_texts_only(tmp_path):
    from astrea.train.data import is_heldout
    from astrea.train.llm import build_llm
    from astrea.train.config import TrainConfig

    run = train_tiny(tmp_path, stages=["caption"], steps=1, llm={"text_warmup_steps": 30, "text_warmup_batch": 4})
    info = json.loads((run / "run.json").read_text())["llm"]
    w = info["text_warmup"]
    assert info["random_weights"] is True  # random init stays labelled as such
    assert w["steps"] == 30 and w["texts"] > 0 and w["loss_last"] < w["loss_first"]
    assert info["tokenizer"]["kind"] == "fitted" and 260 < info["tokenizer"]["vocab"] <= 1024
    # the saved LLM is the warmed one, not a fresh random one
    cfg = TrainConfig.load(run / "config.yaml")
    reloaded = build_llm(cfg.llm, from_dir=run / "llm")
    saved = reloaded.model.state_dict()
    fresh = build_llm(cfg.llm.__class__(**{**cfg.llm.__dict__, "tokenizer": "bytes"})).model.state_dict()
    assert any(saved[k].shape != fresh[k].shape or not torch.equal(saved[k], fresh[k]) for k in fresh)
    # the fitted tokenizer travels with the weights: resume and eval encode exactly as training did
    assert len(reloaded.tokenizer) == info["tokenizer"]["vocab"] == saved["model.embed_tokens.weight"].shape[0]
    assert reloaded.tokenizer_info["kind"] == "fitted"
    # summary and CLI say what the LLM is
    from astrea.cli.train import format_summary

    text = format_summary(json.loads((run / "summary.json").read_text()))
    assert "text-only warm-up" in text and "RANDOM init" in text


def test_text_warmup_reads_the_training_split_only(tmp_path, monkeypatch):
    import astrea.train.text_warmup as tw
    from astrea.train.config import TrainConfig
    from astrea.train.data import is_heldout
    from astrea.train.runner import _TextWarmup
    from astrea.train.stages import build_stages
    from tests.train.test_eval import write_store
    from tests.train.test_main_stage import records

    store = write_store(tmp_path / "store")
    cfg = TrainConfig.from_dict({"store": str(store), "data": "tiny", "out": str(tmp_path / "run"),
                                 "stages": ["caption", "main"], "dataset": {"heldout_fraction": 0.3},
                                 "moe": {"top_k": 1}})
    seen = {}
    monkeypatch.setattr(tw, "warm_up", lambda model, tok, texts, **kw: seen.setdefault("texts", texts) and {})
    from astrea.train.tokenizer import byte_level_tokenizer

    warm = _TextWarmup(cfg, build_stages(cfg), torch.device("cpu"))
    warm(torch.nn.Linear(1, 1), byte_level_tokenizer())
    targets = " ".join(t for _, t in seen["texts"])
    fitted_on = "\n".join(warm.texts())  # what a fitted tokenizer learns its merges from
    held = [r["caption"] for r in records(24) if is_heldout(r["key"], 0.3)]
    train = [r["caption"] for r in records(24) if not is_heldout(r["key"], 0.3)]
    assert held and train
    assert not [c for c in held if c + "\n" in targets + "\n" or targets.endswith(c)]
    assert all(c in targets for c in train)
    assert not [c for c in held if c in fitted_on.split("\n")] and all(c in fitted_on for c in train)
    prompts = {p for p, _ in seen["texts"]}
    assert len(prompts) >= 2  # the caption stage's prompt and the main stage's per-task prompts


def test_collect_texts_dedupes_and_respects_the_limit():
    from astrea.train.templates import Rendered
    from astrea.train.text_warmup import collect_texts

    recs = [{"caption": c} for c in ["a", "b", "a", "c", "d"]]
    render = lambda r: Rendered("P:", r["caption"], "caption")  # noqa: E731
    none = lambda r: None  # noqa: E731
    assert collect_texts(recs, [render, none], limit=10) == [("P:", "a"), ("P:", "b"), ("P:", "c"), ("P:", "d")]
    assert len(collect_texts(recs, [render], limit=2)) == 2
