"""moe-align: preference trees and SFT / DPO / KTO / NCA with LoRA on Mixture-of-Experts models."""

__version__ = "0.1.0"
