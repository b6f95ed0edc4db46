"""The embedded sample dataset: a small dataset in img2dataset's exact WebDataset format, offline.

Contents (deterministic given ``seed``; see docs/data.md):

- real photos that ship inside scikit-image (``skimage.data``: astronaut, coffee, chelsea, rocket,
  camera, ...; only those that load without a download), resized to fit 256 px, with hand-written
  captions and tags;
- generated scenes: 1-3 coloured shapes (circle, square, triangle) on a plain background, each in its
  own cell so nothing overlaps, with a caption that states exactly what is drawn ("a red circle and a
  blue square on a gray background"), class names, boxes (normalised ``[x1, y1, x2, y2]``) and masks
  (COCO compressed RLE, the same form SAM2's outputs use);
- with ``bad=True`` (default) two deliberately broken members at the end of the last shard: a
  truncated JPEG (first half of a valid one) and a zero-byte ``.jpg``. Extraction must count both as
  failures and go on; they are *extra*: ``images`` counts the good images only.

Layout per shard ``NNNNN`` (what ``img2dataset --output_format webdataset`` writes): ``NNNNN.tar``
with ``KEY.jpg``, ``KEY.json``, ``KEY.txt`` per image (WebDataset's TarWriter order), ``NNNNN.parquet``
with img2dataset's columns, ``NNNNN_stats.json`` with its stats fields. Keys follow img2dataset's
``compute_key``: ``shard * 10**4 + row``, zero-padded to 9 digits (``000010003`` = shard 1, row 3).
``sample.json`` (ours, written last) records the parameters so :func:`ensure_sample` can reuse the
directory.

``instructions.json`` (ours, issue 16) is a small instruction set in LLaVA's layout about the generated
scenes: one three-turn conversation per scene (how many shapes, the colour of one shape, where one shape
is: "top left" ... "bottom right"), answers taken from what was drawn, plus one text-only record. The
``image`` fields are ``SHARD/KEY.jpg`` (img2dataset's ``files`` layout), joined to the store by key.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from astrea.data.base import DataError

MANIFEST = "sample.json"
MANIFEST_VERSION = 2  # 2: instructions.json added
INSTRUCTIONS = "instructions.json"
SIZE = 256  # img2dataset's default image_size
# img2dataset defaults: number_sample_per_shard=10000 -> 4 digits per row, oom_shard_count=5.
OOM_SAMPLE_PER_SHARD = 4
OOM_SHARD_COUNT = 5
JPEG_QUALITY = 95  # img2dataset's default encode_quality for jpg

# skimage.data photos that ship with the package (no pooch download), with hand-written captions.
# One that needs a download in some skimage version is skipped, never fetched.
PHOTOS: list[tuple[str, str, list[str]]] = [
    ("astronaut", "a portrait of an astronaut in a white spacesuit in front of an American flag",
     ["person", "astronaut", "flag", "spacesuit"]),
    ("coffee", "a cup of coffee on a saucer with a spoon, seen from above", ["cup", "coffee", "saucer", "spoon"]),
    ("chelsea", "a ginger tabby cat looking to the side", ["cat", "animal"]),
    ("rocket", "a rocket on the launch pad under a blue sky", ["rocket", "launch pad", "sky"]),
    ("camera", "a black and white photo of a man with a camera on a tripod", ["person", "camera", "tripod"]),
    ("coins", "a grayscale photo of old coins on a dark background", ["coin"]),
    ("moon", "a grayscale close-up of the surface of the moon with craters", ["moon", "crater"]),
    ("hubble_deep_field", "a deep field telescope image of many distant galaxies", ["galaxy", "space"]),
    ("immunohistochemistry", "a microscope image of stained tissue cells", ["cell", "microscopy"]),
    ("clock", "a grayscale photo of a wall clock", ["clock"]),
    ("colorwheel", "a color wheel showing the hues of the spectrum", ["color wheel"]),
    ("page", "a scanned page of printed text", ["text", "page"]),
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 180), "orange": (245, 140, 30), "white": (250, 250, 250), "black": (20, 20, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128), "light blue": (170, 200, 235), "beige": (225, 210, 180), "dark green": (30, 70, 40),
}
# Colours that would barely show on a background are not drawn on it.
LOW_CONTRAST: dict[str, set[str]] = {"gray": set(), "light blue": {"white"}, "beige": {"white", "yellow"},
                                     "dark green": {"green", "black"}}
SHAPES = ("circle", "square", "triangle")


@dataclass(frozen=True)
class SampleConfig:
    """Parameters of the sample dataset; ``sample.json`` stores them for reuse checks."""

    images: int = 24  # good images in all (photos + scenes); the bad members are extra
    shards: int = 2
    seed: int = 0
    bad: bool = True

    def validate(self) -> None:
        if not isinstance(self.images, int) or self.images < 1:
            raise DataError(f"images={self.images!r} must be an integer >= 1")
        if not isinstance(self.shards, int) or self.shards < 1:
            raise DataError(f"shards={self.shards!r} must be an integer >= 1")
        if self.shards > self.images:
            raise DataError(f"shards={self.shards} > images={self.images}: every shard needs at least one image")
        if self.images > self.shards * (10**OOM_SAMPLE_PER_SHARD - 2):
            raise DataError(f"images={self.images}: at most {10**OOM_SAMPLE_PER_SHARD - 2} per shard "
                            "(img2dataset's key scheme); add --shards")

    def build(self, out: str | Path) -> Path:
        return make_sample(out, **asdict(self))


# -- images ---------------------------------------------------------------------------------------
def _photo(name: str) -> np.ndarray | None:
    """An RGB uint8 photo from skimage.data, or None when it is not available offline."""
    import skimage.data

    try:
        arr = getattr(skimage.data, name)()
    except Exception:  # needs pooch / a download, or not in this skimage version
        return None
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3].astype(np.uint8))


def _fit(img: Any, size: int = SIZE) -> Any:
    from PIL import Image

    w, h = img.size
    s = size / max(w, h)
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _scene(rng: np.random.Generator) -> tuple[Any, str, dict[str, Any]]:
    """A generated image with its exact caption and labels."""
    from PIL import Image, ImageDraw

    from astrea.schemas.mask_rle import encode

    bg_name = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    n = int(rng.integers(1, 4))
    # Cells of a 2x2 grid, one shape per cell: no overlap, so each mask is the whole shape.
    cells = rng.permutation(4)[:n]
    fg = [c for c in COLOURS if c not in LOW_CONTRAST[bg_name]]
    img = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[bg_name])
    objects = []
    half = SIZE // 2
    for cell in cells:
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = fg[rng.integers(len(fg))]
        side = int(rng.integers(half // 2, half - 16))
        x0 = (cell % 2) * half + int(rng.integers(4, half - side - 4))
        y0 = (cell // 2) * half + int(rng.integers(4, half - side - 4))
        layer = Image.new("L", (SIZE, SIZE), 0)
        d = ImageDraw.Draw(layer)
        box = (x0, y0, x0 + side - 1, y0 + side - 1)
        if shape == "circle":
            d.ellipse(box, fill=255)
        elif shape == "square":
            d.rectangle(box, fill=255)
        else:
            d.polygon([(x0 + side // 2, y0), (x0, y0 + side - 1), (x0 + side - 1, y0 + side - 1)], fill=255)
        img.paste(COLOURS[colour], mask=layer)
        mask = np.asarray(layer) > 0
        ys, xs = np.nonzero(mask)
        bbox = [float(xs.min()) / SIZE, float(ys.min()) / SIZE, float(xs.max() + 1) / SIZE, float(ys.max() + 1) / SIZE]
        objects.append({"label": f"{colour} {shape}", "shape": shape, "colour": colour, "box": bbox,
                        "mask": encode(mask), "area": int(mask.sum())})
    # Reading order (top row first, then left to right) so the caption follows the picture.
    objects.sort(key=lambda o: (o["box"][1] >= 0.5, o["box"][0]))
    names = [_article(o["label"]) for o in objects]
    things = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    caption = f"{things} on a {bg_name} background"
    labels = {
        "source": "generated",
        "classes": [o["label"] for o in objects],
        "tags": sorted({o["shape"] for o in objects} | {o["colour"] for o in objects}),
        "boxes": [o["box"] for o in objects],
        "masks": [{"rle": o["mask"], "label": o["label"], "area": o["area"], "box": o["box"]} for o in objects],
        "background": bg_name,
    }
    return img, caption, labels


def _jpeg(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _items(cfg: SampleConfig) -> list[dict[str, Any]]:
    """All good images in dataset order: photos (up to half) and generated scenes, interleaved so that
    every shard holds both kinds."""
    from PIL import Image

    rng = np.random.default_rng(cfg.seed)
    photos: list[dict[str, Any]] = []
    for i in rng.permutation(len(PHOTOS)):
        if len(photos) >= cfg.images // 2:
            break
        name, caption, tags = PHOTOS[i]
        arr = _photo(name)
        if arr is None:
            continue
        original = Image.fromarray(arr)
        photos.append({"img": _fit(original), "original_size": original.size, "caption": caption,
                       "url": f"skimage://data/{name}",
                       "labels": {"source": f"skimage.data.{name}", "classes": tags, "tags": tags}})
    scenes: list[dict[str, Any]] = []
    for k in range(cfg.images - len(photos)):
        img, caption, labels = _scene(rng)
        scenes.append({"img": img, "original_size": img.size, "caption": caption,
                       "url": f"generated://scene/{cfg.seed}/{k}", "labels": labels})
    mixed: list[dict[str, Any]] = []
    for i in range(max(len(photos), len(scenes))):
        mixed.extend(x[i] for x in (photos, scenes) if i < len(x))
    return mixed


# -- img2dataset's files --------------------------------------------------------------------------
def img2dataset_key(shard: int, row: int) -> str:
    """img2dataset's ``compute_key`` with its defaults (10000 samples per shard, 5-digit shards)."""
    return f"{shard * 10**OOM_SAMPLE_PER_SHARD + row:0{OOM_SAMPLE_PER_SHARD + OOM_SHARD_COUNT}d}"


