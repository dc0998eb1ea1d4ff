#!/usr/bin/env python3
"""The newest-releases check, and the way to move the lock forward.

    python3 .ci/newest.py                 # report: what is newer than constraints.txt, and what breaks
    python3 .ci/newest.py --write-lock    # the same; if the suite passes, write the new constraints.txt

It makes a fresh virtual environment, installs the project as CI does but WITHOUT the lock (so pip takes
the newest releases inside pyproject.toml's ranges), lists every package whose version differs from
`constraints.txt`, runs the test suite there and prints its failures. A maintainer runs it on purpose (it
is not part of `.ci/run`); CI and the README's test command install with `-c constraints.txt`, so a
release upstream cannot turn main red by itself.

`--write-lock` writes the resolved set only when the suite passed (`--force` writes it anyway), so the
lock never holds a set that was not tested. torch is not in the lock: the install commands take it first
(`pip install torch==2.13.0`, the CPU wheel here), and a user who installed a CUDA build keeps it.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "constraints.txt"
EXTRAS = "dev"  # what .ci/run installs
TORCH = "torch==2.13.0"  # what .ci/run installs first (the CPU wheel on the project's machines)
HEADER = """\
# Known-good versions: what CI and the README's test command install (`pip install -e ".[dev]" -c constraints.txt`),
# torch apart (installed first: `pip install torch==2.13.0`, or your own CUDA build).
# Written by `python3 .ci/newest.py --write-lock` after the whole suite passed with exactly these versions
# on {date} (Python {python}). Plain `pip install -e .` ignores this file and takes pyproject.toml's ranges.
"""


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(text: str) -> dict[str, tuple[str, str]]:
    """name -> (spelling, version) of every `name==version` line."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and not line.startswith("-"):
            name, version = (part.strip() for part in line.split("==", 1))
            pins[_normalize(name)] = (name, version)
    return pins


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    print("$", " ".join(map(str, cmd)), flush=True)
    return subprocess.run(cmd, **kwargs)


def resolve_newest(venv: Path) -> dict[str, tuple[str, str]]:
    if not (venv / "bin" / "python").exists():
        _run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, TORCH], check=True)
    _run([*pip, "--upgrade", "--upgrade-strategy", "eager", "-e", f".[{EXTRAS}]"], check=True, cwd=REPO)
    frozen = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "freeze", "--exclude-editable"],
                            check=True, capture_output=True, text=True).stdout
    pins = read_pins(frozen)
    pins.pop("torch", None)  # installed first, by its own command: a user's own CUDA build of torch stays
    return pins


def compare(old: dict, new: dict) -> list[str]:
    lines = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, (key, None))[1], new.get(key, (key, None))[1]
        if before != after:
            name = (new.get(key) or old.get(key))[0]
            lines.append(f"  {name}: {before or '(not in the lock)'} -> {after or '(no longer installed)'}")
    return lines


def run_suite(venv: Path, pytest_args: list[str]) -> tuple[bool, list[str]]:
    proc = _run([str(venv / "bin" / "python"), "-m", "pytest", "-rfE", "-p", "no:cacheprovider",
                 *pytest_args], cwd=REPO, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    failures = [line for line in out.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    summary = [line for line in out.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    return proc.returncode == 0, failures + summary[-1:]


def write_lock(pins: dict) -> None:
    body = "".join(f"{name}=={version}\n" for name, version in sorted(pins.values(), key=lambda p: _normalize(p[0])))
    header = HEADER.format(date=time.strftime("%Y-%m-%d"), python=".".join(map(str, sys.version_info[:3])))
    tmp = LOCK.with_suffix(".tmp")
    tmp.write_text(header + body)
    tmp.replace(LOCK)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-lock", action="store_true", help="write constraints.txt if the suite passes")
    parser.add_argument("--force", action="store_true", help="with --write-lock: write it even if tests fail")
    parser.add_argument("--no-tests", action="store_true", help="only report what is newer than the lock")
    parser.add_argument("--venv", type=Path, help="reuse this virtual environment (default: a fresh one)")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (default: the whole suite)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="align-newest-") as tmp:
        venv = args.venv or Path(tmp) / "venv"
        newest = resolve_newest(venv)
        locked = read_pins(LOCK.read_text()) if LOCK.exists() else {}
        changes = compare(locked, newest)
        print(f"\nnewest releases inside pyproject.toml's ranges vs constraints.txt: {len(changes)} differ")
        print("\n".join(changes) if changes else "  (none: the lock is the newest set)")
        passed, report = (True, ["(tests not run)"]) if args.no_tests else run_suite(venv, args.pytest_args)
        print("\nthe suite with the newest releases:", "passed" if passed else "FAILED")
        print("\n".join(f"  {line}" for line in report))
        if args.write_lock:
            if passed or args.force:
                write_lock(newest)
                print(f"\nwrote {LOCK.relative_to(REPO)} ({len(newest)} packages)")
            else:
                print(f"\n{LOCK.relative_to(REPO)} left as it is: the suite failed (--force writes it anyway)")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
