"""`align sft --config recipes/<model>/sft.yaml`: SFT with LoRA on attention, experts and router."""

from __future__ import annotations

from align.core.errors import AlignError


def check(model_args, data_args, args) -> None:
    if not args.assistant_only_loss and not args.completion_only_loss:
        raise AlignError("recipe: set assistant_only_loss: true (multi-turn SFT trains on assistant turns only)")


def main(argv: list[str]):
    from align.train.training import run_stage

    return run_stage("sft", argv)
