"""The package's modules import each other without cycles (runtime imports, lazy ones too)."""

from __future__ import annotations

import ast
from pathlib import Path

import fbclip_edge

PACKAGE = Path(fbclip_edge.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(test)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """fbclip_edge modules this file imports at run time (module level or inside functions)."""
    tree = ast.parse(path.read_text())
    guarded = [block for block in ast.walk(tree) if _type_checking_block(block)]
    skip = {id(n) for block in guarded for n in ast.walk(block)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from pkg import sub` imports the submodule; `from pkg import name`, pkg itself
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                for a in node.names
            ]
        for name in names:
            # importing a.b.c also runs a and a.b; keep the deepest known module
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("fbclip_edge"):
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    # a module's own parent packages are initialised before it runs: no edge to them
    graph = {
        name: {t for t in imported_modules(path, known) if not name.startswith(t + ".")} - {name}
        for name, path in files.items()
    }
    # importing a.b.c runs a.b's __init__ first: an edge to every parent package except the
    # root facade (fbclip_edge/__init__.py re-exports the public API and is imported first)
    for name in list(graph):
        targets = set(graph[name])
        for target in targets:
            parent = target.rpartition(".")[0]
            while parent.count("."):
                if parent != name and not name.startswith(parent + "."):
                    graph[name].add(parent)
                parent = parent.rpartition(".")[0]
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules, or None (iterative DFS with colours)."""
    colour = dict.fromkeys(graph, 0)
    for root in sorted(graph):
        if colour[root]:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        colour[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(child) == 1:
                return path[path.index(child) :] + [child]
            elif colour.get(child) == 0:
                colour[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph[child]))))
    return None


def test_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
