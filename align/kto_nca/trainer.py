"""TRL's KTOTrainer with router statistics in its logs."""

from trl import KTOTrainer

from align.checkpoints import CheckpointLayoutMixin
from align.moe.router_stats import RouterStatsMixin


class MoEKTOTrainer(CheckpointLayoutMixin, RouterStatsMixin, KTOTrainer):
    """KTOTrainer that also logs per-layer expert load and router entropy."""
