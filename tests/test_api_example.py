"""The documented Python API example runs as written (examples/python_api.py)."""

from __future__ import annotations

import runpy
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "python_api.py"


def test_python_api_example_runs(tmp_path, capsys):
    mod = runpy.run_path(str(EXAMPLE))
    out = mod["main"](tmp_path)
    assert out["report"]["images_ok"] > 0 and out["report"]["status"] == "done"
    rec = out["record"]
    assert set(rec["experts"]) == {"siglip", "ram_plus"}
    assert rec["experts"]["siglip"]["tokens"].shape[0] == 16  # grid 4 -> 16 tokens
    assert out["summary"]["global_steps"] == 2
    assert sorted(out["run"].model.projectors) == ["siglip"]
    assert "extracted:" in capsys.readouterr().out
