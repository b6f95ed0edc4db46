"""Reusable dataset builders for tests (any area may import them).

- :func:`build_img2dataset`: a dataset written by the real img2dataset from ``file://`` URLs of images
  written here (no network), in a subprocess with a timeout (img2dataset's multiprocessing can hang
  at exit).
- :func:`write_tar`: a tar with exactly the members given, in that order (bad names included), for
  reader edge cases.
- :func:`jpeg`: a small valid JPEG.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path


def jpeg(w: int = 32, h: int = 24, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="JPEG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]], *, extra: list[tarfile.TarInfo] | None = None) -> Path:
    """``members``: ``[(name, data), ...]`` written verbatim, in order (tarfile does not sanitise names)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tf.addfile(info)
    return path


class Img2datasetUnavailable(RuntimeError):
    """img2dataset could not run here (not installed, or it failed offline); the message says why."""


def build_img2dataset(tmp_path: Path, n: int = 6, *, per_shard: int | None = None, timeout: float = 240.0,
                      broken_url: bool = True) -> Path:
    """Run the real ``img2dataset.download`` over ``n`` local JPEGs (``file://`` URLs, txt+caption via
    a parquet url list) into ``tmp_path/img2dataset`` with ``output_format="webdataset"``; returns that
    directory. With ``broken_url`` one extra URL points at a missing file, so img2dataset records a
    ``failed_to_download`` row in its parquet / stats (and, as it does, writes nothing to the tar).

    Raises :class:`Img2datasetUnavailable` when img2dataset is missing or fails.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "img2dataset_src"
    src.mkdir(parents=True, exist_ok=True)
    colours = [(200, 30, 30), (30, 160, 60), (40, 60, 220), (230, 200, 40), (120, 40, 160), (250, 130, 20)]
    urls, captions = [], []
    for i in range(n):
        p = src / f"img{i:03d}.jpg"
        p.write_bytes(jpeg(64 + 8 * i, 48 + 4 * i, colours[i % len(colours)]))
        urls.append(p.resolve().as_uri())
        captions.append(f"local test image {i}")
    if broken_url:
        urls.append((src / "missing.jpg").resolve().as_uri())
        captions.append("an image that does not exist")
    url_list = src / "urls.parquet"
    pq.write_table(pa.table({"url": urls, "caption": captions}), url_list)
    out = tmp_path / "img2dataset"
    # A script file, not `python -c`: img2dataset's pools use the "spawn" start method, whose children
    # re-import the main module, and the __main__ guard keeps them from re-running the download.
    script = textwrap.dedent(f"""
        import os
        os.environ.setdefault("WANDB_MODE", "disabled")
        from img2dataset import download
        if __name__ == "__main__":
          download(url_list={str(url_list)!r}, input_format="parquet", url_col="url", caption_col="caption",
                   output_format="webdataset", output_folder={str(out)!r}, processes_count=1, thread_count=2,
                   image_size=64, resize_mode="border", number_sample_per_shard={per_shard or 10000},
                   enable_wandb=False, distributor="multiprocessing", timeout=5, retries=0)
    """)
    script_file = src / "run_img2dataset.py"
    script_file.write_text(script)
    env = {**os.environ, "WANDB_MODE": "disabled", "NO_PROXY": "*", "NO_ALBUMENTATIONS_UPDATE": "1"}
    try:
        proc = subprocess.run([sys.executable, str(script_file)], capture_output=True, text=True, timeout=timeout,
                              env=env, cwd=tmp_path)
    except subprocess.TimeoutExpired as e:
        # Known img2dataset behaviour: the logger process can keep it alive after the shards are done.
        if _complete(out):
            return out
        raise Img2datasetUnavailable(f"img2dataset did not finish within {timeout}s") from e
    if proc.returncode != 0 or not _complete(out):
        tail = (proc.stderr or proc.stdout)[-2000:]
        if "No module named 'img2dataset'" in tail:
            raise Img2datasetUnavailable("img2dataset is not installed (pip install img2dataset)")
        raise Img2datasetUnavailable(f"img2dataset failed (exit {proc.returncode}):\n{tail}")
    return out


def _complete(out: Path) -> bool:
    if not out.is_dir():
        return False
    tars = sorted(out.glob("*.tar"))
    return bool(tars) and all(t.with_name(t.name[:-4] + "_stats.json").exists() for t in tars)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
