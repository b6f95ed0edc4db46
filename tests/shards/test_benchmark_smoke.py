"""benchmarks/store_io.py still runs (tiny sizes; the numbers themselves are not asserted)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_store_io_benchmark_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["store_io.py", "--images", "2", "--grid", "2", "--dim", "8", "--dir", str(tmp_path),
                                      "--repeat", "1"])
    runpy.run_path(str(ROOT / "benchmarks" / "store_io.py"), run_name="__main__")
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    # header + 2 npy baselines + 6 store layouts; verified-read table (5 units); the public reader (3 rows)
    assert len(lines) == (1 + 8) + (1 + 5) + (1 + 3)
    assert any("Zarr v3, float16 raw (default)" in ln for ln in lines)
    assert any("Zarr v3, float16+zstd" in ln for ln in lines) and any("WebDataset tar" in ln for ln in lines)
    assert any(ln.startswith("| astrea.api.joined, Zarr raw (default) |") for ln in lines)
    assert list(tmp_path.iterdir()) == []  # cleans up after itself


def test_post_forward_benchmark_runs(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["post_forward.py", "--images", "6", "--grid", "2", "--dim", "8", "--window", "3",
                                      "--repeat", "1"])
    runpy.run_path(str(ROOT / "benchmarks" / "post_forward.py"), run_name="__main__")
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ") and "---" not in ln]
    assert len(rows) == 1 + 5 and rows[-1].startswith("| prepare_window + write (astrea extract) |")


def _sample_like_store(root: Path) -> Path:
    from astrea.shards import Store
    from tests.shards.helpers import make_spec, write_unit

    for name in ("siglip", "ram_plus", "grounding_dino", "sam2"):
        e = Store(root).expert_dir("sample", make_spec(name, dtype="float32", grid=2, token_dim=8, pooled_dim=8), create=True)
        write_unit(e, "00000", 3)
    return root


def test_int8_storage_benchmark_runs(tmp_path, monkeypatch, capsys):
    store = _sample_like_store(tmp_path / "f32")
    monkeypatch.setattr(sys, "argv", ["int8_storage.py", "--store", str(store), "--skip-learning", "--real-images", "1"])
    runpy.run_path(str(ROOT / "benchmarks" / "int8_storage.py"), run_name="__main__")
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ") and "---" not in ln]
    assert len(rows) == (1 + 6) + (1 + 8) + (1 + 4)  # accuracy, sample bytes, real-width bytes


def test_estimate_benchmark_runs(tmp_path, monkeypatch, capsys):
    store = _sample_like_store(tmp_path / "s")
    monkeypatch.setattr(sys, "argv", ["estimate.py", str(store)])
    runpy.run_path(str(ROOT / "benchmarks" / "estimate.py"), run_name="__main__")
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ") and "---" not in ln]
    assert len(rows) == 1 + 4


def test_actor_throughput_benchmark_runs(tmp_path, monkeypatch, capsys):
    """The real actor with the stand-in forward, tiny sizes, every layout."""
    monkeypatch.setattr(sys, "argv", ["actor_throughput.py", "--images", "6", "--units", "2", "--grid", "2", "--dim", "8",
                                      "--batch", "2", "--dir", str(tmp_path)])
    runpy.run_path(str(ROOT / "benchmarks" / "actor_throughput.py"), run_name="__main__")
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ") and "---" not in ln]
    assert len(rows) == 1 + 3 and rows[1].startswith("| Zarr v3, raw (default) |")
    assert list(tmp_path.iterdir()) == []
