"""The import structure of compatkit: no cycles, no private names across modules, and the
index's layers (docs/upgrade-system.md, "Layers") imported only downwards.

Every import counts, including those inside functions; only ``if TYPE_CHECKING:`` blocks are
left out of the cycle check (they never run), but they too must point down the index layers.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "compatkit"

#: The index's modules from the bottom layer up; a module may import those of lower layers.
#: ``service`` stands for the whole ``compatkit.index.service`` package.
INDEX_LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "vectors", "versions"),
    ("options",),
    ("embedders",),
    ("external_embedders",),
    ("db",),
    ("qdrant_backend",),
    ("backends",),
    ("slots",),
    ("jobs",),
    ("search",),
    ("batching",),
    ("plan",),
    ("upgrade",),
    ("collection",),
    ("store",),
    ("demo", "distributed"),
    ("service",),
    ("cli",),
    ("__init__",),
)


@dataclass(frozen=True)
class Edge:
    """``source`` imports ``target`` (both module names); ``names`` are the imported names."""

    source: str
    target: str
    names: tuple[str, ...]
    typing_only: bool
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, typing_only: bool = False):
    """(node, typing_only) for every import statement, anywhere in the tree."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from _imports_of(child, True)
            for child in node.orelse:
                yield from _imports_of(child, typing_only)
        else:
            yield from _imports_of(node, typing_only)


def _imports_of(node: ast.AST, typing_only: bool):
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node, typing_only
    else:
        yield from _imports(node, typing_only)