# img2dataset's parquet columns for a txt/parquet input with a caption column and compute_hash=sha256.
PARQUET_COLUMNS = ("url", "caption", "key", "status", "error_message", "width", "height",
                   "original_width", "original_height", "sha256")


def _meta(key: str, url: str, caption: str, data: bytes, size: tuple[int, int], original: tuple[int, int],
          labels: dict[str, Any] | None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "url": url, "caption": caption, "key": key, "status": "success", "error_message": None,
        "width": size[0], "height": size[1], "original_width": original[0], "original_height": original[1],
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    if labels is not None:
        meta["labels"] = labels  # ours, in the json only (the way extra columns ride along)
    return meta


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed mtime/owner so that the same seed gives byte-identical tars.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "", ""
    tf.addfile(info, io.BytesIO(data))


def _write_shard(out: Path, shard: int, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = f"{shard:0{OOM_SHARD_COUNT}d}"
    with tarfile.open(out / f"{name}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
        for r in rows:
            # WebDataset's TarWriter (what img2dataset uses) writes a sample's members sorted by extension.
            for ext, data in sorted(r["members"].items()):
                _add(tf, f"{r['key']}.{ext}", data)
    strings = ("url", "caption", "key", "status", "error_message", "sha256")
    table = pa.table({c: pa.array([r["meta"][c] for r in rows], pa.string() if c in strings else pa.int32())
                      for c in PARQUET_COLUMNS})
    pq.write_table(table, out / f"{name}.parquet")
    ok = sum(1 for r in rows if r["meta"]["status"] == "success")
    stats = {
        "count": len(rows), "successes": ok, "failed_to_download": 0, "failed_to_resize": 0,
        # Fixed times: the sample is reproducible byte for byte (img2dataset writes wall-clock times).
        "duration": 0.0, "start_time": 0.0, "end_time": 0.0,
        "status_dict": {"success": ok},
    }
    (out / f"{name}_stats.json").write_text(json.dumps(stats, indent=4))


def make_sample(out: str | Path, images: int = 24, shards: int = 2, seed: int = 0, bad: bool = True) -> Path:
    """Write the sample dataset into ``out`` (created; existing files of the same names replaced).

    Returns ``out``. Does not touch the catalog (see :func:`ensure_sample` / ``astrea data sample``).
    """
    cfg = SampleConfig(images=images, shards=shards, seed=seed, bad=bad)
    cfg.validate()
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    items = _items(cfg)
    # Even split, earlier shards one larger when it does not divide (img2dataset fills shards in order).
    per = [cfg.images // cfg.shards + (1 if s < cfg.images % cfg.shards else 0) for s in range(cfg.shards)]
    start = 0
    conversations: list[dict[str, Any]] = []
    for s, n in enumerate(per):
        rows = []
        for row, it in enumerate(items[start:start + n]):
            key = img2dataset_key(s, row)
            if it["labels"].get("source") == "generated":
                conversations.append(scene_conversation(f"{s:0{OOM_SHARD_COUNT}d}/{key}.jpg", key, it["labels"]))
            data = _jpeg(it["img"])
            meta = _meta(key, it["url"], it["caption"], data, it["img"].size, it["original_size"], it["labels"])
            rows.append({"key": key, "meta": meta, "members": {
                "jpg": data, "txt": it["caption"].encode(), "json": json.dumps(meta, indent=4).encode()}})
        if bad and s == cfg.shards - 1:
            rows.extend(_bad_rows(s, n, items[0]["img"]))
        _write_shard(out, s, rows)
        start += n
    conversations.append({"id": "text-only-0", "conversations": [
        {"from": "human", "value": "Which shapes can a generated scene hold?"},
        {"from": "gpt", "value": "circles, squares and triangles"}]})
    (out / INSTRUCTIONS).write_text(json.dumps(conversations, indent=1) + "\n")
    manifest = {"version": MANIFEST_VERSION, "format": "webdataset", "generator": "astrea.data.sample",
                **asdict(cfg), "files": sorted(p.name for p in out.iterdir() if p.name != MANIFEST)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


NUMBERS = ("zero", "one", "two", "three", "four")


def position(box: list[float]) -> str:
    """Which quarter of the image a box's centre is in: "top left", ..., "bottom right"."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return f"{'top' if cy < 0.5 else 'bottom'} {'left' if cx < 0.5 else 'right'}"


def scene_conversation(image: str, key: str, labels: dict[str, Any]) -> dict[str, Any]:
    """A three-turn LLaVA-format conversation about a generated scene, answered from what was drawn.

    The shape asked about is chosen from the key's hash (reproducible; every object position gets asked)."""
    objs = [{"label": m["label"], "box": m["box"]} for m in labels["masks"]]
    pick = objs[int(hashlib.sha1(key.encode()).hexdigest(), 16) % len(objs)]
    colour, shape = pick["label"].split(" ", 1)
    where = position(pick["box"])
    same_shape = sum(o["label"].split(" ", 1)[1] == shape for o in objs)
    which = f"the {shape}" if same_shape == 1 else f"the {shape} at the {where}"
    turns = [
        ("<image>\nHow many shapes are there?", NUMBERS[len(objs)]),
        (f"What colour is {which}?", colour),
        (f"Where is the {colour} {shape}?", where),
    ]
    conv = []
    for q, a in turns:
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {"id": f"scene-{key}", "image": image, "conversations": conv}


BAD_KINDS = ("truncated JPEG", "zero-byte file")


def _bad_rows(shard: int, first_row: int, img: Any) -> list[dict[str, Any]]:
    """Two broken members, as a flaky download or disk would leave them; img2dataset would record
    them as successes (the bytes arrived), so their json says ``success`` too."""
    good = _jpeg(img)
    rows = []
    for i, (data, what) in enumerate(((good[: len(good) // 2], BAD_KINDS[0]), (b"", BAD_KINDS[1]))):
        key = img2dataset_key(shard, first_row + i)
        caption = f"a deliberately broken image ({what})"
        meta = _meta(key, f"broken://{what.replace(' ', '-')}", caption, data, img.size, img.size,
                     {"source": "broken", "broken": what})
        rows.append({"key": key, "meta": meta, "members": {
            "jpg": data, "txt": caption.encode(), "json": json.dumps(meta, indent=4).encode()}})
    return rows


def default_path() -> Path:
    from astrea.config import home

    return home() / "sample"


def read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        m = json.loads((path / MANIFEST).read_text())
        return m if isinstance(m, dict) else None
    except (OSError, ValueError):
        return None


def is_complete(path: Path, cfg: SampleConfig) -> bool:
    """True when ``path`` holds a sample written with ``cfg`` and all of its files."""
    m = read_manifest(path)
    if m is None or m.get("version") != MANIFEST_VERSION or m.get("generator") != "astrea.data.sample":
        return False
    if any(m.get(k) != v for k, v in asdict(cfg).items()):
        return False
    files = m.get("files") or []
    return bool(files) and all((path / f).is_file() for f in files)


def ensure_sample(path: str | Path | None = None, images: int = 24, shards: int = 2, seed: int = 0,
                  bad: bool = True, register: bool = True, force: bool = False) -> Path:
    """The sample dataset at ``path`` (default ``$ASTREA_HOME/sample``): reused when ``sample.json``
    says it was written with the same parameters and all its files are there, else (re)written.

    Written into a temporary sibling directory and renamed into place, so an interrupted run never
    leaves a half dataset that looks complete. A non-empty directory that is not a sample dataset is
    never overwritten. With ``register`` the path is recorded as ``sample`` in the catalog.
    """
    cfg = SampleConfig(images=images, shards=shards, seed=seed, bad=bad)
    cfg.validate()
    p = Path(path).expanduser().absolute() if path is not None else default_path()
    if force or not is_complete(p, cfg):
        if p.exists() and (not p.is_dir() or (any(p.iterdir()) and read_manifest(p) is None)):
            raise DataError(f"{p}: exists and is not an astrea sample dataset (no {MANIFEST}); "
                            "choose another --out or remove it")
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            make_sample(tmp, **asdict(cfg))
            if p.exists():
                shutil.rmtree(p)  # ours (it has a manifest): an older or different sample
            try:
                os.replace(tmp, p)
            except OSError:
                # Another process (a second demo, a parallel test) finished the same sample first.
                if not is_complete(p, cfg):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if register:
        # The catalog entry catalog_add would write (name checked, format known, path resolved), written
        # here directly: astrea.data opens this module for `sample`, so importing it back would loop.
        from astrea import config

        config.set_dataset("sample", {"format": "webdataset", "path": str(p.resolve())})
    return p
