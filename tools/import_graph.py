"""Draw astrea's module import graph from the source and report cycles and imports that run upward.

    .venv/bin/python tools/import_graph.py            # summary: cycles, upward imports
    .venv/bin/python tools/import_graph.py --edges    # also every edge

Reads the files as text (ast), runs none of them. Every ``import`` counts, the ones inside functions
too (a lazy import is still a dependency; it only hides a cycle until the call), except those under
``if TYPE_CHECKING:``. An edge goes to the module named, or to the submodule when ``from pkg import
sub`` names one. Layers, lowest first (a module may import its own layer and the ones below):

    core (astrea, astrea.errors, astrea.registry, astrea.config) <- schemas <- shards <- data
        <- extract | train (side by side: neither imports the other) <- cli (astrea.cli, demo, api)

tests/test_import_layers.py asserts that this reports no cycle and no upward import.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# pyproject's [tool.setuptools] package-dir: the folders keep the user-facing layout.
PACKAGE_DIRS = {"astrea": "astrea", "astrea.extract": "extract", "astrea.train": "train",
                "astrea.shards": "shards", "astrea.schemas": "schemas"}
CORE = ("astrea", "astrea.errors", "astrea.registry", "astrea.config")
LAYERS = {"core": 0, "schemas": 1, "shards": 2, "data": 3, "extract": 4, "train": 4, "cli": 5}


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for every .py file of the package."""
    out: dict[str, Path] = {}
    for pkg, folder in PACKAGE_DIRS.items():
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


def layer(mod: str) -> str:
    if mod in CORE:
        return "core"
    part = mod.split(".")[1]
    if part in {"schemas", "shards", "data", "extract", "train", "cli"}:
        return part
    return "cli"  # astrea.demo, astrea.api: user-facing entry points above the packages


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                skip.update(id(n) for n in ast.walk(sub))
    return skip


def imports(mod: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``mod`` imports."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_nodes(tree)
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    out.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod if is_pkg else mod.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    base = base.rsplit(".", 1)[0]
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            if not name.startswith("astrea"):
                continue
            for alias in node.names:
                sub = f"{name}.{alias.name}"
                if sub in known:
                    out.add(sub)
                elif name in known:
                    out.add(name)
    out.discard(mod)
    return out


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = modules(root)
    known = set(mods)
    return {m: imports(m, p, known) for m, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(g):
        if start in index:
            continue
        work = [(start, iter(sorted(g[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(g.get(w, ())))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return sorted(out)


def upward(g: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Edges from a lower layer to a higher one, or between the sibling layers extract and train."""
    bad = []
    for src, dsts in g.items():
        ls = layer(src)
        for dst in dsts:
            ld = layer(dst)
            if LAYERS[ld] > LAYERS[ls] or (LAYERS[ld] == LAYERS[ls] and ld != ls):
                bad.append((src, dst))
    return sorted(bad)


def report(g: dict[str, set[str]], edges: bool = False) -> str:
    cyc, up = cycles(g), upward(g)
    lines = [f"{len(g)} modules, {sum(map(len, g.values()))} import edges; "
             f"{len(cyc)} cycle(s), {len(up)} upward import(s)"]
    for c in cyc:
        lines.append("cycle: " + " <-> ".join(c))
    for s, d in up:
        lines.append(f"upward: {s} ({layer(s)}) -> {d} ({layer(d)})")
    if edges:
        for s in sorted(g):
            for d in sorted(g[s]):
                lines.append(f"edge: {s} -> {d}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edges", action="store_true", help="print every edge too")
    args = ap.parse_args(argv)
    g = graph()
    print(report(g, edges=args.edges))
    return 1 if cycles(g) or upward(g) else 0


if __name__ == "__main__":
    sys.exit(main())
