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

from align.core.errors import AlignError
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


def _popen(cmd: list[str], tmp_path: Path, env: dict) -> subprocess.Popen:
    """`cmd` in a session of its own (only it gets the test's signals), its output into tmp_path/run.out."""
    with open(tmp_path / "run.out", "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)


def _start(path: Path, tmp_path: Path, grace: int = 60) -> subprocess.Popen:
    env = {**os.environ, "ALIGN_STOP_GRACE": str(grace), "PYTHONPATH": str(REPO)}
    return _popen([sys.executable, "-m", "align", "run", str(path)], tmp_path, env)


def _sigterm_when(proc: subprocess.Popen, tmp_path: Path, ready, what: str, meanwhile=None, poll: float = 0.05,
                  timeout: float = 120):
    """Once `ready()` holds: SIGTERM to the main process only (what a scheduler or `kill PID` sends), after
    `meanwhile(tree)`. Returns (its exit status, its output, seconds from the signal to its end, the tree of
    processes it had: ready()'s value when a list of them, else its descendants then)."""
    try:
        value = _wait_for(ready, proc, 300, what, poll)
        tree = value if isinstance(value, list) else psutil.Process(proc.pid).children(recursive=True)
        if meanwhile is not None:
            meanwhile(tree)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=timeout)
        took = time.monotonic() - start
    finally:
        _kill_tree(proc)
    return code, (tmp_path / "run.out").read_text(), took, tree


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

    def second_writers(tree):
        assert len(tree) >= 2  # accelerate launch, and the `align sft` worker under it
        # One writer per stage folder: a second run, and the stage command itself, are refused naming the run.
        from align.runner.pipeline import main

        with pytest.raises(AlignError, match=rf"out/boot: being written by pid {proc.pid} \(align run"):
            main([str(path)])
        from align.sft.train import main as sft

        with pytest.raises(AlignError, match=rf"being written by pid {proc.pid}"):
            sft(["--config", str(boot / "recipe.yaml")])

    code, output, took, tree = _sigterm_when(proc, tmp_path, lambda: _steps_done(boot) >= 1, "the first training step",
                                             second_writers)
    assert code == 128 + signal.SIGTERM, output[-2000:]
    assert took < 60 + 10  # within the grace period
    assert _living(tree) == [], f"still running: {_living(tree)}"
    record = json.loads((boot / "stage.json").read_text())
    assert record["status"] == "interrupted" and record["signal"] == "SIGTERM"
    assert "boot interrupted (SIGTERM)" in output and "| boot | INTERRUPTED |" in output
    # The worker saved a checkpoint at the next step boundary (save_strategy: "no" notwithstanding), whole.
    from align.train.checkpoints import newest_checkpoint

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
    from align.train.checkpoints import newest_checkpoint
    from align.runner.pipeline import main

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
    # the killed attempt's log is kept, above the rerun's under a header naming the attempt and what it does
    from align.runner.pipeline import LOG_ATTEMPT

    first, second = log.split(f"\n{LOG_ATTEMPT}2, ")
    assert first.startswith(f"{LOG_ATTEMPT}1, ") and first.splitlines()[0].endswith(": the first =====")
    assert "\n$ " in first and "[align] sft: trainable parameters" in first  # attempt 1's command and output
    assert second.splitlines()[0].endswith(f": the last one ended without a word (killed); resuming from "
                                           f"checkpoint-{step} of 4 steps =====")
    assert record["attempt"] == 2
    # equal to the uninterrupted run: every weight, and the loss log step by step
    assert _history(boot) == _history(straight / "out" / "boot")
    assert [s for s, *_ in _history(boot)] == [1, 2, 3, 4]
    _assert_same_weights(boot, straight / "out" / "boot")


def test_a_stage_log_keeps_every_attempt_through_force_and_a_changed_config(tmp_path, capsys):
    """log.txt is appended to, each attempt under its header line, also when --force or a changed config
    empties the rest of the stage folder."""
    from align.runner.pipeline import LOG_ATTEMPT, main

    def pipeline(seed):
        path = tmp_path / "pipeline.yaml"
        path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "stages": [
            {"name": "data", "kind": "data", "generator": "addition-sft", "n": 4, "seed": seed, "digits": [1]}]}))
        return str(path)

    data = tmp_path / "out" / "data"
    assert main([pipeline(1)]) == 0
    (data / "log.txt").write_text((data / "log.txt").read_text() + "a last line cut off by a ki")
    assert main([pipeline(1), "--force"]) == 0
    assert main([pipeline(2)]) == 0
    assert main([pipeline(2)]) == 0  # unchanged: skipped, nothing appended
    headers = [line for line in (data / "log.txt").read_text().splitlines() if line.startswith(LOG_ATTEMPT)]
    assert [h.split(",")[0] for h in headers] == [f"{LOG_ATTEMPT}{n}" for n in (1, 2, 3)]
    assert headers[1].endswith(": the last one done; restarted from nothing (--force) =====")
    assert headers[2].endswith(": the last one done; restarted from nothing (its config or inputs changed) =====")
    assert "a last line cut off by a ki\n\n" + LOG_ATTEMPT + "2, " in (data / "log.txt").read_text()
    assert json.loads((data / "stage.json").read_text())["attempt"] == 3


