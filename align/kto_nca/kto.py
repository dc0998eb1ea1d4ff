"""`align kto --config recipes/<model>/kto.yaml`: KTO on prompt/completion/label rows.

Preference pairs are accepted too: each pair becomes one desirable and one undesirable row.
"""

from __future__ import annotations


def main(argv: list[str]):
    from align.train.training import run_stage

    return run_stage("kto", argv)