def edges_of(name: str, path: Path, modules: dict[str, Path]) -> list[Edge]:
    """The compatkit-internal imports of one module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    out = []
    for node, typing_only in _imports(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "compatkit":
                    out.append(Edge(name, alias.name, (), typing_only, node.lineno))
            continue
        base = node.module or ""
        if node.level:  # relative: resolve against this module's package
            package = name if is_package else name.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        if base.split(".")[0] != "compatkit":
            continue
        plain = []
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in modules:  # ``from package import submodule``
                out.append(Edge(name, sub, (), typing_only, node.lineno))
            else:
                plain.append(alias.name)
        if plain:
            out.append(Edge(name, base, tuple(plain), typing_only, node.lineno))
    return out


def import_graph() -> list[Edge]:
    modules = all_modules()
    edges = [e for name, path in modules.items() for e in edges_of(name, path, modules)]
    unknown = sorted({f"{e.source} -> {e.target}" for e in edges if e.target not in modules})
    assert not unknown, f"imports of modules that do not exist: {unknown}"
    return edges


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for comp in components:
        members, start = set(comp), comp[0]
        parent: dict[str, str] = {}
        frontier = [start]
        while frontier:  # breadth-first back to ``start`` inside the component
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w == start:
                        path = [v]
                        while path[-1] != start:
                            path.append(parent[path[-1]])
                        cycles.append([start, *reversed(path[:-1]), start])
                        frontier, nxt = [], []
                        break
                    if w not in parent:
                        parent[w] = v
                        nxt.append(w)
                else:
                    continue
                break
            frontier = nxt
    return cycles


def test_the_graph_sees_imports_inside_functions_and_skips_type_checking_blocks(tmp_path):
    code = ("from typing import TYPE_CHECKING\n"
            "from compatkit import errors\n"
            "import compatkit.index.db\n"
            "from compatkit.index import slots, STRATEGIES\n"
            "if TYPE_CHECKING:\n    from compatkit.index.store import IndexStore\n"
            "def f():\n    from compatkit.index.jobs import _rate\n")
    path = tmp_path / "m.py"
    path.write_text(code)
    edges = edges_of("compatkit.m", path, all_modules())
    assert {(e.target, e.names, e.typing_only) for e in edges} == {
        ("compatkit.errors", (), False), ("compatkit.index.db", (), False),
        ("compatkit.index.slots", (), False), ("compatkit.index", ("STRATEGIES",), False),
        ("compatkit.index.store", ("IndexStore",), True),
        ("compatkit.index.jobs", ("_rate",), False)}


def test_a_private_module_is_for_its_own_package():
    assert not _outside_owner("compatkit.data.cifar", "compatkit.data._files")
    assert _outside_owner("compatkit.index.cli", "compatkit.data._files")
    assert not _outside_owner("compatkit.index.cli", "compatkit.data.files")


def test_find_cycles_names_each_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "d"}, "e": set()}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["d", "d"]]


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for e in import_graph():
        if not e.typing_only:
            graph.setdefault(e.source, set()).add(e.target)
    cycles = [" -> ".join(c) for c in find_cycles(graph)]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _outside_owner(source: str, target: str) -> bool:
    """Whether ``target`` has a private part (``a._b.c``) and ``source`` lies outside the
    package that owns it (``a``): a private module is for its own package only."""
    parts = target.split(".")
    for i, part in enumerate(parts):
        if _is_private(part):
            owner = ".".join(parts[:i])
            return not source.startswith(owner + ".")
    return False


def test_no_private_names_imported_across_modules():
    found = []
    for e in import_graph():
        names = [n for n in e.names if _is_private(n)]
        if names:
            found.append(f"{e.source}:{e.line} imports {', '.join(names)} from {e.target}")
        if _outside_owner(e.source, e.target):
            found.append(f"{e.source}:{e.line} imports the private module {e.target}")
    assert not found, "private imports:\n" + "\n".join(sorted(found))


def _index_layer(module: str) -> int | None:
    if module == "compatkit.index":
        module = "compatkit.index.__init__"
    if not module.startswith("compatkit.index."):
        return None
    first = module[len("compatkit.index."):].split(".")[0]
    for level, names in enumerate(INDEX_LAYERS):
        if first in names:
            return level
    raise AssertionError(f"{module} has no layer: add it to INDEX_LAYERS and to the picture "
                         "in docs/upgrade-system.md")


def _unit(module: str) -> str:
    """Modules of one unit (the service package) may import each other."""
    parts = module.split(".")
    return ".".join(parts[:3]) if parts[:3] == ["compatkit", "index", "service"] else module


def test_every_index_module_has_a_layer():
    for name in all_modules():
        _index_layer(name)


def test_index_modules_import_only_lower_layers():
    upward = []
    for e in import_graph():
        source, target = _index_layer(e.source), _index_layer(e.target)
        if source is None or target is None or _unit(e.source) == _unit(e.target):
            continue
        if target >= source:
            upward.append(f"{e.source}:{e.line} imports {e.target} "
                          f"(layer {target} >= {source})")
    assert not upward, "index imports that do not go down a layer:\n" + "\n".join(upward)


@pytest.mark.parametrize("layer", [n for names in INDEX_LAYERS for n in names])
def test_every_layer_names_a_module(layer):
    base = PACKAGE / "index"
    assert (base / f"{layer}.py").is_file() or (base / layer / "__init__.py").is_file()


SQL = re.compile(r"\b(SELECT|INSERT INTO|INSERT OR \w+ INTO|UPDATE \w+ SET|DELETE FROM)\b")
VECTOR_WRITE = re.compile(r"\b(INSERT INTO|UPDATE|DELETE FROM) (side_)?vectors\b")


def _strings(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_index_sql_lives_in_db_slots_and_jobs_and_only_slots_writes_vectors():
    stray, vector_writes = [], []
    for name, path in all_modules().items():
        if not name.startswith("compatkit.index"):
            continue
        short = name[len("compatkit.index."):]
        for line, text in _strings(path):
            if SQL.search(text) and short not in ("db", "slots", "jobs"):
                stray.append(f"{name}:{line}")
            if VECTOR_WRITE.search(text) and short != "slots":
                vector_writes.append(f"{name}:{line}")
    assert not stray, f"SQL outside db, slots and jobs: {stray}"
    assert not vector_writes, f"vector rows written outside slots: {vector_writes}"
