"""Per-layer expert load and router entropy, logged with the trainer's own metrics.

Expert collapse (one expert taking most tokens, or entropy falling toward zero) is the MoE failure mode
that a loss curve hides; logging the routing next to the loss makes it visible in trackio/tensorboard/wandb.
"""

from __future__ import annotations

import torch
from torch import nn

from align.moe.lora import find_moe_blocks


class RouterStats:
    """Forward hooks on every router that count top-k assignments and sum the routing entropy.

    Only forwards that build a graph are counted (training forwards), so reference-model and
    evaluation passes do not dilute the picture. Recomputed forwards under gradient checkpointing
    count the same tokens twice, which leaves the fractions unchanged.
    """

    def __init__(self, model: nn.Module):
        self.layers: list[tuple[int, int]] = []  # (layer index, num_experts)
        self._handles = []
        self._counts: list[torch.Tensor] = []
        self._entropy_sum: list[float] = []
        self._tokens: list[int] = []
        for i, (_, block) in enumerate(find_moe_blocks(model)):
            gate = block.gate
            base = gate.get_base_layer() if hasattr(gate, "get_base_layer") else gate
            num_experts = getattr(base, "num_experts", None) or base.weight.shape[0]
            top_k = getattr(base, "top_k", None) or getattr(block, "top_k", 2)
            self.layers.append((i, num_experts))
            self._counts.append(torch.zeros(num_experts, dtype=torch.float64))
            self._entropy_sum.append(0.0)
            self._tokens.append(0)
            self._handles.append(base.register_forward_hook(self._make_hook(i, num_experts, top_k)))

    def _make_hook(self, slot: int, num_experts: int, top_k: int):
        def hook(module, args, output):
            if not torch.is_grad_enabled():
                return
            with torch.no_grad():
                logits = output[0] if isinstance(output, tuple) else output
                logits = logits.reshape(-1, num_experts).float()
                indices = None
                if isinstance(output, tuple) and not output[-1].is_floating_point():
                    indices = output[-1]
                if indices is None:
                    indices = logits.topk(top_k, dim=-1).indices
                probs = logits.softmax(-1)
                entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
                self._counts[slot] += torch.bincount(indices.reshape(-1).cpu(), minlength=num_experts).double()
                self._entropy_sum[slot] += float(entropy.sum())
                self._tokens[slot] += logits.shape[0]

        return hook

    def snapshot(self, reset: bool = True) -> dict[str, float]:
        """Metrics since the last snapshot: `router/layer_{i}/expert_{e}` load fractions and entropy."""
        out: dict[str, float] = {}
        max_load, min_entropy = 0.0, float("inf")
        for slot, (layer, num_experts) in enumerate(self.layers):
            total = float(self._counts[slot].sum())
            if total == 0:
                continue
            loads = (self._counts[slot] / total).tolist()
            for e, frac in enumerate(loads):
                out[f"router/layer_{layer}/expert_{e}"] = round(frac, 5)
            entropy = self._entropy_sum[slot] / max(self._tokens[slot], 1)
            out[f"router/layer_{layer}/entropy"] = round(entropy, 5)
            max_load = max(max_load, max(loads))
            min_entropy = min(min_entropy, entropy)
        if out:
            out["router/max_expert_load"] = round(max_load, 5)
            out["router/min_entropy"] = round(min_entropy, 5)
        if reset:
            for slot in range(len(self.layers)):
                self._counts[slot].zero_()
                self._entropy_sum[slot] = 0.0
                self._tokens[slot] = 0
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class RouterStatsMixin:
    """Adds router statistics to every training log line of a transformers/TRL trainer.

    Mixed in before the TRL trainer class so the statistics land in `state.log_history` (and so in
    trainer_state.json and the plots), not only in the callbacks' view of the logs.
    """

    def enable_router_stats(self) -> None:
        self._router_stats = RouterStats(self.model)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        stats = getattr(self, "_router_stats", None)
        if stats is not None and "loss" in logs:  # training log lines only
            logs = {**logs, **stats.snapshot()}
        super().log(logs, *args, **kwargs)
