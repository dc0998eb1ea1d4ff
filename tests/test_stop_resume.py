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
from safetensors import safe_open
from safetensors.torch import load_file

from align.errors import AlignError
from conftest import REPO, SFT_4BIT_ARGS, SFT_ARGS, stage_args

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


def _history(folder: Path) -> list[tuple]:
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return [(h["step"], h["loss"], h["grad_norm"], h["learning_rate"]) for h in history if "loss" in h]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs by {(wa[key] - wb[key]).abs().max().item()}"


def test_kill_9_at_a_checkpoint_then_a_rerun_resumes_from_it_equal_to_an_uninterrupted_run(tmp_path):
    from align.checkpoints import newest_checkpoint
    from align.pipeline import main

    # the uninterrupted run of the same stage, into another output folder
    straight = tmp_path / "straight"
    straight.mkdir()
    assert main([str(_pipeline(straight, max_steps=4, save_strategy="steps", save_steps=2))]) == 0

    path = _pipeline(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    boot = tmp_path / "out" / "boot"
    proc = _start(path, tmp_path)
    try:
        _wait_for(lambda: (boot / "checkpoint-2" / "trainer_state.json").is_file(), proc, 300, "checkpoint-2")
        tree = psutil.Process(proc.pid).children(recursive=True)
        proc.kill()  # kill -9: no handler runs, nothing is marked
        proc.wait()
        deadline = time.monotonic() + 15
        while _living(tree) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        _kill_tree(proc)
    assert _living(tree) == [], "the stage outlived align run killed with SIGKILL"
    assert json.loads((boot / "stage.json").read_text())["status"] == "running"
    assert json.loads((boot / ".align.lock").read_text())["pid"] == proc.pid  # left by a dead process
    newest, _ = newest_checkpoint(boot)
    step = int(newest.name.split("-")[1])
    assert step < 4 and not (boot / "model.safetensors").exists(), "the stage ended before the kill"
    # the next checkpoint, cut off at the kill before its trainer_state.json
    half = boot / f"checkpoint-{step + 2}"
    half.mkdir(exist_ok=True)
    (half / "trainer_state.json").unlink(missing_ok=True)
    (half / "model.safetensors").write_bytes(b"\0" * 100)

    rerun = subprocess.run([sys.executable, "-m", "align", "run", str(path)], capture_output=True, text=True,
                           cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert f"[align] run: boot: checkpoint-{step + 2} skipped: no trainer_state.json" in rerun.stdout
    assert f"[align] run: boot: resuming from checkpoint-{step} of 4 steps" in rerun.stdout
    record = json.loads((boot / "stage.json").read_text())
    assert record["status"] == "done" and record["resumed_from"] == f"checkpoint-{step}"
    # the checkpoint holds the layout the model runs in, so the Trainer's resume loads every weight
    with safe_open(str(boot / f"checkpoint-{step}" / "model.safetensors"), framework="pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in set(f.keys())
    log = (boot / "log.txt").read_text()
    assert "missing keys" not in log and "unexpected keys" not in log
    # equal to the uninterrupted run: every weight, and the loss log step by step
    assert _history(boot) == _history(straight / "out" / "boot")
    assert [s for s, *_ in _history(boot)] == [1, 2, 3, 4]
    _assert_same_weights(boot, straight / "out" / "boot")


def _signal_at_step(monkeypatch, step: int, signum=signal.SIGUSR1):
    """The stage gets `signum` (Slurm's SIGUSR1 before a time limit) as training step `step` ends."""
    import align.training as training

    original = training.progress_callback

    def progress_then_signal(stage):
        callback = original(stage)
        on_step_end = callback.on_step_end

        def end(args, state, control, **kwargs):
            result = on_step_end(args, state, control, **kwargs)
            if state.global_step == step:
                os.kill(os.getpid(), signum)
            return result

        callback.on_step_end = end
        return callback

    monkeypatch.setattr(training, "progress_callback", progress_then_signal)


def _adapter_history(folder: Path) -> list[tuple]:
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return [tuple(sorted((k, v) for k, v in h.items() if not k.startswith("train_") and k != "total_flos"))
            for h in history if "loss" in h]


# stage: (entry, recipe, arguments, the session fixture holding the uninterrupted run of those arguments or
# None, the step whose end brings the signal). The uninterrupted SFT runs are the ones other tests read.
_PREEMPTED = {
    "sft": ("align.sft.train", "sft.yaml", SFT_ARGS, "sft_run", 2),
    "sft-nf4": ("align.sft.train", "sft.yaml", SFT_4BIT_ARGS, "sft_4bit", 1),
    "nca": ("align.kto_nca.nca", "nca.yaml", ("--max_steps", "3", "--logging_steps", "1"), None, 1),
    "kto": ("align.kto_nca.kto", "kto.yaml", ("--max_steps", "3", "--logging_steps", "1"), None, 1),
}


@pytest.mark.parametrize("stage", list(_PREEMPTED))
def test_a_preempted_lora_stage_saves_at_the_next_step_and_resumes_equal(stage, tmp_path, monkeypatch, request):
    """LoRA on attention, experts (the fused backend) and router, on 16-bit experts and on 4-bit (NF4) ones;
    NCA and KTO from the SFT adapter with its frozen reference copy: SIGUSR1 as step N ends saves
    checkpoint-N (no save step) and stops with 128 + 10; the rerun with resume_from_checkpoint: true ends
    equal to the uninterrupted run (the adapter bit for bit, the loss log entry for entry)."""
    import importlib

    from align import lifecycle

    entry, recipe, extra, baseline, step = _PREEMPTED[stage]
    main = importlib.import_module(entry).main
    if baseline is None:
        extra += ("--adapter_name_or_path", str(request.getfixturevalue("sft_output")))
        straight = tmp_path / "straight"
        main(stage_args(recipe, straight, *extra))
    else:
        straight = request.getfixturevalue(baseline)[0]

    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        _signal_at_step(patch, step)
        try:
            with pytest.raises(lifecycle.Interrupted) as stopped:
                main(stage_args(recipe, resumed, *extra))
        finally:
            lifecycle.reset()
    assert stopped.value.code == 128 + signal.SIGUSR1
    assert [p.name for p in resumed.glob("checkpoint-*")] == [f"checkpoint-{step}"]
    assert (resumed / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert not (resumed / "adapter_model.safetensors").exists()
    trainer = main(stage_args(recipe, resumed, *extra, "--resume_from_checkpoint", "true"))
    if stage == "sft-nf4":
        from align.moe.nf4 import is_nf4

        assert sum(is_nf4(p) for p in trainer.model.parameters()) == 4  # trained on the 4-bit experts indeed

    assert _adapter_history(resumed) == _adapter_history(straight)
    max_steps, logging_steps = int(extra[1]), int(extra[3])  # (every one of them: --max_steps N --logging_steps M)
    assert [dict(h)["step"] for h in _adapter_history(resumed)] == list(range(logging_steps, max_steps + 1, logging_steps))
    a = load_file(str(straight / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_whole_checkpoints_and_the_newest_one(tmp_path):
    from align.checkpoints import checkpoint_problem, newest_checkpoint

    def checkpoint(step, state=True, weights=("model.safetensors",), state_step=None):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name in weights:
            (folder / name).write_bytes(b"x")
        if state is True:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": state_step or step, "max_steps": 80}))
        elif state:
            (folder / "trainer_state.json").write_text(state)
        return folder

    assert newest_checkpoint(tmp_path) == (None, [])
    checkpoint(10)
    checkpoint(20, weights=("adapter_model.safetensors",))
    checkpoint(30, state='{"global_step": 3')  # cut off mid-write
    checkpoint(40, state=False)  # killed before its trainer_state.json
    checkpoint(50, weights=())
    checkpoint(60, state_step=59)
    index = checkpoint(70, weights=("model.safetensors.index.json", "model-00001-of-00002.safetensors"))
    (index / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    newest, skipped = newest_checkpoint(tmp_path)
    assert newest.name == "checkpoint-20"
    assert skipped == ["checkpoint-70 skipped: weight shard model-00002-of-00002.safetensors is missing",
                       "checkpoint-60 skipped: trainer_state.json is for step 59",
                       "checkpoint-50 skipped: no model weights",
                       "checkpoint-40 skipped: no trainer_state.json (cut off while being written)",
                       "checkpoint-30 skipped: trainer_state.json is cut off"]
    assert checkpoint_problem(tmp_path / "checkpoint-10") is None

    from align.training import _resume_value

    assert _resume_value("true", str(tmp_path)) == str(tmp_path / "checkpoint-20")
    assert _resume_value(None, str(tmp_path)) is None
    with pytest.raises(AlignError, match=r"checkpoint-40 is not a whole checkpoint \(no trainer_state.json"):
        _resume_value(str(tmp_path / "checkpoint-40"), str(tmp_path))
    with pytest.raises(AlignError, match="no whole checkpoint-\\* folder in .*empty"):
        _resume_value(True, str(tmp_path / "empty"))


def test_a_hub_layout_checkpoint_loads_through_the_conversion_mapping(tmp_path):
    """A full-model checkpoint in Mixtral's Hub layout (block_sparse_moe.experts.N.w1, as save_pretrained
    writes by default) loads into the model's fused experts and router in place, where a plain
    load_state_dict (the Trainer's) would load none of them."""
    from transformers import AutoModelForCausalLM

    from align.checkpoints import load_through_conversion
    from align.models import resolve_model_path

    base = resolve_model_path("tiny-mixtral")
    trained = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        for param in trained.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    trained.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert any(".block_sparse_moe.experts.0.w1." in k for k in f.keys())  # the Hub layout indeed

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.model.embed_tokens.weight.requires_grad_(False)
    own = {name: param for name, param in model.named_parameters()}
    result = model.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=False)
    assert "model.layers.0.mlp.experts.gate_up_proj" in result.missing_keys  # what the Trainer's load does
    load_through_conversion(model, tmp_path / "model.safetensors")
    for name, param in trained.state_dict().items():
        assert torch.equal(model.state_dict()[name], param), name
    assert all(param is own[name] for name, param in model.named_parameters())  # the optimizer's tensors
    assert not model.model.embed_tokens.weight.requires_grad


def test_sigterm_to_a_two_process_stage_saves_one_checkpoint_and_resumes_equal(tmp_path):
    """`align sft --accelerate_config multi_cpu` (DDP over gloo): SIGTERM to the command's main process
    reaches both workers, which save at the same step boundary; nothing is left running; the rerun with
    resume_from_checkpoint: true ends equal to the uninterrupted two-process run."""
    from align.progress import PROGRESS_ENV

    def command(out, *extra):
        return [sys.executable, "-m", "align", "sft", *stage_args("sft.yaml", out, "--max_steps", "4", "--logging_steps",
                "1", "--per_device_train_batch_size", "2", *extra), "--accelerate_config", "multi_cpu"]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "ALIGN_STOP_GRACE": "60"}
    straight = subprocess.run(command(tmp_path / "straight"), capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "resumed"
    progress = tmp_path / "progress.json"
    with open(tmp_path / "run.out", "wb") as log:
        proc = subprocess.Popen(command(out), stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                env={**env, PROGRESS_ENV: str(progress)})
    try:
        _wait_for(lambda: _steps_done(tmp_path) >= 1, proc, 300, "the first training step")
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert len(tree) >= 3  # accelerate (the elastic agent) and two workers
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        _kill_tree(proc)
    output = (tmp_path / "run.out").read_text()
    assert code == 128 + signal.SIGTERM, output[-3000:]
    assert _living(tree) == []
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and checkpoints[0] in ("checkpoint-1", "checkpoint-2", "checkpoint-3"), checkpoints
    assert output.count("saving checkpoint-") == 1  # said once (the main process), saved by both at one step

    rerun = subprocess.run(command(out, "--resume_from_checkpoint", "true"), capture_output=True, text=True, cwd=REPO,
                           env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"sft: resuming from {checkpoints[0]} of 4 steps" in rerun.stdout
    assert _adapter_history(out) == _adapter_history(tmp_path / "straight")
    a = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_folder_lock_refuses_a_live_holder_and_is_taken_over_from_a_dead_one(tmp_path):
    from align import lifecycle

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from align import lifecycle; "
                               f"lifecycle.lock_folder({str(tmp_path)!r}, 'align sft'); print('held', flush=True); "
                               "time.sleep(600)"], stdout=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(AlignError, match=rf"^{tmp_path}: being written by pid {holder.pid} \(align sft, since "
                                             rf"[0-9:]+\); wait for it to end, or stop it with kill {holder.pid}$"):
            lifecycle.lock_folder(tmp_path, "align run")
    finally:
        holder.kill()
        holder.wait()
    lifecycle.lock_folder(tmp_path, "align run")  # the dead holder's lock is gone with it
    try:
        assert json.loads((tmp_path / ".align.lock").read_text())["pid"] == os.getpid()
    finally:
        lifecycle.unlock_folder(tmp_path)


def test_a_signal_ignored_at_start_stays_ignored():
    """`nohup align run ...` (SIGHUP ignored) goes on when its terminal closes."""
    from align import lifecycle

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        lifecycle.install((signal.SIGHUP,))
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


def test_sigterm_to_a_trees_build_stops_its_sandboxes_and_the_rerun_finishes(tmp_path):
    """A stage command other than training: `align trees build` on math, code and logic problems (a code
    answer runs in the sandbox's own processes) stops with 128 + 15 and leaves no process; the rerun keeps
    its trees and builds the rest."""
    from test_pipeline import _Knower

    server, url = _Knower.start()
    recipe = tmp_path / "trees.yaml"
    recipe.write_text(f"problems: {REPO / 'data' / 'problems' / 'mixed_sample.jsonl'}\nmax_turns: 2\n"
                      "samples_per_turn: 2\nparallel_trees: 1\nprogress: false\n"
                      f"actor: {{backend: server, model: knower, base_urls: ['{url}']}}\n")
    cmd = [sys.executable, "-m", "align", "trees", "build", "--config", str(recipe), "--output_dir", str(tmp_path / "t")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "ALIGN_STOP_GRACE": "30"}
    trees = tmp_path / "t" / "trees.jsonl"
    try:
        with open(tmp_path / "run.out", "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
        try:
            tree = _wait_for(lambda: psutil.Process(proc.pid).children(recursive=True), proc, 300, "the sandbox",
                             poll=0.01)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=90)
        finally:
            _kill_tree(proc)
        output = (tmp_path / "run.out").read_text()
        assert code == 128 + signal.SIGTERM, output[-2000:]
        assert "[align] trees: stopped by SIGTERM; exit 143" in output
        assert _living(tree) == [], f"left running: {_living(tree)}"
        kept = trees.read_text().count("\n") if trees.exists() else 0
        rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
    finally:
        server.shutdown()
    total = trees.read_text().count("\n")
    assert kept < total and total == len((REPO / "data" / "problems" / "mixed_sample.jsonl").read_text().splitlines())
