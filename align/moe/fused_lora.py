"""Fused LoRA for fused MoE experts (and the router): never build W + s·B·A, never compute dW.

PEFT's `target_parameters` (ParamWrapper) folds the LoRA update into the expert stack on every forward,
W' = W + s·B·A, then runs the experts on W'. W' needs a gradient, so autograd runs the full weight-gradient
GEMM and reduces it into A and B. Here each expert computes, over the tokens routed to it,

    y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ

with a custom autograd function whose backward computes dx, dA and dB only (the base is frozen) and saves
only x and the rank-r product x·Aᵀ. The GEMMs go through transformers' grouped-GEMM dispatcher
(`torch.nn.functional.grouped_mm` / `torch._grouped_mm` where the device has them, a correct fallback
elsewhere, CPU included).

The adapter tensors stay exactly where and how PEFT keeps them (the ParamWrapper's lora_A / lora_B), so an
adapter trained here loads in plain PEFT (and servers that read PEFT adapters) and vice versa. We only
replace the wrappers' forward; `apply_moe_lora_backend` falls back to PEFT's own path, with a logged
reason, wherever this path can't serve a module.
"""

from __future__ import annotations

import logging
import types

import torch
from torch import nn

logger = logging.getLogger("align")

# Routers whose forward is: logits = x·Wᵀ; softmax; top-k; (re)normalise. Mixtral always renormalises
# and keeps float32 scores; the others renormalise when `norm_topk_prob` and cast back.
KNOWN_ROUTERS = {"MixtralTopKRouter", "Qwen2MoeTopKRouter", "Qwen3MoeTopKRouter", "OlmoeTopKRouter"}


