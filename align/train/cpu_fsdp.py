"""FSDP2 across CPU processes (gloo), to check sharded training on a machine without GPUs.

accelerate runs an FSDP accelerate config as plain DDP when its processes have no GPU (its state knows
FSDP only for accelerator devices), although PyTorch's FSDP2 itself shards over gloo on CPUs. With
`ALIGN_CPU_FSDP=1` in the environment of such a launch, a training stage shards as it would on GPUs:
each process keeps its shard of every wrapped decoder layer, the layer is gathered for its forward and
backward, gradients are reduce-scattered, and saving gathers the full state. It is slow and is meant for
tests and debugging (the FSDP2 equality test runs it), not for training.
"""

from __future__ import annotations

import os

ENV = "ALIGN_CPU_FSDP"


def requested() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes")


def enable() -> None:
    """Make accelerate's state FSDP where it would fall back to MULTI_CPU with an FSDP plugin at hand."""
    from accelerate.state import AcceleratorState, DistributedType, PartialState

    if getattr(AcceleratorState, "_align_cpu_fsdp", False):
        return
    original = AcceleratorState.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type  # as accelerate's own init does

    AcceleratorState.__init__ = __init__
    AcceleratorState._align_cpu_fsdp = True
