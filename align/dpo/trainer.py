"""TRL's DPOTrainer with router statistics in its logs (also serves NCA through `loss_type: nca_pair`)."""

from trl import DPOTrainer

from align.train.checkpoints import CheckpointMixin
from align.moe.router_stats import RouterStatsMixin


class MoEDPOTrainer(CheckpointMixin, RouterStatsMixin, DPOTrainer):
    """DPOTrainer that also logs per-layer expert load and router entropy."""