def _signal_at_step(monkeypatch, step: int, signum=signal.SIGUSR1):
    """The stage gets `signum` (Slurm's SIGUSR1 before a time limit) as training step `step` ends."""
    import align.train.training as training

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
_PREFERENCE_ARGS = ("--max_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "2")
_PREEMPTED = {
    "sft": ("align.sft.train", "sft.yaml", SFT_ARGS, "sft_run", 2),
    "sft-nf4": ("align.sft.train", "sft.yaml", SFT_4BIT_ARGS, "sft_4bit", 1),
    "nca": ("align.kto_nca.nca", "nca.yaml", _PREFERENCE_ARGS, None, 1),
    "kto": ("align.kto_nca.kto", "kto.yaml", _PREFERENCE_ARGS, None, 1),
    "dpo": ("align.dpo.train", "dpo.yaml", _PREFERENCE_ARGS, None, 1),
}


@pytest.mark.parametrize("stage", list(_PREEMPTED))
def test_a_preempted_lora_stage_saves_at_the_next_step_and_resumes_equal(stage, tmp_path, monkeypatch, request):
    """LoRA on attention, experts (the fused backend) and router, on 16-bit experts and on 4-bit (NF4) ones;
    NCA and KTO from the SFT adapter with its frozen reference copy: SIGUSR1 as step N ends saves
    checkpoint-N (no save step) and stops with 128 + 10; the rerun with resume_from_checkpoint: true ends
    equal to the uninterrupted run (the adapter bit for bit, the loss log entry for entry)."""
    import importlib

    from align.core import lifecycle

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
    from align.train.checkpoints import checkpoint_problem, newest_checkpoint

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

    from align.train.training import _resume_value

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

    from align.train.checkpoints import load_through_conversion
    from align.train.models import resolve_model_path

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
    from align.core.progress import PROGRESS_ENV

    from align.train.launch import accelerate_command, resolve_accelerate_config

    def stage(out, *extra):
        return stage_args("sft.yaml", out, "--max_steps", "3", "--logging_steps", "1", "--per_device_train_batch_size",
                          "2", *extra)

    def command(out, *extra):
        return [sys.executable, "-m", "align", "sft", *stage(out, *extra), "--accelerate_config", "multi_cpu"]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "ALIGN_STOP_GRACE": "60"}
    # the uninterrupted run: the same launch of the same workers, without `align sft`'s own checks around it
    launch = accelerate_command("sft", str(resolve_accelerate_config("multi_cpu")), stage(tmp_path / "straight"))
    straight = subprocess.run([sys.executable, "-m", "align.train.launch", *launch[3:]], capture_output=True, text=True,
                              cwd=REPO, env=env, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "resumed"
    progress = tmp_path / "progress.json"
    proc = _popen(command(out), tmp_path, {**env, PROGRESS_ENV: str(progress)})
    code, output, _, tree = _sigterm_when(proc, tmp_path, lambda: _steps_done(tmp_path) >= 1, "the first training step")
    assert len(tree) >= 3  # accelerate (the elastic agent) and two workers
    assert code == 128 + signal.SIGTERM, output[-3000:]
    assert _living(tree) == []
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and checkpoints[0] in ("checkpoint-1", "checkpoint-2"), checkpoints  # before the end
    assert output.count("saving checkpoint-") == 1  # said once (the main process), saved by both at one step

    rerun = subprocess.run(command(out, "--resume_from_checkpoint", "true"), capture_output=True, text=True, cwd=REPO,
                           env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"sft: resuming from {checkpoints[0]} of 3 steps" in rerun.stdout
    assert _adapter_history(out) == _adapter_history(tmp_path / "straight")
    a = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_folder_lock_refuses_a_live_holder_and_is_taken_over_from_a_dead_one(tmp_path):
    from align.core import lifecycle

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from align.core import lifecycle; "
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
    from align.core import lifecycle

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
        proc = _popen(cmd, tmp_path, env)
        code, output, _, tree = _sigterm_when(proc, tmp_path, lambda: psutil.Process(proc.pid).children(recursive=True),
                                              "the sandbox", poll=0.01, timeout=90)
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


def test_an_interrupted_eval_keeps_the_finished_models_and_evaluates_the_rest(tmp_path, monkeypatch, capsys):
    """`align eval` stopped while its third model decodes keeps the first two models' results (each written
    whole, atomically, after its answers) and on the rerun evaluates only the third; a cut-off write is
    removed, an unreadable result redone, and a change to what a model's results depend on (a result
    setting, the problems, the model's files) redoes that model, where other settings keep it."""
    from align.core import lifecycle
    from align.evaluation.evaluate import main as eval_main
    from align.evaluation.evaluate import run_eval

    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"id": f"p{a}", "task": "math", "prompt": f"What is {a}+1",
                                            "answer": str(a + 1)}) + "\n" for a in range(3)))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"one")
    calls, stop = [], {"at": None}

    class Scripted:  # model a answers every problem right, b none, c the first only
        def __init__(self, m):
            self.name = m["model"]

        def generate_batch(self, requests):
            calls.append(self.name)
            if self.name == stop["at"]:
                raise lifecycle.Interrupted(signal.SIGTERM)  # what the stop signal's handler raises there
            out = []
            for chat, n, _ in requests:
                a = int(chat[0]["content"].rsplit(" ", 1)[-1].split("+")[0])
                right = self.name == "a" or (self.name == "c" and a == 0)
                out.append([f"\\boxed{{{a + 1 if right else a}}}"] * n)
            return out

    monkeypatch.setattr("align.evaluation.evaluate.make_eval_backend", lambda m, max_new_tokens: Scripted(m))
    monkeypatch.setattr("align.evaluation.evaluate.check_eval_models", lambda *a, **k: None)  # scripted models, no folders
    spec = {"problems": str(problems), "max_new_tokens": 16, "run_name": "first",
            "models": {"a": {"model": "a"}, "b": {"model": "b", "adapter": str(adapter)}, "c": {"model": "c"}}}
    out = tmp_path / "out"

    def rerun(**changes):
        calls.clear()
        capsys.readouterr()
        results = run_eval({**spec, **changes}, out)
        return results, capsys.readouterr().out

    straight = run_eval(spec, tmp_path / "straight")
    stop["at"] = "c"
    with pytest.raises(lifecycle.Interrupted):
        run_eval(spec, out)
    stop["at"] = None
    assert sorted(p.name for p in out.iterdir()) == [".align.lock", "answers_a.jsonl", "answers_b.jsonl",
                                                     "results_a.json", "results_b.json"]
    (out / ".answers_c.jsonl.999.tmp").write_text('{"problem_id": "p0", "resp')  # a write cut off by a kill

    results, said = rerun()
    assert calls == ["c"] and results == straight
    assert "eval: a: kept from an earlier run (results_a.json)" in said and "eval: b: kept" in said
    assert not list(out.glob(".*.tmp"))
    for name in "abc":
        assert (out / f"answers_{name}.jsonl").read_text() == (tmp_path / "straight" / f"answers_{name}.jsonl").read_text()
    assert json.loads((out / "results.json").read_text()) == json.loads((tmp_path / "straight" / "results.json").read_text())

    text = (out / "results_b.json").read_text()
    (out / "results_b.json").write_text(text[: len(text) // 2])  # unreadable (a disk that lost its end)
    results, said = rerun()
    assert calls == ["b"] and results == straight and "eval: b: evaluated again (results_b.json is unreadable)" in said

    assert rerun(run_name="second", runs={}, report_to=[])[0] == straight and calls == []  # no result of theirs
    for change in ({"max_new_tokens": 32}, {"batch_size": 2}, {"turns": 2}):
        rerun(**change)
        assert set(calls) == {"a", "b", "c"}, change  # every model evaluated again
    rerun()  # back to the first settings: all three again
    (adapter / "adapter_model.safetensors").write_bytes(b"two")  # b's adapter retrained in place
    results, said = rerun()
    assert calls == ["b"] and "eval: b: evaluated again (its problems, settings or model changed)" in said
    problems.write_text(problems.read_text().replace('"answer": "1"', '"answer": "7"'))  # a ground truth fixed
    results, _ = rerun()
    assert sorted(calls) == ["a", "b", "c"] and results["models"]["a"]["pass@1"] == round(2 / 3, 4)

    calls.clear()
    spec_file = tmp_path / "eval.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    assert eval_main(["--config", str(spec_file), "--output", str(out), "--force"]) == 0
    assert sorted(calls) == ["a", "b", "c"]
