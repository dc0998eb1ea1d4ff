"""Running a training stage under `accelerate launch`: the command line, and `align STAGE --accelerate_config`.

`align sft --config R.yaml --accelerate_config zero3` (as `trl sft --accelerate_config zero3`) checks the
recipe, its data and the accelerate config here, in one process (a sharded config on a machine without a
GPU too), then starts `accelerate launch --config_file recipes/accelerate/zero3.yaml -m align sft --config
R.yaml` through `accelerate_main`: accelerate's own launcher, whose failure report (torch's 40-line
ChildFailedError, or a CalledProcessError traceback) becomes one line naming the process and its exit code,
under the error that process printed.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from align.core.errors import AlignError

PACKAGE_RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "accelerate"


def check_sharding(sharding: str | None, source: str) -> bool:
    """FSDP or DeepSpeed on a machine without a GPU is refused (accelerate would run it as plain DDP), unless
    ALIGN_CPU_FSDP asks for FSDP over gloo on the CPUs: then True (the caller shards on the CPUs)."""
    from align.train import cpu_fsdp

    if sharding == "FSDP" and cpu_fsdp.requested():
        return True
    if sharding and not __import__("torch").cuda.is_available():
        raise AlignError(f"{source}: the accelerate config asks for {sharding}, which needs GPUs (accelerate runs "
                         "it as plain DDP on a CPU); on a CPU machine launch with recipes/accelerate/multi_cpu.yaml")
    return False


def accelerate_command(stage: str, config_file: str | None, stage_argv: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file:
        cmd += ["--config_file", str(config_file)]
    return cmd + ["-m", "align", stage, *stage_argv]


def accelerate_main(argv: list[str]) -> int:
    """`accelerate launch ARGV` as accelerate runs it, whose failure is one line instead of the launcher's
    traceback and report: the failed process has printed its own error (a user error once, by the main
    process: align/core/errors.py), so the launcher adds which process it was and how it ended."""
    import logging

    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # torch's elastic agent logs a line per stopped process before its report; the line below says it
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        how = (f"was stopped by {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with code {failure.exitcode}; its error is above")  # a signal leaves no error line
        others = " (the others were stopped)" if len(err.failures) > 1 else ""
        print(f"align: accelerate launch: process {rank} {how}{others}", file=sys.stderr, flush=True)
        return failure.exitcode if failure.exitcode > 0 else 1
    except subprocess.CalledProcessError as err:  # one process (accelerate's simple launcher)
        print(f"align: accelerate launch: the process exited with code {err.returncode} (its error is above)",
              file=sys.stderr, flush=True)
        return err.returncode if err.returncode > 0 else 1
    return 0


def resolve_accelerate_config(value: str) -> Path:
    """A file, or the name of one of recipes/accelerate/*.yaml (single_gpu, multi_gpu, zero3, fsdp2, cpu)."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    for folder in (Path("recipes") / "accelerate", PACKAGE_RECIPES):
        candidate = folder / f"{value}.yaml"
        if candidate.is_file():
            return candidate
    names = sorted(p.stem for p in PACKAGE_RECIPES.glob("*.yaml")) if PACKAGE_RECIPES.is_dir() else []
    raise AlignError(f"command line: --accelerate_config {value}: no such file or config name"
                     + (f" (names: {', '.join(names)})" if names else ""))


def split_accelerate_config(argv: list[str]) -> tuple[str, list[str]]:
    rest, value = [], None
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--accelerate_config":
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise AlignError("command line: --accelerate_config needs a config name or file")
            value, i = argv[i + 1], i + 2
            continue
        if token.startswith("--accelerate_config="):
            value = token.split("=", 1)[1]
        else:
            rest.append(token)
        i += 1
    return value, rest


def relaunch_under_accelerate(stage: str, argv: list[str], prepare) -> int:
    """`prepare(stage, argv, preflight=False)` checks the recipe and loads its data (the training stage's
    `prepare_stage`, passed in: this module stands below align/train/training.py and imports none of it)."""
    from align.train.extras import check_accelerate_config

    value, rest = split_accelerate_config(argv)
    config_file = resolve_accelerate_config(value)
    config = check_accelerate_config(config_file)
    sharding = {"FSDP": "FSDP", "DEEPSPEED": "DeepSpeed"}.get(str(config.get("distributed_type", "NO")))
    check_sharding(sharding, str(config_file))  # refused here, before any process starts, not once per process
    from align.core import lifecycle
    from align.core.leaks import mask_argv

    # the recipe and its data, here: a bad key costs seconds, not a launch (and the output folder is locked)
    args = prepare(stage, rest, preflight=False)[2]
    cmd = accelerate_command(stage, str(config_file), rest)
    print(f"[align] {stage}: launching accelerate launch {shlex.join(mask_argv(cmd[3:]))}", flush=True)
    try:  # a stop signal reaches the workers (accelerate would kill them 5 s after one), then what is left
        return lifecycle.supervise([sys.executable, "-m", "align.train.launch", *cmd[3:]], spare_launcher=True)
    finally:
        lifecycle.unlock_folder(args.output_dir)


if __name__ == "__main__":  # python -m align.train.launch ACCELERATE-LAUNCH-ARGS (what relaunch_under_accelerate runs)
    raise SystemExit(accelerate_main(sys.argv[1:]))
