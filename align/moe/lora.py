"""Where LoRA goes on a fused-expert MoE model, and what it trains.

transformers 5.x stores each layer's experts as two 3-D parameters (`gate_up_proj` [E, 2I, H] and
`down_proj` [E, H, I]) and the router as a bare parameter (`MixtralTopKRouter.weight`), so neither is an
`nn.Linear` that PEFT's `target_modules` can find; both are reached through `target_parameters`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from align.core.errors import AlignError

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


# ---------------------------------------------------------------- where the recipe's targets land
# PEFT's own rules: a `target_parameters` entry matches a parameter whose full name is it or ends in "." + it;
# a `target_modules` entry the same over module names, a string with regex characters a re.fullmatch of the
# full name, "all-linear" every linear layer but the output head. The fused expert stacks and the router are
# no nn.Linear, so a module spelling that names them (`mlp.experts`, `gate`) means their parameters, and the
# names of the older per-expert layout (w1/w2/w3, gate_proj/up_proj/down_proj) that match no module mean the
# fused stacks that replaced them, as `router.weight` means the router where the model calls it `gate`.
REGEX_CHARS = set("*+?[](){}|^$\\")
GATE_UP_NAMES, DOWN_NAMES, ROUTER_NAMES = {"w1", "w3", "gate_proj", "up_proj"}, {"w2", "down_proj"}, {"router"}


@dataclass
class LoraTargets:
    """The full names LoRA goes on (modules: nn.Linear / nn.Embedding; parameters: expert stacks, router
    weights) and, for the start-of-run report, what each recipe spelling matched."""

    modules: list[str] = field(default_factory=list)
    parameters: list[str] = field(default_factory=list)
    matches: list[tuple[str, str, list[str]]] = field(default_factory=list)


def is_regex(spelling: str) -> bool:
    return any(c in REGEX_CHARS for c in spelling)


def _matches(spelling: str, names, key: str = "lora_target_modules", source: str = "recipe") -> list[str]:
    if is_regex(spelling):
        try:
            pattern = re.compile(spelling)
        except re.error as err:
            raise AlignError(f"{source}: key '{key}': {spelling!r} is not a valid regular expression ({err})") from None
        return [n for n in names if pattern.fullmatch(n)]
    return [n for n in names if n == spelling or n.endswith("." + spelling)]


def _layer_relative(name: str) -> str:
    """model.layers.3.mlp.experts -> mlp.experts (the name inside a decoder layer)."""
    return re.sub(r"^(.*\.)?layers\.\d+\.", "", name)


def _unique(names) -> list[str]:
    return list(dict.fromkeys(names))


def _adaptable(model: nn.Module):
    """{module name: module} LoRA can wrap as modules, {experts/router module name: their parameter names},
    and the names of the output head(s) that all-linear leaves out."""
    from transformers.pytorch_utils import Conv1D

    modules, stacks = {}, {}
    for name, block in find_moe_blocks(model):
        stacks[f"{name}.experts"] = [f"{name}.experts.{p}" for p in EXPERT_PARAMS]
        stacks[f"{name}.gate"] = [f"{name}.gate.weight"]
    for name, module in model.named_modules():
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if name and name not in stacks and isinstance(base, (nn.Linear, nn.Embedding, Conv1D)):
            modules[name] = base
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = {n for n, m in modules.items() if m is head} | {n for n in modules if n.split(".")[-1] == "lm_head"}
    return modules, stacks, heads


def _what_exists(names) -> str:
    return ", ".join(_unique(_layer_relative(n) for n in names))


def resolve_lora_targets(model_args, model: nn.Module, strict: bool = True, source: str = "recipe") -> LoraTargets:
    """The modules and parameters the recipe's LoRA keys name in this model (PEFT's matching rules).

    `strict`: a spelling that matches nothing is the one-line error naming what the model has; otherwise
    it is left out (the preflight's one-layer stand-in lacks `model.layers.3...`)."""
    modules, stacks, heads = _adaptable(model)
    module_names = list(modules) + list(stacks)
    param_shapes = {n: p.dim() for n, p in model.named_parameters()}
    linear_weights = {f"{n}.weight": n for n in modules}
    stack_params = [p for ps in stacks.values() for p in ps]
    kind = type(model).__name__
    targets = LoraTargets()

    def fail(key, spelling, why):
        if strict:
            raise AlignError(f"{source}: key '{key}': {spelling!r} {why}")

    def add_modules(key, spelling, hits):
        found = []
        for name in hits:
            if name in stacks:
                found += stacks[name]
                targets.parameters += stacks[name]
            else:
                found.append(name)
                targets.modules.append(name)
        targets.matches.append((key, spelling, found))

    specs = []
    if model_args.lora_attention:
        specs += [("lora_attention_modules", m) for m in model_args.lora_attention_modules]
    specs += [("lora_target_modules", m) for m in (getattr(model_args, "lora_target_modules", None) or [])]
    for key, spelling in specs:
        if spelling == "all-linear":
            hits = [n for n, m in modules.items() if n not in heads and isinstance(m, nn.Linear)]
        else:
            hits = _matches(spelling, module_names, key, source)
        if not hits and not is_regex(spelling):  # the older per-expert names, the router's other name
            leaf = spelling.split(".")[-1]
            suffix = "gate_up_proj" if leaf in GATE_UP_NAMES else "down_proj" if leaf in DOWN_NAMES else None
            if suffix:
                hits = [p for p in stack_params if p.endswith(f".experts.{suffix}")]
            elif leaf in ROUTER_NAMES:
                hits = [p for p in stack_params if p.endswith(".gate.weight")]
            if hits:
                targets.parameters += hits
                targets.matches.append((key, spelling, hits))
                continue
        if not hits:
            fail(key, spelling, f"matches no module of {kind} that LoRA can adapt; it has {_what_exists(module_names)}")
            continue
        add_modules(key, spelling, hits)

    specs = []
    if model_args.lora_experts:
        specs += [("lora_experts", f"experts.{p}") for p in EXPERT_PARAMS]
    if model_args.lora_router:
        specs.append(("lora_router", "gate.weight"))
    specs += [("lora_target_parameters", p) for p in (getattr(model_args, "lora_target_parameters", None) or [])]
    if (model_args.lora_experts or model_args.lora_router) and not stacks:
        check_adaptable(model, model_args.lora_experts, model_args.lora_router)  # names the model class
    lora_able = [n for n, d in param_shapes.items() if d >= 2]
    for key, spelling in specs:
        hits = [n for n in _matches(spelling, list(param_shapes), key, source) if param_shapes[n] >= 2]
        if not hits and re.fullmatch(r"(.*\.)?router\.weight", spelling):  # the router, as other models name it
            hits = [p for p in stack_params if p.endswith(".gate.weight")]
        if not hits:
            flat = _matches(spelling, list(param_shapes), key, source)
            why = "names only 1-D parameters (norms, biases), which take no LoRA" if flat else f"matches no parameter of {kind}"
            fail(key, spelling, f"{why}; it has {_what_exists(lora_able)}")
            continue
        found = []
        for name in hits:
            if name in linear_weights:  # a linear layer's weight: LoRA on that layer, as target_modules
                targets.modules.append(linear_weights[name])
            else:
                targets.parameters.append(name)
            found.append(name)
        targets.matches.append((key, spelling, found))
    targets.modules, targets.parameters = _unique(targets.modules), _unique(targets.parameters)
    return targets


def _compact(selected: list[str], universe: list[str]) -> list[str]:
    """The shortest suffixes that PEFT's matching turns back into exactly `selected` (the common case:
    `q_proj`, `gate_up_proj`, `gate.weight`); full names where only they single a name out."""
    chosen, left, selected_set = [], set(selected), set(selected)
    for name in selected:
        if name not in left:
            continue
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if parts[-k].isdigit() and k < len(parts):  # `1.mlp...` is exact but unreadable: name the layer
                continue
            hits = {u for u in universe if u == suffix or u.endswith("." + suffix)}
            if hits <= selected_set:
                chosen.append(suffix)
                left -= hits
                break
    return chosen


def format_targets_report(targets: LoraTargets) -> str:
    """`lora_target_parameters 'mlp.experts.gate_up_proj' -> model.layers.{0-3}.mlp.experts.gate_up_proj; ...`"""
    parts = []
    for key, spelling, found in targets.matches:
        groups: dict[str, list[int]] = {}
        for name in found:
            m = re.match(r"^(.*\.)?layers\.(\d+)\.(.*)$", name)
            pattern = f"{m.group(1) or ''}layers.{{}}.{m.group(3)}" if m else name
            groups.setdefault(pattern, []).append(int(m.group(2)) if m else -1)
        shown = []
        for pattern, layers in groups.items():
            if "{}" not in pattern:
                shown.append(pattern)
                continue
            layers = sorted(set(layers))
            span = (f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 1
                    else ",".join(map(str, layers)))
            shown.append(pattern.replace("{}", "{" + span + "}" if len(layers) > 1 else span))
        parts.append(f"{key} {spelling!r} -> {', '.join(shown)}")
    return "lora targets: " + "; ".join(parts)


def build_lora_config(model_args, model: nn.Module, targets: LoraTargets | None = None, strict: bool = True):
    """The PEFT LoraConfig the recipe asks for: attention modules, expert stacks and the router, each
    optional, or wherever lora_target_modules / lora_target_parameters say (resolved by PEFT's rules)."""
    from peft import LoraConfig

    check_adaptable(model, model_args.lora_experts, model_args.lora_router)
    if targets is None:
        targets = resolve_lora_targets(model_args, model, strict=strict)
    if not targets.modules and not targets.parameters:
        raise AlignError("recipe: lora_attention, lora_experts and lora_router are all off; nothing would train")
    dropout = getattr(model_args, "lora_dropout", 0.0)
    if dropout and targets.parameters:
        raise AlignError("recipe: key 'lora_dropout' is above 0, but PEFT's expert and router LoRA (target_parameters) "
                         "take no dropout: set lora_dropout: 0, or lora_experts: false and lora_router: false")
    module_universe = [n for n, _ in model.named_modules() if n]
    param_universe = [n for n, _ in model.named_parameters()]
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=dropout,
        use_rslora=getattr(model_args, "use_rslora", False),
        target_modules=_compact(targets.modules, module_universe) or None,
        target_parameters=_compact(targets.parameters, param_universe) or None,
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
