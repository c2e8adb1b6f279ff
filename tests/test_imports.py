"""The package's modules import one another without circles, and library code never imports the CLI.

The import graph is read from the source with ``ast``: every ``import saehook.x`` / ``from .x import y``
anywhere in a module (inside functions too: a lazy import is still a dependency), except those under
``if TYPE_CHECKING:``, which never run. An edge to a package (``from .formats import load``) goes to its
``__init__``; the implicit import of parent packages is not an edge.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "saehook"


def modules() -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (path, is_package)}`` of every module of saehook."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except what lies under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def import_graph() -> dict[str, set[str]]:
    """``{module: the saehook modules it imports}``."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, (path, is_pkg) in mods.items():
        package = name if is_pkg else name.rpartition(".")[0]
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t != "saehook" and not t.startswith("saehook."):
                    continue
                while t not in mods:  # saehook.x.attr -> saehook.x
                    t = t.rpartition(".")[0]
                if t != name:
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected groups of two or more modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(frozenset(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_reader_sees_lazy_imports_and_skips_type_checking():
    graph = import_graph()
    assert "saehook.dashboard" in graph["saehook.cli"]  # imported inside run_dashboard()
    assert "saehook.formats" in graph["saehook"]  # a package
    src = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\nelse:\n    from .b import B\n"
           "def f():\n    from .c import C\n")
    seen = {n.module for n in _runtime_nodes(ast.parse(src)) if isinstance(n, ast.ImportFrom)}
    assert seen == {"typing", "b", "c"}
    a, b = {"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": {"x"}}, {"x": {"y"}, "y": set()}
    assert cycles(a) == [frozenset("xyz")] and cycles(b) == []


def test_no_import_cycles_in_the_package():
    found = [sorted(c) for c in cycles(import_graph())]
    assert not found, f"import cycles among saehook modules: {found}"


def test_library_code_never_imports_the_cli():
    graph = import_graph()
    users = sorted(m for m, deps in graph.items() if "saehook.cli" in deps and m != "saehook.__main__")
    assert not users, f"library modules importing saehook.cli: {users}"


@pytest.mark.parametrize("name", sorted(set(modules()) - {"saehook.__main__"}))  # that one runs the CLI
def test_every_module_imports(name):
    if name == "saehook.triton_kernels" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is optional (CUDA kernels; the dev extra installs it on Linux)")
    importlib.import_module(name)
