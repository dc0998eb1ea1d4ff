"""`align <command>`: one entry point for every stage and tool. Heavy imports happen inside commands."""

from __future__ import annotations

import importlib
import sys

from align.core.environment import configure_logging
from align.core.errors import AlignError, exit_on_user_error
from align.stages import TRAINING_STAGES

# command -> (module[:function], help). Each target takes argv. Training stages come from the registry.
COMMANDS = {
    **{name: (stage.entry, stage.summary) for name, stage in TRAINING_STAGES.items()},
    "trees": ("align.trees.cli:trees_main", "build / export / stats / import preference trees"),
    "verify": ("align.trees.cli:verify_main", "verify responses against problems (JSON verdicts)"),
    "sandbox": ("align.trees.cli:sandbox_main", "run a Python file in the sandbox"),
    "upcycle": ("align.moe.upcycle:upcycle_main", "a dense Llama / Mistral model (folder, hub id, GGUF) -> a Mixtral-type MoE, exact at init"),
    "quantize": ("align.moe.quantize:main", "save a base with NF4 expert stacks (QLoRA for MoE), loadable as is"),
    "eval": ("align.evaluation.evaluate", "pass@1 (greedy) of models on held-out problems, plus plots"),
    "run": ("align.runner.pipeline", "run a pipeline recipe: trees -> sft -> dpo/kto/nca -> eval -> publish"),
    "publish": ("align.publishing.publish", "a Hub-ready folder with a model card; pushes unless --dry-run"),
}

def usage() -> str:
    lines = ["usage: align <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Training stages take --config RECIPE.yaml and --key value overrides; `align <command> --help`",
              "lists a command's options (for a stage: every recipe key, with its type, default and help)."]
    return "\n".join(lines)


@exit_on_user_error
def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise AlignError(f"unknown command '{command}' (commands: {', '.join(COMMANDS)}; see align --help)")
    configure_logging(command)
    from align.core import lifecycle

    lifecycle.die_with_parent()  # started by `align run` or a launcher: it does not outlive it
    lifecycle.install()  # SIGTERM / SIGINT / SIGHUP: stop what this command started, exit 128 + signal
    if command == "run" or "--accelerate_config" in rest or any(a.startswith("--accelerate_config=") for a in rest):
        lifecycle.become_supervisor()
    module_name, _, function = COMMANDS[command][0].partition(":")
    try:
        result = getattr(importlib.import_module(module_name), function or "main")(rest)
    except lifecycle.Interrupted as stop:
        lifecycle.stop_tree(None)  # whatever it started and did not stop on its way out
        print(f"[align] {command}: {stop}; exit {stop.code}", file=sys.stderr, flush=True)
        return stop.code
    return result if isinstance(result, int) else 0
