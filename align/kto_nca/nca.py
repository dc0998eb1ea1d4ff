"""`align nca --config recipes/<model>/nca.yaml`: pairwise NCA (DPOTrainer with `loss_type: nca_pair`)."""

from __future__ import annotations

from align.core.errors import AlignError


def check(model_args, data_args, args) -> None:
    if list(args.loss_type) != ["nca_pair"]:
        raise AlignError(f"recipe: key 'loss_type' must be nca_pair for the nca stage, got {args.loss_type}")


def main(argv: list[str]):
    from align.train.training import run_stage

    return run_stage("nca", argv)
