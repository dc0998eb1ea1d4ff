"""Supervised fine-tuning on multi-turn conversations, loss on assistant turns only."""
