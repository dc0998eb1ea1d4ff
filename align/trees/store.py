"""Finished trees on disk: one JSON line per tree, appended with a single write and fsync.

A rerun reads the finished problem ids and skips them. A SIGKILL can at worst leave one partial last
line, which `TreeStore` cuts off on open (that tree is simply built again), so nothing is duplicated
or lost.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

TREES_FILE = "trees.jsonl"
FAILURES_FILE = "failures.jsonl"


def _repair_tail(path: Path) -> int:
    """Cut a partial final line left by a crash mid-write; returns the bytes removed."""
    if not path.exists() or path.stat().st_size == 0:
        return 0
    with open(path, "rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1
        tail = data[keep:]
        if tail:
            try:
                json.loads(tail)
                f.write(b"\n")  # a complete object missing only its newline
                return 0
            except ValueError:
                f.truncate(keep)
                return len(tail)
    return 0


class TreeStore:
    def __init__(self, output_dir: str | os.PathLike):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / TREES_FILE
        self.repaired_bytes = _repair_tail(self.path)
        self.done: set[str] = {tree["problem"]["id"] for tree in self.trees()}
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def trees(self) -> Iterator[dict]:
        return iter_trees(self.path)

    def append(self, tree: dict) -> None:
        self.append_many([tree])

    def append_many(self, trees: list[dict]) -> None:
        """One write and one fsync for a group of trees."""
        data = "".join(json.dumps(t, ensure_ascii=False, sort_keys=True) + "\n" for t in trees).encode()
        while data:
            data = data[os.write(self._fd, data):]
        os.fsync(self._fd)
        self.done.update(t["problem"]["id"] for t in trees)

    def record_failure(self, problem_id: str, error: str) -> None:
        with open(self.dir / FAILURES_FILE, "a") as f:
            f.write(json.dumps({"problem_id": problem_id, "error": error}) + "\n")

    def close(self) -> None:
        os.close(self._fd)


def iter_trees(path: str | os.PathLike) -> Iterator[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / TREES_FILE
    if not path.exists():
        return
    with open(path) as f:
        for line in f:
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError:
                    return  # a partial last line: the tree is rebuilt on the next run
