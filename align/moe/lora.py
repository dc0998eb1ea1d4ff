"""Where LoRA goes on a fused-expert MoE model, and what it trains.

transformers 5.x stores each layer's experts as two 3-D parameters (`gate_up_proj` [E, 2I, H] and
`down_proj` [E, H, I]) and the router as a bare parameter (`MixtralTopKRouter.weight`), so neither is an
`nn.Linear` that PEFT's `target_modules` can find; both are reached through `target_parameters`.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from align.errors import AlignError

EXPERT_PARAMS = ("gate_up_proj", "down_proj")
PARAM_GROUPS = ("attention", "experts", "router", "other")


def find_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of every sparse-MoE block with fused 3-D experts and a router under `gate`."""
    blocks = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        gate = getattr(module, "gate", None)
        if experts is None or gate is None:
            continue
        base_experts = experts.get_base_layer() if hasattr(experts, "get_base_layer") else experts
        if all(getattr(base_experts, p, None) is not None and getattr(base_experts, p).dim() == 3 for p in EXPERT_PARAMS):
            blocks.append((name, module))
    return blocks


def check_adaptable(model: nn.Module, want_experts: bool, want_router: bool) -> None:
    """Fail early, naming the model class, when expert or router LoRA is asked of a model that can't take it."""
    if not (want_experts or want_router):
        return
    blocks = find_moe_blocks(model)
    if not blocks:
        raise AlignError(
            f"model: {type(model).__name__} has no MoE block with fused 3-D experts (gate_up_proj/down_proj); "
            "expert and router LoRA need a transformers 5.x Mixtral/Qwen-MoE/OLMoE layout: a dense model "
            "becomes one with `align upcycle` (or set lora_experts: false and lora_router: false to adapt attention only)"
        )
    if want_router:
        gate = blocks[0][1].gate
        base_gate = gate.get_base_layer() if hasattr(gate, "get_base_layer") else gate
        weight = getattr(base_gate, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise AlignError(f"model: the router of {type(model).__name__} has no 2-D `weight`; set lora_router: false")


def build_lora_config(model_args, model: nn.Module):
    """The PEFT LoraConfig the recipe asks for: attention modules, expert stacks and the router, each optional."""
    from peft import LoraConfig

    check_adaptable(model, model_args.lora_experts, model_args.lora_router)
    target_modules = list(model_args.lora_attention_modules) if model_args.lora_attention else []
    target_parameters = []
    if model_args.lora_experts:
        target_parameters += [f"experts.{p}" for p in EXPERT_PARAMS]
    if model_args.lora_router:
        target_parameters.append("gate.weight")
    if not target_modules and not target_parameters:
        raise AlignError("recipe: lora_attention, lora_experts and lora_router are all off; nothing would train")
    dropout = getattr(model_args, "lora_dropout", 0.0)
    if dropout and target_parameters:
        raise AlignError("recipe: key 'lora_dropout' is above 0, but PEFT's expert and router LoRA (target_parameters) "
                         "take no dropout: set lora_dropout: 0, or lora_experts: false and lora_router: false")
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=dropout,
        use_rslora=getattr(model_args, "use_rslora", False),
        target_modules=target_modules or None,
        target_parameters=target_parameters or None,
        task_type="CAUSAL_LM",
        bias="none",
    )


def parameter_group(name: str) -> str:
    """attention / experts / router / other, from a (PEFT-wrapped) parameter name."""
    if ".self_attn." in name or ".attention." in name:
        return "attention"
    if ".experts." in name:
        return "experts"
    if ".mlp.gate." in name or ".router." in name:
        return "router"
    return "other"


def trainable_parameter_counts(model: nn.Module) -> Counter:
    counts: Counter = Counter({g: 0 for g in PARAM_GROUPS})
    for name, param in model.named_parameters():
        if param.requires_grad:
            counts[parameter_group(name)] += param.numel()
    return counts


def format_trainable_report(model: nn.Module) -> str:
    counts = trainable_parameter_counts(model)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(counts.values())
    parts = ", ".join(f"{g} {counts[g]:,}" for g in PARAM_GROUPS)
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%): {parts}"
