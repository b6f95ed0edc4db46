"""Generated worlds: small feature stores where the right answer is known, to show a mechanism works.

Each world writes a real store through the store's own writer (``Store.expert_dir(...).open_unit``),
with the four pre-alignment experts' names and the DEVELOPING.md output conventions, so the trainer,
eval and report read it exactly as they read an extracted store. The features are not images run through
a model: they are built so that one question has one known answer, which is what a control needs.

- :func:`routing_world` (issue 13.3): every image has four independent attributes, one per task
  (caption, tags, boxes, masks), all drawn from the same eight words. Expert *i*'s tokens carry the
  attribute of task *i* and nothing else. The answer to a task is therefore in one expert only, and a
  router that knows the task should send that task's mass to that expert (the paper's Fig. 2 claim).
- :func:`residual_world` (issue 13.4): a grid of cells, each with a colour; one cell holds "the object".
  The classification expert's tokens carry every cell's colour (and its position), but not which cell is
  the object; the caption expert's tokens carry only where the object is. The classification stage's
  target names the object's colour, so it can only be predicted well by reading the classification
  expert's tokens *where the caption expert points*: what the random residual attention (Eq. 2-4) is for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from astrea.schemas import ExpertSpec
from astrea.schemas.stages import EXPERT_ORDER, PRE_ALIGNMENT

WORDS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
EXPERTS = EXPERT_ORDER  # the stage table's: caption, classification, detection, segmentation
TASK_EXPERT = {s.task: s.expert for s in PRE_ALIGNMENT}
BOX = [0.25, 0.25, 0.75, 0.75]


@dataclass
class World:
    store: Path
    dataset: str
    images: int
    experts: tuple[str, ...]
    description: str


def _spec(name: str, grid: int, dim: int, world: str, seed: int) -> ExpertSpec:
    return ExpertSpec(
        expert=name, arch=f"{name}.world-{world}", weights="random", weights_sha256="0" * 64,
        preprocessing={"world": world, "seed": seed}, grid=grid, token_dim=dim, pooled_dim=dim, seed=seed,
    )


def _mask_outputs(word: str) -> dict:
    from astrea.train.targets import encode_rle

    m = np.zeros((16, 16), bool)
    m[4:12, 4:12] = True
    return {"masks": [{"rle": encode_rle(m), "score": 0.9, "area": int(m.sum()), "box": BOX, "label": word}]}


def _outputs(name: str, word: str) -> dict:
    if name == "ram_plus":
        return {"tags": [word], "scores": [0.9]}
    if name == "grounding_dino":
        return {"boxes": [BOX], "labels": [word], "scores": [0.9]}
    if name == "sam2":
        return _mask_outputs(word)
    return {}


def _write(root: Path, dataset: str, specs: dict[str, ExpertSpec], rows: list[dict], per_unit: int) -> None:
    """rows[i] = {"key", "caption", "tokens": {expert: [P, D]}, "outputs": {expert: dict}}."""
    from astrea.shards import Store

    store = Store(root)
    for name, spec in specs.items():
        edir = store.expert_dir(dataset, spec, create=True)
        for u in range(0, len(rows), per_unit):
            w = edir.open_unit(f"{u // per_unit:05d}")
            for r in rows[u : u + per_unit]:
                t = r["tokens"][name].astype(np.float32)
                w.add(r["key"], t, t.mean(0), r["outputs"].get(name, {}), caption=r["caption"])
            w.commit()


def routing_world(root: str | Path, *, images: int = 480, grid: int = 2, dim: int = 16, noise: float = 0.3,
                  seed: int = 0, dataset: str = "routing", per_unit: int = 120) -> World:
    """Four attributes per image, expert i carries attribute i only (see the module doc)."""
    rng = np.random.default_rng(seed)
    codebooks = {e: rng.normal(size=(len(WORDS), dim)) for e in EXPERTS}
    rows = []
    for i in range(images):
        attr = {e: int(rng.integers(len(WORDS))) for e in EXPERTS}
        tokens = {e: codebooks[e][attr[e]] + noise * rng.normal(size=(grid * grid, dim)) for e in EXPERTS}
        rows.append({
            "key": f"r{i:06d}", "caption": WORDS[attr["siglip"]], "tokens": tokens,
            "outputs": {e: _outputs(e, WORDS[attr[e]]) for e in EXPERTS},
        })
    specs = {e: _spec(e, grid, dim, "routing", seed) for e in EXPERTS}
    _write(Path(root), dataset, specs, rows, per_unit)
    return World(Path(root), dataset, images, EXPERTS,
                 "each task's answer is carried by one expert: "
                 + ", ".join(f"{t}->{e}" for t, e in TASK_EXPERT.items()))


def residual_world(root: str | Path, *, images: int = 480, grid: int = 3, dim: int = 16, noise: float = 0.2,
                   seed: int = 0, dataset: str = "residual", per_unit: int = 120, colours: int = 4,
                   where_in_caption: bool = False) -> World:
    """Where-is-the-object (caption expert) x what-is-in-each-cell (classification expert).

    By default every caption is "an object": no target text says where the object is, so the tags line (the
    object's colour, one of ``colours`` words) is the only answer, and the only way to it is to read the
    classification expert's tokens where the caption expert points. ``where_in_caption=True`` captions
    "object in cell r c" instead: the earlier expert's "where" is then also a line of the cumulative target
    (the paper's anti-forgetting use), and a model can lower the loss by passing "where" through without
    ever reading the colour there (measured in docs/train.md)."""
    cap, cls = EXPERT_ORDER[:2]  # the caption and the classification stage's experts
    rng = np.random.default_rng(seed)
    p = grid * grid
    pos = rng.normal(size=(p, dim))  # positional code: real experts' tokens know where they are
    colour = rng.normal(size=(colours, dim))
    where = rng.normal(size=(p, dim))
    names = [f"cell {r} {c}" for r in range(grid) for c in range(grid)]
    rows = []
    for i in range(images):
        cells = rng.integers(colours, size=p)
        obj = int(rng.integers(p))
        ram = pos + colour[cells] + noise * rng.normal(size=(p, dim))
        # the caption expert knows where the object is, everywhere (a global descriptor), nothing of colours
        sig = np.broadcast_to(where[obj], (p, dim)) + noise * rng.normal(size=(p, dim))
        word = WORDS[int(cells[obj])]
        rows.append({
            "key": f"s{i:06d}", "caption": f"object in {names[obj]}" if where_in_caption else "an object",
            "tokens": {cap: sig, cls: ram},
            # the answer key, for diagnostics (where the attention should look); no target reads it
            "outputs": {cls: {"tags": [word], "scores": [0.9]}, cap: {"world_object_cell": obj}},
        })
    specs = {e: _spec(e, grid, dim, "residual", seed) for e in (cap, cls)}
    _write(Path(root), dataset, specs, rows, per_unit)
    return World(Path(root), dataset, images, (cap, cls),
                 "the classification target is the colour of the cell the caption expert points at"
                 + ("; the caption says which cell" if where_in_caption else ""))


QUESTIONS = {"siglip": "What colour is the object?", "ram_plus": "What is it tagged with?"}


def instruction_world(root: str | Path, *, images: int = 320, grid: int = 2, dim: int = 16, noise: float = 0.3,
                      seed: int = 0, dataset: str = "instruct", per_unit: int = 80, text_only: int = 8,
                      unmatched: int = 4) -> tuple[World, Path]:
    """The routing world's store plus a LLaVA-format instruction file about its images (issue 16).

    Each image gets one two-turn conversation: "What colour is the object?" (answer: the word the caption
    expert carries) then "What is it tagged with?" (the classification expert's word). The answers are in
    the features only, so held-out answer accuracy can beat the permuted-image control only by reading the
    image. The file also holds ``text_only`` records without an image and ``unmatched`` records whose image
    is not in the store (counted and skipped). Images are named as a folder of ``.jpg`` files would be
    (``world/images/r000001.jpg``), matched to the store's keys by file stem."""
    import json

    world = routing_world(root, images=images, grid=grid, dim=dim, noise=noise, seed=seed, dataset=dataset,
                          per_unit=per_unit)
    # routing_world draws each image's attributes in order from this seed: replay them for the answers
    rng = np.random.default_rng(seed)
    for e in EXPERTS:
        rng.normal(size=(len(WORDS), dim))
    records = []
    for i in range(images):
        attr = {e: int(rng.integers(len(WORDS))) for e in EXPERTS}
        for e in EXPERTS:
            rng.normal(size=(grid * grid, dim))
        key = f"r{i:06d}"
        records.append({"id": f"q{i:06d}", "image": f"world/images/{key}.jpg", "conversations": [
            {"from": "human", "value": "<image>\n" + QUESTIONS["siglip"]},
            {"from": "gpt", "value": WORDS[attr["siglip"]]},
            {"from": "human", "value": QUESTIONS["ram_plus"]},
            {"from": "gpt", "value": WORDS[attr["ram_plus"]]},
        ]})
    for j in range(text_only):
        records.append({"id": f"t{j:04d}", "conversations": [
            {"from": "human", "value": f"Say the word number {j % len(WORDS)}."},
            {"from": "gpt", "value": WORDS[j % len(WORDS)]},
        ]})
    for j in range(unmatched):
        records.append({"id": f"u{j:04d}", "image": f"world/images/missing{j:04d}.jpg", "conversations": [
            {"from": "human", "value": "<image>\n" + QUESTIONS["siglip"]}, {"from": "gpt", "value": "red"},
        ]})
    path = Path(root) / "instructions.json"
    path.write_text(json.dumps(records, indent=1))
    return world, path
