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
import json
import os
import re
import subprocess
import sys

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


def test_the_foundations_import_nothing_above_them():
    """align.core is the bottom layer: its modules import each other only (docs/contributors.md)."""
    graph = import_graph()
    core = {name for name in graph if name.startswith("align.core")}
    assert len(core) >= 8
    upward = {name: sorted(e for e in graph[name] if e not in core) for name in core}
    assert not any(upward.values()), f"align.core imports above itself: {upward}"


def test_the_top_level_shows_the_pipeline():
    """The top level holds the entry points, the stage registry and the packages; a module of a stage goes
    into the package of that stage (docs/contributors.md says which)."""
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py", "__main__.py", "cli.py", "stages.py"]
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and any(p.glob("*.py"))}
    assert packages == {"core", "train", "moe", "tasks", "trees", "evaluation", "publishing", "runner",
                        "sft", "dpo", "kto_nca"}


def _moved() -> dict[str, str]:
    """align.MOVED, read from align/__init__.py's source (the graph tests import no align module)."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    node = next(n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "MOVED")
    return eval(compile(ast.Expression(node), "align/__init__.py", "eval"), {})  # a dict of constant strings


def test_every_moved_module_has_its_alias():
    """Every old top-level module is in the alias table, and each alias names a module that exists."""
    moved = _moved()
    modules = _modules()
    assert len(moved) == 26
    for old, new in moved.items():
        assert new in modules and new.rpartition(".")[2] == old, (old, new)
        assert not (PACKAGE / f"{old}.py").exists()


# the alias table, this test and the contributors' page, which name the old paths on purpose
ALIAS_NAMERS = ("align/__init__.py", "tests/test_import_graph.py", "docs/contributors.md")


def test_nothing_uses_an_old_path():
    """Code, tests, docs, recipes and benchmarks name the new paths (align.train.config, align/train/config.py),
    never the deprecated ones, so nothing of the project rests on the aliases."""
    old = "|".join(sorted(_moved(), key=len, reverse=True))
    dotted = re.compile(rf"(?<![\w.-])align\.({old})\b|(?<![\w.-])align/({old})\.py\b|\bfrom align import ({old})\b")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    found = []
    for name in filter(None, files.stdout.split("\0")):
        path = REPO / name
        if path.suffix not in (".py", ".md", ".yaml", ".yml", ".toml") or name in ALIAS_NAMERS:
            continue
        if not path.is_file():
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if dotted.search(line):
                found.append(f"{name}:{number}: {line.strip()}")
    assert not found, "old paths (use the new ones in align.MOVED):\n" + "\n".join(found)


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args, *(["-c", code] if code else [])], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)


def test_help_and_import_align_stay_light():
    """`import align` and `align --help` load no training library: the aliases and the packages' __init__
    files import nothing heavy."""
    proc = _python("import sys\nfrom align.cli import main\nmain(['--help'])\n"
                   "print(sorted(m for m in ('torch', 'trl', 'transformers', 'datasets', 'peft', 'accelerate', "
                   "'numpy', 'yaml') if m in sys.modules))")
    assert proc.returncode == 0, proc.stderr
    assert "usage: align <command>" in proc.stdout and proc.stdout.strip().endswith("[]"), proc.stdout


def test_the_old_paths_still_import_with_a_deprecation_warning():
    """Each deprecated path is the new module itself (so patching one patches the other), and says which
    path to use, for `import align.X`, `from align.X import name` and `from align import X` alike."""
    code = """
import importlib, json, sys, warnings
import align
result = {}
for old, new in align.MOVED.items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if old == "lifecycle":
            from align import lifecycle as module
        elif old == "config":
            from align.config import ModelArguments
            module = sys.modules["align.config"]
            assert ModelArguments is importlib.import_module(new).ModelArguments
        else:
            module = importlib.import_module("align." + old)
    result[old] = [module is importlib.import_module(new),
                   [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]]
print(json.dumps(result))
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    moved = _moved()
    assert set(result) == set(moved)
    for old, (same, messages) in result.items():
        assert same, old
        assert any(f"align.{old} is deprecated" in m and f"import {moved[old]}" in m for m in messages), (old, messages)


def test_python_m_an_old_path_runs_the_new_module_and_says_so():
    """`python -m align.launch` (documented in 0.1) still runs accelerate's launcher, and a plain
    `python -c "import align.config"` shows the warning (Python shows a DeprecationWarning of __main__)."""
    proc = _python("", "-m", "align.launch", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout.lower()
    assert "python -m align.launch is deprecated" in proc.stderr and "python -m align.train.launch" in proc.stderr
    proc = _python("import align.errors")
    assert proc.returncode == 0 and "align.errors is deprecated" in proc.stderr and "align.core.errors" in proc.stderr


def test_a_moved_module_still_finds_the_files_beside_the_package(tmp_path, monkeypatch):
    """launch.py, one folder deeper since the regroup, names the packaged accelerate configs from any
    working directory (`--accelerate_config cpu` outside the checkout)."""
    from align.train.launch import PACKAGE_RECIPES, resolve_accelerate_config

    monkeypatch.chdir(tmp_path)
    assert PACKAGE_RECIPES == REPO / "recipes" / "accelerate"
    assert resolve_accelerate_config("cpu") == PACKAGE_RECIPES / "cpu.yaml"
