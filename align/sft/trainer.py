"""TRL's SFTTrainer with router statistics in its logs."""

from trl import SFTTrainer

from align.checkpoints import CheckpointLayoutMixin
from align.moe.router_stats import RouterStatsMixin


class MoESFTTrainer(CheckpointLayoutMixin, RouterStatsMixin, SFTTrainer):
    """SFTTrainer that also logs per-layer expert load and router entropy."""
