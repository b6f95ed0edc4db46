"""Instruction data (issue 16): LLaVA-format files joined with the store, per-turn loss masks, buckets.

The files here are written in the real layout (a JSON list of {id, image, conversations: [{from, value}]},
or JSON Lines), multi-turn, with an image that is not in the store and a text-only record.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from astrea.cli import app
from astrea.train import TrainConfig
from astrea.train.data import Collator, Position, batches, is_heldout, store_opener
from astrea.train.errors import TrainError
from astrea.train.instructions import (
    Dialogue,
    encode_dialogue,
    join,
    key_candidates,
    normalize_answer,
    read_instructions,
    store_keys,
)
from astrea.train.model import IGNORE
from astrea.train.stages import build_stages
from astrea.train.store_check import resolve_experts
from astrea.train.tokenizer import byte_level_tokenizer

LLAVA = [
    {"id": "000000033471", "image": "coco/train2017/img00003.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the bus?"},
        {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "How many wheels can you see?"},
        {"from": "gpt", "value": "Two."},
    ]},
    {"id": "000000052846", "image": "coco/train2017/not_in_store.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."},
    ]},
    {"id": "sharegpt_7", "conversations": [
        {"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."},
    ]},
]


def write_llava(path, records=LLAVA, jsonl=False):
    path.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records, indent=2))
    return path


def main_cfg(store, tmp_path, files, **over):
    return TrainConfig.load(None, {
        "store": str(store), "data": "toy", "out": str(tmp_path / "run"), "stages": ["main"],
        "llm.text_warmup_steps": 0, "instructions.files": [str(f) for f in files], **over,
    })


def plain_ids(tok, question, answer):
    """Ids of one plain-template turn: the question part (no loss), then the answer + EOS (loss)."""
    q = tok(f"USER: {question}\nASSISTANT: ", add_special_tokens=False).input_ids
    a = tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
    return q, a


def test_llava_file_joined_with_the_store_and_masked_per_turn(toy_store, tmp_path):
    f = write_llava(tmp_path / "llava.json")
    cfg = main_cfg(toy_store, tmp_path, [f], **{"dataset.heldout_fraction": 0.0})
    (stage,) = build_stages(cfg)
    experts = stage.required_experts()
    stage.ctx.specs = resolve_experts(cfg.store, cfg.data, experts, {}, needed_by={})
    joined = stage.join_instructions()
    assert joined.counts() == {"records": 3, "matched": 1, "images": 1, "text_only": 1, "unmatched": 1}
    assert [c.image for c in joined.unmatched] == ["coco/train2017/not_in_store.jpg"]
    assert list(joined.by_key) == ["img00003"]  # "coco/train2017/img00003.jpg" -> the folder-style stem

    opener = stage.wrap_opener(store_opener(cfg.store, cfg.data, experts, seed=0, rank=0, world_size=1),
                               rank=0, world_size=1)
    recs = [r for r in opener(0, False) if "instruction" in r]
    assert sorted(r["key"] for r in recs) == ["img00003", "text-only:sharegpt_7"]
    tok = byte_level_tokenizer()
    batch = Collator(stage.render, tok, experts, 256)(sorted(recs, key=lambda r: r["key"]))
    assert batch["keys"] == ["img00003", "text-only:sharegpt_7"]
    assert batch["has_image"] == [True, False]
    for e in experts:  # the text-only record's image is blank: all-zero features
        assert float(batch["tokens"][e][1].abs().sum()) == 0.0 and float(batch["tokens"][e][0].abs().sum()) > 0

    # exactly: BOS, then per turn the question (no loss) and the answer + EOS (loss), nothing else
    q1, a1 = plain_ids(tok, "What colour is the bus?", "Red.")  # <image> removed: the grid comes first
    q2, a2 = plain_ids(tok, "How many wheels can you see?", "Two.")
    want_ids = [tok.bos_token_id] + q1 + a1 + q2 + a2
    want_labels = [IGNORE] * (1 + len(q1)) + a1 + [IGNORE] * len(q2) + a2
    n = len(want_ids)
    assert batch["input_ids"][0, :n].tolist() == want_ids
    assert batch["labels"][0, :n].tolist() == want_labels
    assert batch["labels"][0, n:].eq(IGNORE).all() and batch["attention_mask"][0, n:].eq(0).all()
    assert batch["prompts"][0] == "USER: What colour is the bus?\nASSISTANT: "
    q, a = plain_ids(tok, "Name a colour.", "Blue.")
    m = len(q) + len(a) + 1
    assert batch["labels"][1, :m].tolist() == [IGNORE] * (1 + len(q)) + a


def test_chat_template_masks_each_assistant_turn_with_its_end_marker():
    tok = byte_level_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    turns = [("system", "Be brief."), ("user", "Colour?"), ("assistant", "Red."), ("user", "Count?"),
             ("assistant", "Two.")]
    d = Dialogue(turns).rendered(tok)
    assert d.segments == [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nColour?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Red.<|im_end|>\n", True),
        ("<|im_start|>user\nCount?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Two.<|im_end|>\n", True),
    ]
    ids, labels, dropped, cut = encode_dialogue(d, tok, 1000)
    trained = tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE])
    assert trained == "Red.<|im_end|>\nTwo.<|im_end|>\n" and dropped == 0 and not cut


def test_turns_that_do_not_fit_are_dropped_whole_and_counted():
    tok = byte_level_tokenizer()
    d = Dialogue([("user", "q" * 10), ("assistant", "a" * 10), ("user", "q" * 10), ("assistant", "b" * 10)])
    ids, labels, dropped, cut = encode_dialogue(d, tok, 60)  # room for the first turn only
    assert dropped == 1 and not cut
    assert tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE]) == "a" * 10 + "</s>"
    assert labels[-1] != IGNORE  # no trailing question without its answer
    ids, labels, dropped, cut = encode_dialogue(d, tok, 30)  # not even the first answer: cut, counted
    assert cut and len(ids) == 30


def test_jsonl_and_bad_records_name_the_file_and_record(tmp_path):
    f = write_llava(tmp_path / "llava.jsonl", jsonl=True)
    convs = read_instructions(f)
    assert [c.id for c in convs] == ["000000033471", "000000052846", "sharegpt_7"]
    assert convs[2].text_only and not convs[0].text_only
    assert convs[0].turns[0] == ("user", "What colour is the bus?")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(LLAVA[0]) + "\n{not json\n")
    with pytest.raises(TrainError, match="line 2"):
        read_instructions(bad)
    swapped = dict(LLAVA[1], conversations=LLAVA[1]["conversations"][::-1])
    with pytest.raises(TrainError, match="record 1: turns must alternate"):
        read_instructions(write_llava(tmp_path / "swapped.json", [LLAVA[0], swapped]))
    with pytest.raises(TrainError, match="record 0, turn 0: unknown speaker"):
        read_instructions(write_llava(tmp_path / "who.json", [{"image": "a.jpg", "conversations": [
            {"from": "robot", "value": "hi"}]}]))


def test_config_fields_are_typed_and_checked(toy_store, tmp_path):
    f = write_llava(tmp_path / "llava.json")
    with pytest.raises(TrainError, match="instructions.match"):
        main_cfg(toy_store, tmp_path, [f], **{"instructions.match": "fuzzy"}).validate()
    with pytest.raises(TrainError, match="instructions.bucket"):
        main_cfg(toy_store, tmp_path, [f], **{"instructions.bucket": -1}).validate()
    with pytest.raises(TrainError, match="instructions.files: .*nope.json is not a file"):
        main_cfg(toy_store, tmp_path, [tmp_path / "nope.json"]).validate()
    with pytest.raises(TrainError, match="no main stage"):
        main_cfg(toy_store, tmp_path, [f], stages=["caption"]).validate()
    with pytest.raises(TrainError, match=r"unknown config field\(s\) \['instructions.filez'\]"):
        TrainConfig.load(None, {"instructions.filez": "x"})


def test_image_paths_map_to_each_source_kinds_keys():
    from astrea.data.base import key_from_relpath
    from astrea.data.sample import img2dataset_key

    keys = {
        img2dataset_key(1, 3),  # img2dataset: 000010003
        "000000033471",  # COCO source: the file name's stem
        key_from_relpath("cats/IMG 1.jpg"),  # folder source rooted above cats/: cats__IMG_1
    }
    convs = read_instructions_from([
        ("00001/000010003.jpg", "000010003"),
        ("coco/train2017/000000033471.jpg", "000000033471"),
        ("33471.jpg", "000000033471"),  # an id-named file -> the 12-digit COCO stem
        ("photos/cats/IMG 1.jpg", "cats__IMG_1"),
        ("cats/IMG 2.jpg", None),
    ])
    joined = join([c for c, _ in convs], keys)
    got = {c.image: k for k, cs in joined.by_key.items() for c in cs}
    assert got == {c.image: k for c, k in convs if k}
    assert [c.image for c in joined.unmatched] == ["cats/IMG 2.jpg"]
    assert key_candidates("000010003", "key") == ["000010003"]
    assert key_candidates("a/b/c.jpg", "stem") == ["c"]


def read_instructions_from(pairs):
    from astrea.train.instructions import Conversation

    return [(Conversation(str(i), img, [("user", "q"), ("assistant", "a")]), key) for i, (img, key) in enumerate(pairs)]


def test_bucketed_batches_group_lengths_and_resume_exactly():
    records = [{"key": f"k{i:03d}", "n": int(n)} for i, n in enumerate(np.random.default_rng(0).integers(1, 50, 40))]

    def opener(epoch, shuffle):
        return iter(records)

    class Collate:
        skipped = 0

        def __call__(self, recs):
            return {"keys": [r["key"] for r in recs], "n": [r["n"] for r in recs]}

    kw = dict(heldout_fraction=0.1, shuffle=True, bucket=4, length=lambda r: r["n"], seed=3)
    stream = batches(opener, Collate(), 3, **kw)
    full = [next(stream) for _ in range(20)]
    # within a pool of 4 x 3 records, batches hold neighbouring lengths: far less spread than stream order
    unbucketed = batches(opener, Collate(), 3, heldout_fraction=0.1)
    spread = np.mean([max(b["n"]) - min(b["n"]) for b, _ in full[:12]])
    plain = np.mean([max(b["n"]) - min(b["n"]) for b, _ in (next(unbucketed) for _ in range(12))])
    assert spread < plain / 2, (spread, plain)
    training = [r["key"] for r in records if not is_heldout(r["key"], 0.1)]
    assert {k for b, _ in full[:4] for k in b["keys"]} == set(training[:12])  # a pool: the stream's next 12
    for cut in (1, 2, 5, 9, 13):  # resume from every kind of position: mid-pool, pool end, next epoch
        pos = full[cut - 1][1]
        resumed = batches(opener, Collate(), 3, start=Position(*pos.to_dict().values()), **kw)
        assert [next(resumed)[0]["keys"] for _ in range(20 - cut)] == [b["keys"] for b, _ in full[cut:]], cut


def test_answer_normalisation():
    assert normalize_answer("  The Red bus. ") == normalize_answer("red bus") == "red bus"
    assert normalize_answer("Two!") == "two"


def test_astrea_data_instructions_lists_unmatched_images(toy_store, tmp_path):
    f = write_llava(tmp_path / "llava.json")
    res = CliRunner().invoke(app, ["data", "instructions", str(f), "--store", str(toy_store), "--data", "toy"])
    assert res.exit_code == 0, res.output
    assert "3 records, 1 joined to 1 store images, 1 text-only, 1 skipped" in res.output
    assert "unmatched\t000000052846\tcoco/train2017/not_in_store.jpg\t" in res.output
    assert store_keys(str(toy_store), "toy", ["siglip", "sam2"]) == {f"img{i:05d}" for i in range(48)}


def test_a_file_none_of_whose_images_is_in_the_store_fails_before_training(toy_store, tmp_path):
    from astrea.train import run

    f = write_llava(tmp_path / "llava.json", [LLAVA[1], LLAVA[2]])
    cfg = main_cfg(toy_store, tmp_path, [f], **{"instructions.text_only": False, "progress": False})
    with pytest.raises(TrainError, match="none of the 2 records' images is in .*astrea data instructions"):
        run(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
