"""`align dpo --config recipes/<model>/dpo.yaml`: DPO on prompt/chosen/rejected pairs."""

from __future__ import annotations


def main(argv: list[str]):
    from trl import DPOConfig

    from align.dpo.trainer import MoEDPOTrainer
    from align.training import run_stage

    return run_stage("dpo", DPOConfig, MoEDPOTrainer, argv)
