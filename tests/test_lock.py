"""The lock of known-good versions (constraints.txt) fits pyproject.toml, and the newest-releases check
(.ci/newest.py) reads and compares it as it says."""

from __future__ import annotations

import importlib.util
import tomllib

from packaging.requirements import Requirement

from conftest import REPO


def _newest():
    spec = importlib.util.spec_from_file_location("newest", REPO / ".ci" / "newest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_dependency_is_locked_inside_its_range():
    """A dependency added or re-ranged without refreshing the lock fails here, not on a user's machine."""
    newest = _newest()
    pins = newest.read_pins((REPO / "constraints.txt").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"][newest.EXTRAS]]
    problems = []
    for req in wanted:
        if req.name == "torch":
            assert "torch" not in pins  # installed first, by its own command
            continue
        pin = pins.get(newest._normalize(req.name))
        if pin is None:
            problems.append(f"{req.name}: not in constraints.txt")
        elif not req.specifier.contains(pin[1], prereleases=True):
            problems.append(f"{req.name}: locked at {pin[1]}, outside {req.specifier}")
    assert not problems, f"refresh the lock (python3 .ci/newest.py --write-lock): {problems}"


def test_ci_and_the_readme_install_with_the_lock():
    ci = (REPO / ".ci" / "run").read_text()
    assert '-e ".[dev]" -c constraints.txt' in ci
    readme = (REPO / "README.md").read_text()
    assert readme.count("-c constraints.txt") >= 2


def test_the_check_reports_what_differs():
    newest = _newest()
    old = newest.read_pins("# header\nfoo==1.0\nBar_Baz==2.0\nsame==3\n")
    new = newest.read_pins("foo==1.1\nbar-baz==2.0\nsame==3\nnew-one==0.1\n")
    lines = newest.compare(old, new)
    assert lines == ["  foo: 1.0 -> 1.1", "  new-one: (not in the lock) -> 0.1"]
    assert newest.compare(new, {}) == [f"  {n}: {v} -> (no longer installed)" for n, v in sorted(new.values())]
