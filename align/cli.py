"""`align <command>`: one entry point for every stage and tool. Heavy imports happen inside commands."""

from __future__ import annotations

import importlib
import logging
import os
import sys

from align.errors import exit_on_user_error

# command -> (module, help). Each module has `main(argv)`.
COMMANDS = {
    "sft": ("align.sft.train", "supervised fine-tuning (assistant turns only)"),
    "dpo": ("align.dpo.train", "DPO from an SFT adapter"),
    "kto": ("align.kto_nca.kto", "KTO from an SFT adapter"),
    "nca": ("align.kto_nca.nca", "NCA (pairwise) from an SFT adapter"),
    "trees": ("align.trees.cli:trees_main", "build / export / stats / import preference trees"),
    "verify": ("align.trees.cli:verify_main", "verify responses against problems (JSON verdicts)"),
    "sandbox": ("align.trees.cli:sandbox_main", "run a Python file in the sandbox"),
    "quantize": ("align.moe.nf4:quantize_main", "save a base with NF4 expert stacks (QLoRA for MoE), loadable as is"),
    "eval": ("align.evaluate", "pass@1 (greedy) of models on held-out problems, plus plots"),
    "run": ("align.pipeline", "run a pipeline recipe: trees -> sft -> dpo/kto/nca -> eval -> publish"),
    "publish": ("align.publish", "a Hub-ready folder with a model card; pushes unless --dry-run"),
}


def usage() -> str:
    lines = ["usage: align <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Training stages take --config RECIPE.yaml and --key value overrides."]
    return "\n".join(lines)


@exit_on_user_error
def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"align: error: unknown command '{command}'\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    logging.basicConfig(level=os.environ.get("ALIGN_LOG_LEVEL", "INFO"), format="[align] %(message)s")
    module_name, _, function = COMMANDS[command][0].partition(":")
    result = getattr(importlib.import_module(module_name), function or "main")(rest)
    return result if isinstance(result, int) else 0
