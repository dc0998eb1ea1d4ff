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


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` whole or not at all: a temporary file beside it, fsync, rename. A full disk or a
    kill leaves the previous file (or none), never an empty or half-written one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


LOCK_FILE = ".build.lock"


class StoreLocked(Exception):
    pass


class TreeStore:
    """trees.jsonl of one output folder, held by one build at a time (an exclusive lock on the folder)."""

    def __init__(self, output_dir: str | os.PathLike, lock: bool = True):
        import fcntl

        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = None
        if lock:
            self._lock_fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._lock_fd)
                raise StoreLocked(str(self.dir)) from None
        self.path = self.dir / TREES_FILE
        try:
            self.repaired_bytes = _repair_tail(self.path)
            self.done: set[str] = {tree["problem"]["id"] for tree in self.trees()}
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except BaseException:  # a corrupt store: the lock goes with the error
            if self._lock_fd is not None:
                os.close(self._lock_fd)
            raise

    def trees(self) -> Iterator[dict]:
        return iter_trees(self.path)

    def append(self, tree: dict) -> None:
        self.append_many([tree])

    def append_many(self, trees: list[dict]) -> None:
        """One write and one fsync for a group of trees. If the disk fills mid-write, the partial line is
        cut off again (here, and by the next open), so the store stays one a rerun resumes."""
        trees = [t for t in trees if t["problem"]["id"] not in self.done]
        if not trees:
            return
        data = "".join(json.dumps(t, ensure_ascii=False, sort_keys=True) + "\n" for t in trees).encode("utf-8", "replace")
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            while data:
                data = data[os.write(self._fd, data):]
            os.fsync(self._fd)
        except OSError:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                pass
            raise
        self.done.update(t["problem"]["id"] for t in trees)

    def record_failure(self, problem_id: str, error: str) -> None:
        line = json.dumps({"problem_id": problem_id, "error": error}, ensure_ascii=True) + "\n"
        with open(self.dir / FAILURES_FILE, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        os.close(self._fd)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def tree_problem(tree) -> str | None:
    """What is wrong with a line of trees.jsonl (None: a well-formed tree), checked as far as the exports and
    statistics read it."""
    if not isinstance(tree, dict):
        return "not a JSON object"
    if not isinstance(tree.get("tree_id"), str) or not isinstance(tree.get("problem"), dict):
        return "no tree_id or problem"
    problem = tree["problem"]
    if not isinstance(problem.get("id"), str) or problem.get("task") not in ("math", "code", "logic"):
        return "its problem has no id or task"
    if not isinstance(tree.get("instruction"), str) or not isinstance(tree.get("turns"), list):
        return "no instruction or turns"
    for turn in tree["turns"]:
        if not isinstance(turn, dict) or type(turn.get("turn")) is not int:
            return "a turn without its number"
        history, actions, pair = turn.get("history"), turn.get("actions"), turn.get("pair")
        if not isinstance(history, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in history):
            return "a history that is not a list of messages"
        if not isinstance(actions, list) or not all(
                isinstance(a, dict) and isinstance(a.get("text"), str) and isinstance(a.get("correct"), bool) for a in actions):
            return "actions that are not texts with a verdict"
        if pair is not None:
            if not isinstance(pair, dict) or not all(type(pair.get(k)) is int and 0 <= pair[k] < len(actions)
                                                     for k in ("chosen", "rejected")):
                return "a pair that names no action"
    return None


def iter_trees(path: str | os.PathLike) -> Iterator[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / TREES_FILE
    if not path.exists():
        return
    seen = set()
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    tree = json.loads(line)
                except ValueError:
                    if not line.endswith("\n"):
                        return  # a partial last line (a build is writing, or was killed): rebuilt on the next run
                    tree = None
                problem = tree_problem(tree)
                if problem is not None:
                    from align.core.errors import AlignError

                    raise AlignError(f"{path}:{number}: not a tree ({problem}); delete that line to resume, "
                                     "the tree is then built again")
                pid = tree["problem"].get("id")
                if pid in seen:  # a store written twice over (an older version had no lock): first copy wins
                    continue
                seen.add(pid)
                yield tree
