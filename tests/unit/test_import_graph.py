"""The shape of the package, from its source (standard library ``ast``, no
import of pyfuse): no import circle among pyfuse modules, the demo imported
only by itself and its command (pyfuse demo), and no module over 500 lines
unless listed below with a reason.

Edges: every ``import`` and ``from ... import`` of a pyfuse module, at module
level or inside functions, relative ones resolved. ``from P import n`` is an
edge to ``P.n`` when that is a module, else to ``P``; a module's implicit
import of its parent packages is not an edge (every submodule would
otherwise form a circle with a package ``__init__`` that imports it)."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pyfuse"
MAX_LINES = 500
# Modules allowed over MAX_LINES, each with its reason. An entry that is no
# longer over the limit (or gone) fails the test: remove it.
ALLOWED_LONG = {
}
DEMO_IMPORTERS = ("pyfuse.demo", "pyfuse.commands.demo")  # the only modules that may import pyfuse.demo
EXTENSIONS = {"pyfuse._ext"}  # compiled from csrc/: modules without Python source (and without imports)


def module_names(root: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of the package at ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(root: Path, extensions: set[str] = frozenset()) -> dict[str, set[str]]:
    """``{module: the package's modules it imports}`` (``extensions``: the
    compiled modules, which import nothing of the package)."""
    top = root.name
    modules = {**module_names(root), **{e: None for e in extensions}}
    graph: dict[str, set[str]] = {e: set() for e in extensions}
    for name, path in modules.items():
        if path is None:
            continue
        is_package = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                for a in node.names:
                    targets.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
        graph[name] = {t for t in targets if (t == top or t.startswith(top + ".")) and t != name}
        unknown = graph[name] - set(modules)
        assert not unknown, f"{path}: imports {sorted(unknown)}, which are not modules of {top}"
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (its modules in order, the first repeated at the end), or None."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        return list(reversed(err.args[1]))  # graphlib lists it against the edges' direction
    return None


def test_no_import_circle():
    cycle = find_cycle(import_graph(PACKAGE, EXTENSIONS))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_library_does_not_import_the_demo():
    bad = {m: sorted(t for t in targets if t == "pyfuse.demo" or t.startswith("pyfuse.demo."))
           for m, targets in import_graph(PACKAGE, EXTENSIONS).items()
           if not any(m == p or m.startswith(p + ".") for p in DEMO_IMPORTERS)}
    bad = {m: t for m, t in bad.items() if t}
    assert not bad, f"only {' and '.join(DEMO_IMPORTERS)} may import the demo: {bad}"


def test_modules_are_short():
    repo = PACKAGE.parent
    lengths = {p.relative_to(repo).as_posix(): len(p.read_text(encoding="utf-8").splitlines())
               for p in module_names(PACKAGE).values()}
    too_long = {p: n for p, n in lengths.items() if n > MAX_LINES and p not in ALLOWED_LONG}
    assert not too_long, f"modules over {MAX_LINES} lines (split them, or list them with a reason): {too_long}"
    stale = [p for p in ALLOWED_LONG if lengths.get(p, 0) <= MAX_LINES]
    assert not stale, f"no longer over {MAX_LINES} lines (or gone): remove {stale} from ALLOWED_LONG"


def _write_package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root / "pyfuse"


@pytest.mark.parametrize("b_imports", ["from .. import a", "from ..a import thing", "import pyfuse.a",
                                       "def f():\n    from pyfuse.a import thing\n"])
def test_a_circle_is_found_and_named(tmp_path, b_imports):
    """The checker itself: a circle through a relative, absolute or function-level import is reported."""
    root = _write_package(tmp_path, {
        "pyfuse/__init__.py": "", "pyfuse/a.py": "from .sub import b\nthing = 1\n",
        "pyfuse/sub/__init__.py": "", "pyfuse/sub/b.py": b_imports + "\n",
        "pyfuse/sub/c.py": "from . import b\nfrom .b import *\n",
    })
    graph = import_graph(root)
    assert graph["pyfuse.a"] == {"pyfuse.sub.b"} and graph["pyfuse.sub.c"] == {"pyfuse.sub.b"}
    cycle = find_cycle(graph)
    assert cycle is not None and set(cycle) == {"pyfuse.a", "pyfuse.sub.b"} and cycle[0] == cycle[-1]
    (root / "sub" / "b.py").write_text("import os\n")  # the circle broken
    assert find_cycle(import_graph(root)) is None
