"""`align dpo --config recipes/<model>/dpo.yaml`: DPO on prompt/chosen/rejected pairs."""

from __future__ import annotations


def main(argv: list[str]):
    from align.train.training import run_stage

    return run_stage("dpo", argv)