def _grouped_mm(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [S, in] times per-group weight [G, in, out] over row groups ending at `offs` -> [S, out]."""
    if weight.shape[0] == 1:  # the router: one group is a plain matmul, free of grouped GEMM's 16-byte strides
        return x @ weight[0]  # (a 16-bit router with 4 or 60 experts has rows of 8 or 120 bytes)
    from transformers.integrations.moe import _grouped_mm as transformers_grouped_mm

    return transformers_grouped_mm(x, weight, offs=offs)


def _group_bounds(offs: torch.Tensor) -> list[tuple[int, int]]:
    ends = offs.tolist()
    return list(zip([0] + ends[:-1], ends))


class LoraGroupedLinear(torch.autograd.Function):
    """y = grouped(x, Wᵀ) + s·grouped(grouped(x, Aᵀ), Bᵀ) with W [G, out, in] frozen, A [G, r, in], B [G, out, r].

    Backward: dx = grouped(dy, W) + s·grouped(grouped(dy, B), A); per group dA = s·(dy·B)ᵀ·x and
    dB = s·dyᵀ·(x·Aᵀ). No gradient for W; saved: x and x·Aᵀ (r columns). Without LoRA (A, B None) only
    dx. With `reload` (a 4-bit base) W is not saved either: the backward dequantises it again.
    """

    @staticmethod
    def forward(ctx, x, offs, weight, lora_a, lora_b, scaling, reload):
        # Under autocast (bf16 / fp16 with float32 weights) every GEMM runs in the autocast dtype, as
        # autocast runs PEFT's path; the backward runs in the same dtype (autocast is off there, so it is
        # recorded here), and the gradients go back in each input's own dtype.
        device = x.device.type
        amp = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        ctx.amp, ctx.device = amp, device
        ctx.dtypes = (x.dtype, None if lora_a is None else lora_a.dtype, None if lora_b is None else lora_b.dtype)
        with torch.autocast(device, enabled=False):
            xc, wc, ac, bc = (_cast(t, amp) for t in (x, weight, lora_a, lora_b))
            y = _grouped_mm(xc, wc.transpose(-2, -1), offs)
            del wc
            xa = None
            if ac is not None:
                xa = _grouped_mm(xc, ac.transpose(-2, -1), offs)  # [S, r]
                y = y + scaling * _grouped_mm(xa, bc.transpose(-2, -1), offs).to(y.dtype)
        ctx.reload = reload
        ctx.scaling = scaling
        ctx.save_for_backward(xc, xa, offs, None if reload else weight, lora_a, lora_b)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, xa, offs, weight, lora_a, lora_b = ctx.saved_tensors
        s, amp = ctx.scaling, ctx.amp
        with torch.autocast(ctx.device, enabled=False):
            dy = _cast(dy.contiguous(), amp)
            lora_a, lora_b = _cast(lora_a, amp), _cast(lora_b, amp)
            has_lora = lora_a is not None
            dyb = _grouped_mm(dy, lora_b, offs) if has_lora else None  # [S, r]: dy·B per group
            dx = da = db = None
            if ctx.needs_input_grad[0]:
                weight = _cast(ctx.reload() if ctx.reload is not None else weight, amp)
                dx = _grouped_mm(dy, weight, offs)
                del weight
                if has_lora:
                    dx = dx + s * _grouped_mm(dyb, lora_a, offs).to(dy.dtype)
                dx = dx.to(ctx.dtypes[0])
            if has_lora:
                da = torch.zeros(lora_a.shape, dtype=ctx.dtypes[1], device=lora_a.device)
                db = torch.zeros(lora_b.shape, dtype=ctx.dtypes[2], device=lora_b.device)
                for g, (start, end) in enumerate(_group_bounds(offs)):
                    if end > start:  # an expert that got no tokens gets zero gradients
                        da[g] = s * (dyb[start:end].transpose(0, 1) @ x[start:end].to(dyb.dtype)).to(da.dtype)
                        db[g] = s * (dy[start:end].transpose(0, 1) @ xa[start:end].to(dy.dtype)).to(db.dtype)
        return dx, None, None, da, db, None, None


def _cast(tensor, dtype):
    return tensor if tensor is None or dtype is None or tensor.dtype == dtype else tensor.to(dtype)


def lora_grouped_linear(x, offs, weight, reload=None, lora=None):
    """`lora` is (A [G, r, in], B [G, out, r], scaling) or None for the plain frozen base; `reload` gives
    `weight` again for the backward (a dequantised 4-bit stack, then not kept alive in between)."""
    if lora is None:
        if reload is None:
            return _grouped_mm(x, weight.transpose(-2, -1), offs)
        return LoraGroupedLinear.apply(x, offs, weight, None, None, 0.0, reload)
    a, b, s = lora
    a, b = a.to(weight.dtype), b.to(weight.dtype)
    # Grouped GEMM kernels want 16-byte strides: zero-pad the rank (the padded rows/columns stay zero and
    # their gradients are dropped by the slicing), and copy PEFT's permuted B view to a plain layout.
    device = x.device.type
    compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    multiple = max(1, 16 // compute.itemsize)
    pad = -a.shape[1] % multiple
    if pad:
        a = torch.nn.functional.pad(a, (0, 0, 0, pad))
        b = torch.nn.functional.pad(b, (0, pad))
    return LoraGroupedLinear.apply(x, offs, weight, a.contiguous(), b.contiguous(), float(s), reload)


def _frozen_stack(experts, name):
    """(the stack as a tensor, a reload callable or None): NF4 stacks are dequantised here and again in the
    backward; plain stacks are used as they are."""
    from align.moe.nf4_tensor import is_nf4

    stack = getattr(experts, name)
    if is_nf4(stack):
        return stack.dequantize(), stack.dequantize
    return stack, None


# ---------------------------------------------------------------- reading PEFT's adapters
def _active_lora(wrapper) -> tuple | None | str:
    """(A [E, r, in], B [E, out, r], scaling) of the wrapper's one active adapter, None when LoRA is off
    (disabled, merged, or this adapter doesn't target the module), "unsupported" for several adapters."""
    if wrapper.disable_adapters or wrapper.merged:
        return None
    active = [a for a in wrapper.active_adapters if a in wrapper.lora_A]
    if not active:
        return None
    if len(active) > 1:
        return "unsupported"
    return _lora_factors(wrapper, active[0])


def _lora_factors(wrapper, name):
    """A [E, r, in], B [E, out, r], scaling as views of PEFT's lora_A [E·r, in] (expert-major) and lora_B
    [out, r·E] (rank-major). `check_peft_layout` holds this against the installed PEFT's own
    `get_delta_factors`, which we don't call per step: it reads (and for a 4-bit stack dequantises) the base."""
    a = wrapper.lora_A[name].weight
    b = wrapper.lora_B[name].weight
    if wrapper.num_experts == 1:  # a 2-D parameter (the router): plain LoRA, delta = s·B·A of shape [out, in]
        return a.unsqueeze(0), b.unsqueeze(0), wrapper.scaling[name]
    experts = wrapper.num_experts
    return a.reshape(experts, -1, a.shape[-1]), b.reshape(b.shape[0], -1, experts).permute(2, 0, 1), wrapper.scaling[name]


def check_peft_layout(wrapper) -> str | None:
    """None when our reading of the adapter equals PEFT's own factorisation, else why not."""
    if wrapper.num_experts == 1 or not wrapper.lora_A:
        return None
    if not wrapper._did_swap_in_out_features:  # noqa: SLF001 - experts stored as [E, in, out]
        return "transposed expert layout"
    name = next(iter(wrapper.lora_A))
    weights = (wrapper.lora_A[name].weight, wrapper.lora_B[name].weight)
    saved = [w.detach().clone() for w in weights]
    try:
        with torch.no_grad():  # distinct values: a fresh B is all zeros and would match any layout
            generator = torch.Generator(device=weights[0].device).manual_seed(0)  # leaves the global RNG alone
            for w in weights:
                w.copy_(torch.randn(w.shape, generator=generator, device=w.device, dtype=w.dtype))
            lhs, rhs, scaling = wrapper.get_delta_factors(name)
            a, b, ours = _lora_factors(wrapper, name)
            same = (scaling == ours and lhs.shape == b.shape and rhs.shape == a.shape
                    and torch.equal(lhs, b.to(lhs.dtype)) and torch.equal(rhs, a.to(rhs.dtype)))
    finally:
        with torch.no_grad():
            for w, old in zip(weights, saved):
                w.copy_(old)
    return None if same else "the installed PEFT stores expert LoRA in another layout"


def _wrapper_chain(module) -> tuple[dict, nn.Module]:
    """{parameter name: ParamWrapper} of nested wrappers, and the base module under them."""
    from peft.tuners.lora.layer import ParamWrapper

    wrappers = {}
    while isinstance(module, ParamWrapper):
        wrappers[module.parameter_name] = module
        module = module.base_layer
    return wrappers, module


# ---------------------------------------------------------------- forwards
def fused_experts_forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
    """Replaces the outermost expert ParamWrapper's forward: sorted tokens, two LoRA grouped linears."""
    wrappers, experts = _wrapper_chain(self)
    lora_gu = _active_lora(wrappers["gate_up_proj"]) if "gate_up_proj" in wrappers else None
    lora_d = _active_lora(wrappers["down_proj"]) if "down_proj" in wrappers else None
    if "unsupported" in (lora_gu, lora_d):
        return self._peft_forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs)

    num_experts = experts.num_experts
    num_top_k = top_k_index.shape[-1]
    expert_ids = top_k_index.reshape(-1)
    expert_ids_sorted, perm = torch.sort(expert_ids, stable=True)
    token_idx = perm // num_top_k
    x = hidden_states[token_idx]
    weights = top_k_weights.reshape(-1)[perm]
    counts = torch.bincount(expert_ids_sorted, minlength=num_experts)[:num_experts]
    offs = torch.cumsum(counts, 0).to(torch.int32)

    h = lora_grouped_linear(x, offs, *_frozen_stack(experts, "gate_up_proj"), lora=lora_gu)
    gate, up = h.chunk(2, dim=-1)
    y = lora_grouped_linear(experts.act_fn(gate) * up, offs, *_frozen_stack(experts, "down_proj"), lora=lora_d)
    y = y * weights.unsqueeze(-1)
    out = torch.zeros_like(hidden_states)
    return out.index_add(0, token_idx, y.to(out.dtype))


def _fused_route(router, lora, hidden_states):
    """The router's own computation with its logits through the LoRA grouped linear (one group)."""
    x = hidden_states.reshape(-1, router.hidden_dim)
    offs = torch.tensor([x.shape[0]], dtype=torch.int32, device=x.device)
    logits = lora_grouped_linear(x, offs, router.weight.unsqueeze(0), lora=lora)
    probs = torch.softmax(logits.float(), dim=-1)
    top_value, top_index = torch.topk(probs, router.top_k, dim=-1)
    if getattr(router, "norm_topk_prob", True):
        top_value = top_value / top_value.sum(dim=-1, keepdim=True)
    if hasattr(router, "norm_topk_prob"):  # Qwen/OLMoE cast the scores back; Mixtral keeps float32
        top_value = top_value.to(logits.dtype)
    return logits, top_value, top_index


def _make_router_forward(router, wrapper):
    """Forward for the base router module itself, so hooks on it (the model's router-logit recorder for
    the aux loss, our router statistics) still see every call."""

    def forward(hidden_states, *args, **kwargs):
        lora = _active_lora(wrapper)
        if lora == "unsupported":
            with wrapper._activate_lora(wrapper.active_adapters):  # noqa: SLF001 - PEFT's own path
                return type(router).forward(router, hidden_states, *args, **kwargs)
        return _fused_route(router, lora, hidden_states)

    return forward


def _call_base_layer(self, hidden_states, *args, **kwargs):
    return self.base_layer(hidden_states, *args, **kwargs)


# ---------------------------------------------------------------- switching a model over
def _why_experts_unsupported(wrapper) -> str | None:
    wrappers, experts = _wrapper_chain(wrapper)
    if not all(hasattr(experts, p) for p in ("gate_up_proj", "down_proj", "act_fn", "num_experts")):
        return f"{type(experts).__name__} lacks the gate_up_proj/down_proj/act_fn layout"
    if getattr(experts, "is_transposed", False):
        return f"{type(experts).__name__} stores transposed experts"
    if any(getattr(experts, n, None) is not None for n in ("gate_up_proj_bias", "down_proj_bias")):
        return f"{type(experts).__name__} has expert biases"
    if any(getattr(experts, p).requires_grad for p in ("gate_up_proj", "down_proj")):
        return "the expert weights are trainable (the fused path assumes a frozen base)"
    if any(w.lora_dropout and not isinstance(next(iter(w.lora_dropout.values()), nn.Identity()), nn.Identity)
           for w in wrappers.values()):
        return "LoRA dropout"
    for wrapper in wrappers.values():
        reason = check_peft_layout(wrapper)
        if reason:
            return reason
    return None


def apply_moe_lora_backend(model: nn.Module, backend: str = "fused") -> dict:
    """Switch every LoRA-adapted expert stack and router of a PEFT model to the fused path.

    Returns {"fused_experts": n, "fused_routers": n, "fallbacks": [reasons]}; `peft` leaves PEFT's path.
    """
    from align.moe.lora import find_moe_blocks

    if backend not in ("fused", "peft"):
        raise ValueError(f"moe_lora_backend must be fused or peft, got {backend!r}")
    report = {"backend": backend, "fused_experts": 0, "fused_routers": 0, "fallbacks": []}
    if backend == "peft":
        return report
    from peft.tuners.lora.layer import ParamWrapper

    for name, block in find_moe_blocks(model):
        experts, gate = block.experts, block.gate
        if isinstance(experts, ParamWrapper):
            reason = _why_experts_unsupported(experts)
            if reason:
                report["fallbacks"].append(f"{name}.experts: {reason}")
            elif not hasattr(experts, "_peft_forward"):
                experts._peft_forward = experts.forward
                experts.forward = types.MethodType(fused_experts_forward, experts)
                report["fused_experts"] += 1
        if isinstance(gate, ParamWrapper):
            router = gate.base_layer
            if type(router).__name__ not in KNOWN_ROUTERS or isinstance(router, ParamWrapper):
                report["fallbacks"].append(f"{name}.gate: {type(router).__name__} is not a known top-k router")
            elif router.weight.requires_grad:
                report["fallbacks"].append(f"{name}.gate: the router weight is trainable")
            elif not hasattr(gate, "_peft_forward"):
                gate._peft_forward = gate.forward
                gate.forward = types.MethodType(_call_base_layer, gate)
                router.forward = _make_router_forward(router, gate)
                report["fused_routers"] += 1
    for reason in report["fallbacks"]:
        logger.warning("moe_lora_backend fused -> peft for %s", reason)
    return report
