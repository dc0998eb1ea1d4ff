"""No import circle among align's modules.

The graph is read statically with `ast` from every module under align/: each `import align...` and
`from align... import ...` anywhere in a module counts, at its top or inside a function (a deferred
import is still a dependency: it only moves the circle from import time to call time). `from align.x
import y` is an edge to `align.x.y` when that is a module, else to `align.x`. Dynamic imports by name
(`importlib.import_module` in the CLI's command table and the stage registry) are not edges: they are how
the entry points reach the stages, from above.
"""

from __future__ import annotations

import ast

from conftest import REPO

PACKAGE = REPO / "align"


def _modules() -> dict:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _owner(name: str, modules: dict) -> str | None:
    """The module that `name` (a dotted module path, or a module path plus an attribute) names."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {_owner(a.name, modules) for a in node.names if a.name.split(".")[0] == "align"}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source.split(".")[0] != "align":
                    continue
                edges |= {_owner(f"{source}.{a.name}", modules) for a in node.names}
        graph[name] = edges - {None, name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _describe(component: list[str], graph: dict[str, set[str]]) -> str:
    members = set(component)
    return "; ".join(f"{m} -> {', '.join(sorted(graph[m] & members))}" for m in component)


def test_the_graph_is_read():
    """The reader sees the edges it should, top-level, deferred and relative alike (so a graph with no
    circle is not one with no edges)."""
    graph = import_graph()
    assert "align.core.errors" in graph["align.cli"]  # top-level `from align.core.errors import ...`
    assert "align.train.launch" in graph["align.train.training"]  # inside a function
    assert "align.tasks._harness" in graph["align.tasks.literal_tests"]  # `from align.tasks import _harness`
    assert "align.moe.nf4_tensor" in graph["align.moe.fused_lora"]
    assert len(graph) >= 50 and sum(map(len, graph.values())) >= 100


def test_cycles_are_found():
    """The detector itself: a circle of three, a pair, and a chain that is no circle."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d", "f"}, "f": set(), "g": {"a", "f"}}
    assert sorted(cycles(graph)) == [["a", "b", "c"], ["d", "e"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_circle_in_align():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import circles in align/ (move what both sides need below both): " + " | ".join(
        _describe(c, graph) for c in found)
