"""Peak memory of decoding one image and preprocessing it for each expert, for an image just under the
pixel limit (``MAX_PIXELS``) and a normal-size one.

    .venv/bin/python benchmarks/decode_memory.py [--side 7999] [--kinds jpeg,png-rgba,png-16bit]

Each measurement runs in a fresh process (a decode task's view: imports done, the image's bytes in
memory) and prints the peak resident memory the step added (the process's peak, ``VmHWM``, reset just
before the step, minus the resident size then), in MiB. ``decode`` is ``astrea.extract.experts.common.decode_image`` alone;
``+EXPERT`` adds that expert's real-size preprocessing (weight-free: the same functions the decode
tasks run; grounding_dino's is the transformers image processor with its default config), as
``astrea.extract.pipeline.decode_one`` runs it.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHILD = r"""
import json, sys
import numpy as np

def status_mib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024

path, stage = sys.argv[1], sys.argv[2]
from astrea.extract.experts.common import decode_image
from astrea.extract.pipeline import decode_one
pre = None
if stage == "siglip":
    from astrea.extract.experts.siglip import apply_preprocessing, _pp, _INCEPTION
    pp = _pp(384, "squash", _INCEPTION)
    pre = lambda im: apply_preprocessing(im, pp)
elif stage == "ram_plus":
    from astrea.extract.experts.ram_plus import apply_preprocessing
    pre = lambda im: apply_preprocessing(im, 384)
elif stage == "sam2":
    from astrea.extract.experts.sam2 import apply_preprocessing
    pre = lambda im: apply_preprocessing(im, 1024)
elif stage == "grounding_dino":
    from transformers import GroundingDinoImageProcessor
    from astrea.extract.experts.grounding_dino import GroundingDinoPreprocessor
    pre = GroundingDinoPreprocessor(GroundingDinoImageProcessor(), 4, 900)
data = open(path, "rb").read()
small = decode_image(open(sys.argv[3], "rb").read())  # warm the code paths
if pre is not None:
    pre(small)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the resident size now
before = status_mib("VmRSS")
if pre is None:
    img = decode_image(data)
    out = (img.size, img.mode)
else:
    arr, err = decode_one(data, pre)
    assert err is None, err
    out = arr.shape
peak = status_mib("VmHWM")
print(json.dumps({"added_mib": round(peak - before, 1), "out": str(out)}))
"""


def make_image(kind: str, side: int) -> bytes:
    from PIL import Image

    # Smooth content plus mild noise: compresses like a photo, decodes like one.
    rows = (np.cos(np.arange(side) / 131.0) * 60 + 64).astype(np.uint8)
    cols = (np.sin(np.arange(side) / 97.0) * 60 + 64).astype(np.uint8)
    g = np.add.outer(rows, cols)
    g += np.random.default_rng(0).integers(0, 8, (side, side), dtype=np.uint8)
    buf = io.BytesIO()
    if kind == "jpeg":
        Image.fromarray(np.stack([g, g[::-1], g[:, ::-1]], -1)).save(buf, "JPEG", quality=90)
    elif kind == "png-rgba":
        Image.fromarray(np.stack([g, g[::-1], g[:, ::-1], 255 - g], -1), "RGBA").save(buf, "PNG", compress_level=1)
    elif kind == "png-16bit":
        Image.fromarray(g.astype(np.uint16) * 257).save(buf, "PNG", compress_level=1)
    else:
        raise SystemExit(f"unknown kind {kind!r}")
    return buf.getvalue()


def measure(path: Path, stage: str, small: Path) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, str(path), stage, str(small)], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{stage} on {path.name} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=7999, help="square image side (7999^2 = 63.98M pixels, under 64M)")
    ap.add_argument("--normal-side", type=int, default=1024)
    ap.add_argument("--kinds", default="jpeg,png-rgba,png-16bit")
    ap.add_argument("--stages", default="decode,siglip,ram_plus,grounding_dino,sam2")
    args = ap.parse_args()
    stages = args.stages.split(",")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        small = tmp / "small.jpg"
        small.write_bytes(make_image("jpeg", 64))
        print(f"peak memory added by decode (+ preprocess), MiB; fresh process per cell; "
              f"{args.side}x{args.side} = {args.side * args.side / 1e6:.2f}M pixels vs {args.normal_side}^2")
        print(f"{'image':<22}" + "".join(f"{s:>16}" for s in stages))
        for kind in args.kinds.split(","):
            for side in (args.normal_side, args.side):
                p = tmp / f"{kind}-{side}.img"
                p.write_bytes(make_image(kind, side))
                row = [measure(p, s, small)["added_mib"] for s in stages]
                print(f"{kind + ' ' + str(side):<22}" + "".join(f"{v:>16.0f}" for v in row), flush=True)
                p.unlink()


if __name__ == "__main__":
    main()
