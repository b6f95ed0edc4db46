"""Instruction data (LLaVA format) joined with the feature store by image key.

Accepted files (``--instructions FILE``, repeatable): a JSON list or JSON Lines, one record per
conversation, the layout of LLaVA-Instruct-665K, ShareGPT4V and most open VLM data::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the bus?"},
                       {"from": "gpt", "value": "Red."}, {"from": "human", "value": "..."}, ...]}

``from`` is ``human``/``user`` or ``gpt``/``assistant`` (a leading ``system`` turn is kept as context);
a record without ``image`` is text-only. The ``<image>`` placeholder is removed from the text: Astrea puts
the fused visual grid before the text of every sample (the placeholder always opens LLaVA's first turn).

Image -> store key (:func:`key_candidates`, ``instructions.match: auto``): the first candidate the store
holds, tried from the most specific to the least:

1. the whole path as a folder source keys it (``key_from_relpath``: ``coco/train2017/0001.jpg`` ->
   ``coco__train2017__0001``), then the same with leading folders dropped one at a time
   (``train2017__0001``, ``0001``): a folder source rooted at any level of the path matches;
2. the file stem (img2dataset keys: ``00000/000010003.jpg`` -> ``000010003``; COCO source keys are the
   file name's stem, ``000000033471``);
3. a numeric stem as a COCO image id (``33471`` <-> ``000000033471``, 12 digits).

``match: key`` takes ``image`` as the store key verbatim; ``match: stem`` only the stem. Records whose image
is not in the store are counted and skipped (``astrea data instructions`` lists them).

Rendering (:func:`render_dialogue`): the LLM's chat template when its tokenizer has one, else a plain
Vicuna-style template (``USER: ...\\nASSISTANT: ...</s>``). Loss is on assistant turns only (Eq. 1 per
turn): each assistant segment (and the end of its turn) carries labels, everything else is -100.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from astrea.train.errors import TrainError

IMAGE_TOKEN = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MATCH_MODES = ("auto", "key", "stem")
TEXT_ONLY_PREFIX = "text-only:"  # key of a text-only record (held-out split and MoCo ids use keys)


@dataclass
class InstructionConfig:
    """``instructions:`` section of the train config (the main stage's instruction data)."""

    files: list[str] = field(default_factory=list)  # LLaVA-format JSON / JSONL; empty: no instruction data
    match: str = "auto"  # image -> store key: auto | key | stem (see the module doc)
    # the pre-alignment targets (caption, tags, boxes, masks; one task per image) as one more source
    with_targets: bool = False
    text_only: bool = True  # train text-only records (blank image: all-zero expert features); false: skip them
    template: str = "auto"  # auto: the LLM's chat template when it has one, else plain | plain
    # length-bucketed batches: records are read in pools of bucket x batch_size, sorted by length, cut into
    # batches, and the batches of a pool shuffled (0: batches in stream order)
    bucket: int = 8
    max_turns: int = 0  # assistant turns kept per record (0: all)

    def validate(self) -> None:
        from astrea.registry import check_choice

        try:
            check_choice("instructions.match", self.match, MATCH_MODES)
            check_choice("instructions.template", self.template, ("auto", "plain"))
        except ValueError as e:
            raise TrainError(str(e)) from None
        if self.bucket < 0:
            raise TrainError(f"config field instructions.bucket={self.bucket} must be >= 0 (0: no bucketing)")
        if self.max_turns < 0:
            raise TrainError(f"config field instructions.max_turns={self.max_turns} must be >= 0 (0: all)")
        for f in self.files:
            if not Path(f).expanduser().is_file():
                raise TrainError(f"config field instructions.files: {f} is not a file")

    def build(self) -> list["Conversation"]:
        """Parse every file (errors name the file and the record)."""
        self.validate()
        out: list[Conversation] = []
        for f in self.files:
            out += read_instructions(f, max_turns=self.max_turns)
        return out


@dataclass
class Conversation:
    id: str
    image: str | None  # None: text-only
    turns: list[tuple[str, str]]  # (role: system | user | assistant, text without <image>)
    source: str = ""  # file:record for messages

    @property
    def text_only(self) -> bool:
        return self.image is None

    def chars(self) -> int:
        return sum(len(t) for _, t in self.turns)


# -- reading ----------------------------------------------------------------------------------------
def _records(path: Path) -> Iterator[tuple[int, Any]]:
    text = path.read_text(encoding="utf-8")
    head = text.lstrip()[:1]
    if head == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TrainError(f"{path}: not valid JSON ({e})") from None
        yield from enumerate(data)
        return
    for n, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainError(f"{path}: line {n + 1} is not valid JSON ({e}); expected a JSON list or JSON Lines") from None


def read_instructions(path: str | Path, *, max_turns: int = 0) -> list[Conversation]:
    """Parse a LLaVA-format file; a malformed record is an error naming the file and record."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise TrainError(f"instruction file {p} does not exist")
    out = []
    for n, rec in _records(p):
        where = f"{p}: record {n}"
        if not isinstance(rec, dict):
            raise TrainError(f"{where}: expected an object with id, image, conversations")
        conv = rec.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise TrainError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} turns")
        image = rec.get("image")
        if isinstance(image, list):  # multi-image records: Astrea's grid is one image
            if len(image) != 1:
                raise TrainError(f"{where}: {len(image)} images; Astrea takes one image per sample")
            image = image[0]
        if image is not None and not isinstance(image, str):
            raise TrainError(f"{where}: 'image' must be a path string, got {image!r}")
        turns: list[tuple[str, str]] = []
        for t, turn in enumerate(conv):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise TrainError(f"{where}, turn {t}: expected {{'from': ..., 'value': str}}")
            role = ROLES.get(str(turn.get("from", "")).lower())
            if role is None:
                raise TrainError(f"{where}, turn {t}: unknown speaker {turn.get('from')!r}; "
                                 f"expected one of {sorted(ROLES)}")
            text = turn["value"].replace(IMAGE_TOKEN, "").strip()
            turns.append((role, text))
        roles = [r for r, _ in turns if r != "system"]
        if [r for r, _ in turns[: len(turns) - len(roles)]] != ["system"] * (len(turns) - len(roles)):
            raise TrainError(f"{where}: a system turn may only open the conversation")
        if not roles or any(r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles)):
            raise TrainError(f"{where}: turns must alternate human, gpt, human, gpt, ... (got {roles})")
        if roles[-1] != "assistant":
            turns = turns[:-1]  # a trailing question without an answer carries no loss
        if max_turns:
            kept, answers = [], 0
            for r, x in turns:
                if r == "assistant":
                    answers += 1
                kept.append((r, x))
                if answers == max_turns:
                    break
            turns = kept
        if not any(r == "assistant" for r, _ in turns):
            raise TrainError(f"{where}: no gpt turn; nothing to train on")
        out.append(Conversation(id=str(rec.get("id", n)), image=image or None, turns=turns, source=where))
    return out


# -- image -> key -----------------------------------------------------------------------------------
def key_candidates(image: str, match: str = "auto") -> list[str]:
    """Store keys an instruction record's ``image`` may have, most specific first (module doc)."""
    from astrea.data.base import key_from_relpath

    if match == "key":
        return [image]
    rel = str(PurePosixPath(image.replace("\\", "/"))).lstrip("/")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    stem = key_from_relpath(parts[-1]) if parts else ""
    if match == "stem":
        return [stem]
    out = [key_from_relpath("/".join(parts[i:])) for i in range(len(parts))]
    out.append(stem)
    if stem.isdigit():
        out += [str(int(stem)), f"{int(stem):012d}"]
    return list(dict.fromkeys(k for k in out if k))


def store_keys(store: str, dataset: str, experts: list[str]) -> set[str]:
    """Keys with features (status ok) for every one of ``experts`` in the store's committed units."""
    from astrea.schemas.unit import STATUS_OK
    from astrea.shards import Store

    st = Store(store)
    common: set[str] | None = None
    for e in experts:
        edir = st.resolve(dataset, e)
        keys: set[str] = set()
        for unit in edir.committed_units():
            t = edir.read_index(unit)
            for k, s in zip(t.column("key").to_pylist(), t.column("status").to_pylist(), strict=True):
                if s == STATUS_OK:
                    keys.add(k)
        common = keys if common is None else common & keys
    return common or set()


@dataclass
class Joined:
    """Instruction records joined with the store (what the main stage trains on)."""

    conversations: list[Conversation]
    by_key: dict[str, list[Conversation]]  # store key -> conversations about that image
    text_only: list[Conversation]
    unmatched: list[Conversation]  # image not in the store: counted, skipped

    def counts(self) -> dict[str, int]:
        return {
            "records": len(self.conversations),
            "matched": sum(len(v) for v in self.by_key.values()),
            "images": len(self.by_key),
            "text_only": len(self.text_only),
            "unmatched": len(self.unmatched),
        }

    def summary(self) -> str:
        c = self.counts()
        return (f"instructions: {c['records']} records, {c['matched']} joined to {c['images']} store images, "
                f"{c['text_only']} text-only, {c['unmatched']} skipped (image not in the store)")


def join(conversations: list[Conversation], keys: set[str], match: str = "auto") -> Joined:
    by_key: dict[str, list[Conversation]] = {}
    text_only, unmatched = [], []
    for c in conversations:
        if c.text_only:
            text_only.append(c)
            continue
        key = next((k for k in key_candidates(c.image or "", match) if k in keys), None)
        if key is None:
            unmatched.append(c)
        else:
            by_key.setdefault(key, []).append(c)
    return Joined(conversations, by_key, text_only, unmatched)


def join_store(cfg: Any, experts: list[str]) -> Joined:
    """Parse ``cfg.instructions.files`` and join them with ``cfg.store``/``cfg.data`` (``experts`` all present)."""
    return join(cfg.instructions.build(), store_keys(cfg.store, cfg.data, experts), cfg.instructions.match)


# -- the stream -------------------------------------------------------------------------------------
def blank_features(specs: dict[str, Any], experts: list[str]) -> dict[str, dict[str, Any]]:
    """All-zero features per expert, the "no image" input of a text-only record."""
    out = {}
    for e in experts:
        s = specs[e]
        out[e] = {"tokens": np.zeros((s.grid * s.grid, s.token_dim), np.float32),
                  "pooled": np.zeros((s.pooled_dim,), np.float32), "outputs": {}}
    return out


def instruction_opener(base: Any, joined: Joined, *, blank: dict[str, Any] | None, with_targets: bool,
                       seed: int, rank: int, world_size: int) -> Any:
    """Wrap a store opener: each store record becomes one sample per conversation about its image (plus
    itself when ``with_targets``: the pre-alignment targets); text-only records (``blank`` features, this
    rank's share) are spread evenly through the epoch. Deterministic per (epoch, shuffle): exact resume."""
    mine = [c for i, c in enumerate(joined.text_only) if i % world_size == rank] if blank is not None else []
    per_rank_images = max(1, len(joined.by_key) // world_size)
    ratio = len(mine) / per_rank_images

    def text_sample(c: Conversation) -> dict[str, Any]:
        return {"key": TEXT_ONLY_PREFIX + c.id, "caption": None, "labels": {}, "experts": blank,
                "instruction": c, "text_only": True}

    def open_epoch(epoch: int, shuffle: bool) -> Iterable[dict[str, Any]]:
        order = list(range(len(mine)))
        if shuffle:
            np.random.default_rng([seed, epoch, rank]).shuffle(order)
        done = 0
        n = 0
        for rec in base(epoch, shuffle):
            n += 1
            for c in joined.by_key.get(rec["key"], []):
                yield {**rec, "instruction": c}
            if with_targets:
                yield rec
            while done < len(order) and done < int(n * ratio):
                yield text_sample(mine[order[done]])
                done += 1
        for i in order[done:]:
            yield text_sample(mine[i])

    return open_epoch


# -- rendering --------------------------------------------------------------------------------------
@dataclass
class Dialogue:
    """A conversation to train on; ``segments[i] = (text, carries_loss)`` once rendered with the LLM's
    tokenizer (:meth:`rendered`: the collator does it, the stage does not hold the tokenizer).

    ``prompt`` is the text before the first answer (the router's instruction context reads it), ``target``
    the answers joined (logs). ``task`` is "instruction" (routing statistics per task type)."""

    turns: list[tuple[str, str]]
    template: str = "auto"
    segments: list[tuple[str, bool]] = field(default_factory=list)
    task: str = "instruction"
    lines: list = field(default_factory=list)  # no item lists: fitting drops whole turns instead

    @property
    def answers(self) -> list[str]:
        return [t for r, t in self.turns if r == "assistant"]

    def rendered(self, tokenizer: Any) -> "Dialogue":
        if self.segments:
            return self
        return Dialogue(self.turns, self.template, render_dialogue(self.turns, tokenizer, self.template), self.task)

    @property
    def prompt(self) -> str:
        out = []
        for text, loss in self.segments:
            if loss:
                break
            out.append(text)
        return "".join(out)

    @property
    def target(self) -> str:
        return "\n".join(self.answers)


PLAIN_USER = "USER: {text}\nASSISTANT: "
PLAIN_SYSTEM = "{text}\n"


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_dialogue(turns: list[tuple[str, str]], tokenizer: Any, template: str = "auto") -> list[tuple[str, bool]]:
    """Segments of a conversation; the assistant's text and its end of turn carry loss.

    Plain template: ``USER: q\\nASSISTANT: `` (no loss) then ``a`` + EOS (loss), turn after turn. Chat
    template: the template rendered for each growing prefix; what an assistant turn adds after the
    generation prompt is its segment (the template's own end-of-turn marker included)."""
    if template == "plain" or not has_chat_template(tokenizer):
        eos = tokenizer.eos_token or ""
        segs: list[tuple[str, bool]] = []
        for role, text in turns:
            if role == "system":
                segs.append((PLAIN_SYSTEM.format(text=text), False))
            elif role == "user":
                segs.append((PLAIN_USER.format(text=text), False))
            else:
                segs.append((text + eos, True))
        return _merge(segs)
    msgs = [{"role": r, "content": t} for r, t in turns]
    segs, done = [], ""
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            head = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
            if not head.startswith(done) or not full.startswith(head):
                raise TrainError("the LLM's chat template does not render a conversation as a growing prefix; "
                                 "use --set instructions.template=plain")
            segs += [(head[len(done):], False), (full[len(head):], True)]
            done = full
    return _merge(segs)


def prompt_text(turns: list[tuple[str, str]], tokenizer: Any, template: str = "auto") -> str:
    """The text a model is given to answer the last (user) turn of ``turns``: what generation continues.

    Exactly the training rendering up to where the answer's segment would start."""
    if template == "plain" or not has_chat_template(tokenizer):
        return "".join(t for t, _ in render_dialogue(turns, tokenizer, "plain"))
    msgs = [{"role": r, "content": t} for r, t in turns]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def _merge(segs: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    for text, loss in segs:
        if not text:
            continue
        if out and out[-1][1] == loss:
            out[-1] = (out[-1][0] + text, loss)
        else:
            out.append((text, loss))
    return out


def encode_dialogue(d: Dialogue, tokenizer: Any, max_len: int) -> tuple[list[int], list[int], int, bool]:
    """Token ids and labels (-100 where no loss) of a dialogue, BOS first, at most ``max_len`` tokens.

    Whole turns that do not fit are dropped from the end (returned: how many answer segments were dropped);
    only when the first answer itself does not fit is the sequence cut (returned: cut=True)."""
    from astrea.train.labels import IGNORE

    d = d.rendered(tokenizer)
    ids: list[int] = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    labels: list[int] = [IGNORE] * len(ids)
    pieces = [(tokenizer(text, add_special_tokens=False).input_ids, loss) for text, loss in d.segments]
    # The plain template spells EOS as text; the tokenizer maps "</s>" to its id (a special token).
    dropped, cut = 0, False
    answered = 0
    for i, (toks, loss) in enumerate(pieces):
        if len(ids) + len(toks) > max_len:
            if answered:  # drop this and the rest: whole turns only
                dropped = sum(1 for _, lo in pieces[i:] if lo)
                # a trailing question without its answer carries nothing: cut back to the last answer
                while labels and labels[-1] == IGNORE:
                    ids.pop()
                    labels.pop()
                break
            room = max_len - len(ids)
            ids += toks[:room]
            labels += (toks[:room] if loss else [IGNORE] * room)
            cut = True
            break
        ids += toks
        labels += toks if loss else [IGNORE] * len(toks)
        answered += int(loss)
    return ids, labels, dropped, cut


# -- answers ----------------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s]")


def normalize_answer(text: str) -> str:
    """VQA-style normalisation: lower case, punctuation and articles removed, whitespace collapsed."""
    t = _PUNCT.sub(" ", text.lower())
    t = _ARTICLES.sub(" ", t)
    return " ".join(t.split())
