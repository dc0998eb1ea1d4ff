"""Stopping and resuming like a long job (docs/stop-and-resume.md): SIGTERM to `align run` stops its whole tree
of processes and marks the stage interrupted; a second writer of a stage folder is refused; kill -9 at a
checkpoint, then a rerun, resumes from it and ends equal to an uninterrupted run; the preemption save."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from align.errors import AlignError
from conftest import REPO, stage_args

BOOT = REPO / "recipes" / "quickstart" / "bootstrap.yaml"


def _pipeline(tmp_path, **boot_set) -> Path:
    spec = {
        "output_dir": str(tmp_path / "out"),
        "accelerate_config": str(REPO / "recipes" / "accelerate" / "cpu.yaml"),
        "stages": [
            {"name": "data", "kind": "data", "generator": "addition-sft", "n": 64, "seed": 1, "digits": [2]},
            {"name": "boot", "kind": "sft", "recipe": str(BOOT),
             "set": {"datasets": ["${data}/train.jsonl"], "per_device_train_batch_size": 4, "max_length": 48,
                     "logging_steps": 1, "warmup_steps": 1, **boot_set}},
        ],
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _start(path: Path, tmp_path: Path, grace: int = 60) -> subprocess.Popen:
    env = {**os.environ, "ALIGN_STOP_GRACE": str(grace), "PYTHONPATH": str(REPO)}
    log = open(tmp_path / "run.out", "ab")
    return subprocess.Popen([sys.executable, "-m", "align", "run", str(path)], stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=REPO, start_new_session=True)  # a session of its own: only it gets signals


def _wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"align run ended (exit {proc.returncode}) before {what}")
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def _steps_done(folder: Path) -> int:
    try:
        return json.loads((folder / "progress.json").read_text()).get("done") or 0
    except (OSError, ValueError):
        return 0


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def _living(procs) -> list:
    alive = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


def _kill_tree(proc: subprocess.Popen) -> None:
    """Test cleanup: whatever is left of a run."""
    if proc.poll() is None:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait()


def test_sigterm_stops_the_whole_tree_and_a_second_writer_is_refused(tmp_path):
    path = _pipeline(tmp_path, max_steps=500, save_strategy="no")
    boot = tmp_path / "out" / "boot"
    proc = _start(path, tmp_path)
    try:
        _wait_for(lambda: _steps_done(boot) >= 1, proc, 300, "the first training step")
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert len(tree) >= 2  # accelerate launch, and the `align sft` worker under it

        # One writer per stage folder: a second run, and the stage command itself, are refused naming the run.
        from align.pipeline import main

        with pytest.raises(AlignError, match=rf"out/boot: being written by pid {proc.pid} \(align run"):
            main([str(path)])
        from align.sft.train import main as sft

        with pytest.raises(AlignError, match=rf"being written by pid {proc.pid}"):
            sft(["--config", str(boot / "recipe.yaml")])

        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # the main process only, as a scheduler or `kill PID` does
        code = proc.wait(timeout=120)
        took = time.monotonic() - start
    finally:
        _kill_tree(proc)
    output = (tmp_path / "run.out").read_text()
    assert code == 128 + signal.SIGTERM, output[-2000:]
    assert took < 60 + 10  # within the grace period
    assert _living(tree) == [], f"still running: {_living(tree)}"
    record = json.loads((boot / "stage.json").read_text())
    assert record["status"] == "interrupted" and record["signal"] == "SIGTERM"
    assert "boot interrupted (SIGTERM)" in output and "| boot | INTERRUPTED |" in output
    # The worker saved a checkpoint at the next step boundary (save_strategy: "no" notwithstanding), whole.
    from align.checkpoints import newest_checkpoint

    newest, skipped = newest_checkpoint(boot)
    assert newest is not None and not skipped, output[-2000:]
    assert not (boot / "model.safetensors").exists()  # the stage did not finish: no final model
    before = _snapshot(tmp_path / "out")
    time.sleep(3)
    assert _snapshot(tmp_path / "out") == before  # nothing writes after the run ended
