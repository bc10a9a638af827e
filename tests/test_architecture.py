"""The core package's layout: imports parsed with ``ast`` (also those inside functions) form no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "spinepath"


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the spinepath modules it imports (top level, in functions, under TYPE_CHECKING alike)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for m, p in modules.items():
        for node in ast.walk(ast.parse(p.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # "from spinepath.x import y": y may itself be a module of the package
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != m and t.startswith("spinepath"):
                    graph[m].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 30
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_layers_point_one_way():
    """core imports no other part of the package; io, data and transforms import only core (and the root)."""
    graph = import_graph()
    for m, deps in graph.items():
        if m.startswith("spinepath.core"):
            assert all(d == "spinepath" or d.startswith("spinepath.core") for d in deps), (m, deps)
        if m.split(".")[1:2] in (["io"], ["data"], ["transforms"]):
            assert all(d == "spinepath" or d.split(".")[1] in ("core", "io", "data", "transforms") or d == m
                       for d in deps), (m, deps)


def test_function_level_imports_give_a_reason():
    """An import inside a function is there to keep start-up light, and a comment says why.

    The comment is on the import's line or above its block of imports.
    """
    missing = []
    for p in PACKAGE.rglob("*.py"):
        lines = p.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        import_lines = {i for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)
                        for i in range(n.lineno - 1, n.end_lineno)}
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for sub in ast.walk(fn):
                if not isinstance(sub, ast.Import | ast.ImportFrom):
                    continue
                i = sub.lineno - 2
                while i >= 0 and (i in import_lines or not lines[i].strip()):
                    i -= 1
                if "#" not in lines[sub.lineno - 1] and not (i >= 0 and lines[i].strip().startswith("#")):
                    missing.append(f"{p.relative_to(REPO)}:{sub.lineno}")
    assert not missing, missing
