"""Live progress: the progress file a stage writes, the line `align run` shows from it, and the progress
of trees, export and training that reaches it."""

from __future__ import annotations

import io
import json
import sys
import textwrap

from align.core.progress import PROGRESS_ENV, Progress, describe, read_progress

from conftest import REPO


def test_progress_file_and_its_line(tmp_path, monkeypatch):
    path = tmp_path / "progress.json"
    monkeypatch.setenv(PROGRESS_ENV, str(path))
    progress = Progress("trees", 10, "tree")
    assert progress.bar.disable  # under `align run` the live line shows it, not a bar in the log
    progress.advance(3, note="pairs=2")
    progress.close()
    state = json.loads(path.read_text())
    assert (state["what"], state["done"], state["total"], state["unit"], state["note"]) == ("trees", 3, 10, "tree", "pairs=2")
    line = describe({**state, "elapsed_s": 6.0})
    assert line == "trees 3/10 30% 0.5 tree/s ETA 14s pairs=2"
    assert describe({"what": "kto", "done": 10, "total": 10, "elapsed_s": 100.0, "unit": "step"}) == "kto 10/10 100% 0.1 step/s"
    assert describe({"what": "x", "done": 5, "total": None, "elapsed_s": 0}) == "x 5"
    assert read_progress(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert read_progress(tmp_path / "bad.json") is None


def test_the_last_of_a_burst_is_written_when_the_interval_is_over(tmp_path, monkeypatch):
    """A batch of trees that end together: the first is written at once, the rest within the interval are
    written as one when it is over, not held back until the next tree ends minutes later."""
    import time

    from align.core import progress as module

    path = tmp_path / "progress.json"
    monkeypatch.setenv(PROGRESS_ENV, str(path))
    progress = Progress("trees", 48, "tree")
    progress.advance()
    assert json.loads(path.read_text())["done"] == 1
    for _ in range(23):
        progress.advance(note="pairs=9")
    assert json.loads(path.read_text())["done"] == 1  # not rewritten 23 times in a moment
    time.sleep(module._MIN_INTERVAL_S + 0.5)
    state = json.loads(path.read_text())
    assert (state["done"], state["note"]) == (24, "pairs=9")
    progress.close()


def _slow_child(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from align.core.progress import Progress
        p = Progress("work", 5, "item")
        for i in range(5):
            time.sleep(0.4)
            p.advance(note=f"item {{i}}")
        p.close()
    """))
    return [sys.executable, str(script)]


def test_align_run_shows_the_stage_progress_in_a_log(tmp_path, monkeypatch, capsys):
    import align.runner.pipeline as pipeline

    monkeypatch.setattr(pipeline, "HEARTBEAT_S", 0.25)
    runner = pipeline.Runner.__new__(pipeline.Runner)
    log = tmp_path / "log.txt"
    runner._run(_slow_child(tmp_path), log, "stage1")
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("[align] run: stage1: work ")]
    assert lines and any("/5 " in line and "ETA" in line for line in lines), out
    assert all(f"log {log}" in line for line in lines)
    assert "\r" not in out  # a log gets whole lines


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_align_run_rewrites_one_line_on_a_terminal(tmp_path, monkeypatch):
    import align.runner.pipeline as pipeline

    monkeypatch.setattr(pipeline, "LIVE_S", 0.2)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    runner = pipeline.Runner.__new__(pipeline.Runner)
    runner._run(_slow_child(tmp_path), tmp_path / "log.txt", "stage1")
    out = terminal.getvalue()
    assert "\r\033[K[align] run: stage1: work " in out and "\n" not in out and out.endswith("\r\033[K")


def test_trees_and_export_write_progress(tmp_path, monkeypatch):
    from align.trees.builder import build_trees, parse_trees_config
    from align.trees.export import export_trees
    from test_trees import OracleBackend

    path = tmp_path / "progress.json"
    monkeypatch.setenv(PROGRESS_ENV, str(path))
    config, actor, critic, limits = parse_trees_config(
        {"problems": "arithmetic:12:3", "output_dir": str(tmp_path / "trees"), "samples_per_turn": 2,
         "report_to": ["tensorboard"], "actor": {"backend": "local"}}, "test")
    build_trees(config, actor, critic, limits, actor=OracleBackend(0.5))
    state = json.loads(path.read_text())
    assert (state["what"], state["done"], state["total"]) == ("trees", 12, 12) and "pairs=" in state["note"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "trees" / "runs" / "trees"))
    events.Reload()
    assert events.Scalars("trees/trees")[-1].value == 12 and events.Scalars("trees/pass_rate/turn_1")

    export_trees(tmp_path / "trees", tmp_path / "export")
    state = json.loads(path.read_text())
    assert (state["what"], state["done"], state["total"]) == ("export", 9, 9)


def test_report_to_all_means_every_installed_tracker():
    """`report_to: all` (transformers' meaning) on eval and trees: the installed trackers accelerate can log to."""
    from align.train.extras import TRACKERS, importable
    from align.train.tracking import check_trackers

    names = check_trackers("all", "test")
    assert "tensorboard" in names  # a dependency of the tests
    assert all(importable(*TRACKERS[n][0]) for n in names)
    assert check_trackers(["none"], "test") == []
