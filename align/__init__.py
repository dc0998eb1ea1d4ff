"""moe-align: preference trees and SFT / DPO / KTO / NCA with LoRA on Mixture-of-Experts models."""

__version__ = "0.1.0"

from align.core.environment import guard_hub_kernels as _guard_hub_kernels

_guard_hub_kernels()  # no code from the Hub in a process that imports align, unless ALIGN_HUB_KERNELS=1
