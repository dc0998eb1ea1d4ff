"""Per-layer expert load and router entropy, logged with the trainer's own metrics.

Expert collapse (one expert taking most tokens, or entropy falling toward zero) is the MoE failure mode
that a loss curve hides; logging the routing next to the loss makes it visible in trackio/tensorboard/wandb.

The counts stay on the device where the router runs (no host sync per layer and step); padding tokens
are left out (the attention mask of each training forward is read by a hook on the model); and at each
logging step the counts of every process are summed with one all-reduce, then moved to the host once.
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
        self._sums: list[torch.Tensor | None] = []  # per layer: [E counts..., entropy sum, tokens] on the device
        self._mask: torch.Tensor | None = None  # the current training forward's non-padding tokens, flattened
        self._handles.append(model.register_forward_pre_hook(self._read_mask, with_kwargs=True))
        for i, (_, block) in enumerate(find_moe_blocks(model)):
            gate = block.gate
            base = gate.get_base_layer() if hasattr(gate, "get_base_layer") else gate
            num_experts = getattr(base, "num_experts", None) or base.weight.shape[0]
            top_k = getattr(base, "top_k", None) or getattr(block, "top_k", 2)
            self.layers.append((i, num_experts))
            self._sums.append(None)
            self._handles.append(base.register_forward_hook(self._make_hook(i, num_experts, top_k)))

    def _read_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self._mask = mask.reshape(-1).bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _make_hook(self, slot: int, num_experts: int, top_k: int):
        def hook(module, args, output):
            if not torch.is_grad_enabled():
                return
            with torch.no_grad():
                logits = output[0] if isinstance(output, tuple) else output
                logits = logits.reshape(-1, num_experts).float()
                indices = output[-1] if isinstance(output, tuple) and not output[-1].is_floating_point() else None
                indices = logits.topk(top_k, dim=-1).indices if indices is None else indices.reshape(logits.shape[0], -1)
                mask = self._mask
                if mask is not None and mask.numel() == logits.shape[0]:
                    mask = mask.to(logits.device)
                    logits, indices = logits[mask], indices[mask]
                probs = logits.softmax(-1)
                entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
                counts = torch.zeros(num_experts + 2, dtype=torch.float64, device=logits.device)
                counts[:num_experts] = torch.bincount(indices.reshape(-1), minlength=num_experts)[:num_experts].double()
                counts[num_experts] = entropy.double()
                counts[num_experts + 1] = logits.shape[0]
                self._sums[slot] = counts if self._sums[slot] is None else self._sums[slot] + counts

        return hook

    def snapshot(self, reset: bool = True, reduce: bool = True) -> dict[str, float]:
        """Metrics since the last snapshot: `router/layer_{i}/expert_{e}` load fractions and entropy, summed
        over every process (one all-reduce, one host transfer). Every process must call it together."""
        import torch.distributed as dist

        if not self.layers:
            return {}
        device = next((s.device for s in self._sums if s is not None), torch.device("cpu"))
        width = max(e for _, e in self.layers) + 2
        table = torch.zeros(len(self.layers), width, dtype=torch.float64, device=device)
        for slot, (_, num_experts) in enumerate(self.layers):
            if self._sums[slot] is not None:
                table[slot, :num_experts] = self._sums[slot][:num_experts].to(device)
                table[slot, -2:] = self._sums[slot][num_experts:].to(device)
        if reduce and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(table)
        table = table.cpu()
        out: dict[str, float] = {}
        max_load, min_entropy = 0.0, float("inf")
        for slot, (layer, num_experts) in enumerate(self.layers):
            total = float(table[slot, :num_experts].sum())
            if total == 0:
                continue
            loads = (table[slot, :num_experts] / total).tolist()
            for e, frac in enumerate(loads):
                out[f"router/layer_{layer}/expert_{e}"] = round(frac, 5)
            entropy = float(table[slot, -2]) / max(float(table[slot, -1]), 1.0)
            out[f"router/layer_{layer}/entropy"] = round(entropy, 5)
            max_load = max(max_load, max(loads))
            min_entropy = min(min_entropy, entropy)
        if out:
            out["router/max_expert_load"] = round(max_load, 5)
            out["router/min_entropy"] = round(min_entropy, 5)
        if reset:
            self._sums = [None] * len(self.layers)
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
        if stats is not None and "loss" in logs:  # training log lines, which every process logs together
            logs = {**logs, **stats.snapshot()}
        super().log(logs, *args, **kwargs)
