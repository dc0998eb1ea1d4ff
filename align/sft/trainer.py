"""TRL's SFTTrainer with router statistics in its logs."""

from trl import SFTTrainer

from align.train.checkpoints import CheckpointMixin
from align.moe.router_stats import RouterStatsMixin


class MoESFTTrainer(CheckpointMixin, RouterStatsMixin, SFTTrainer):
    """SFTTrainer that also logs per-layer expert load and router entropy."""
