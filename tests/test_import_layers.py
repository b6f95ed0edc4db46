"""The package's import graph (drawn by tools/import_graph.py from the source) has no cycle and no
import that runs upward: core <- schemas <- shards <- data <- extract | train <- cli."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_TOOL = Path(__file__).resolve().parents[1] / "tools" / "import_graph.py"


def _tool():
    spec = importlib.util.spec_from_file_location("import_graph", _TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_cycles_and_no_upward_imports():
    ig = _tool()
    g = ig.graph()
    assert len(g) > 50  # the tool found the package (a wrong root would pass vacuously)
    assert ig.cycles(g) == [], ig.report(g)
    assert ig.upward(g) == [], ig.report(g)


def test_the_tool_sees_cycles_and_upward_imports(tmp_path):
    """Against a made-up tree: the checks above can fail."""
    ig = _tool()
    for folder in ig.PACKAGE_DIRS.values():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "shards" / "a.py").write_text("def f():\n    from astrea.shards.b import g\n")
    (tmp_path / "shards" / "b.py").write_text("from astrea.shards import a\nfrom astrea.train.x import y\n")
    (tmp_path / "train" / "x.py").write_text("from astrea.cli import app\n")
    (tmp_path / "astrea" / "cli").mkdir()
    (tmp_path / "astrea" / "cli" / "__init__.py").write_text("from typing import TYPE_CHECKING\n"
                                                              "if TYPE_CHECKING:\n    from astrea.train import x\n")
    g = ig.graph(tmp_path)
    assert ig.cycles(g) == [["astrea.shards.a", "astrea.shards.b"]]
    assert ig.upward(g) == [("astrea.shards.b", "astrea.train.x"), ("astrea.train.x", "astrea.cli")]
