"""TRL's KTOTrainer with router statistics in its logs."""

from trl import KTOTrainer

from align.train.checkpoints import CheckpointMixin
from align.moe.router_stats import RouterStatsMixin


class MoEKTOTrainer(CheckpointMixin, RouterStatsMixin, KTOTrainer):
    """KTOTrainer that also logs per-layer expert load and router entropy."""
