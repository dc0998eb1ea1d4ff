"""Running a training stage under `accelerate launch`: the command line, and `align STAGE --accelerate_config`.

`align sft --config R.yaml --accelerate_config zero3` (as `trl sft --accelerate_config zero3`) checks the
recipe, its data and the accelerate config here, in one process, then starts
`accelerate launch --config_file recipes/accelerate/zero3.yaml -m align sft --config R.yaml`.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from align.errors import AlignError

PACKAGE_RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "accelerate"


def accelerate_command(stage: str, config_file: str | None, stage_argv: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file:
        cmd += ["--config_file", str(config_file)]
    return cmd + ["-m", "align", stage, *stage_argv]


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


def relaunch_under_accelerate(stage: str, argv: list[str]) -> int:
    from align.extras import check_accelerate_config
    from align.training import prepare_stage

    value, rest = split_accelerate_config(argv)
    config_file = resolve_accelerate_config(value)
    check_accelerate_config(config_file)
    from align import lifecycle

    # the recipe and its data, here: a bad key costs seconds, not a launch (and the output folder is locked)
    args = prepare_stage(stage, rest, preflight=False)[2]
    cmd = accelerate_command(stage, str(config_file), rest)
    print(f"[align] {stage}: launching accelerate launch {shlex.join(cmd[3:])}", flush=True)
    try:  # a stop signal reaches the workers (accelerate would kill them 5 s after one), then what is left
        return lifecycle.supervise(cmd, spare_launcher=True)
    finally:
        lifecycle.unlock_folder(args.output_dir)
