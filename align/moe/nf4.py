"""4-bit (NF4) fused expert stacks: QLoRA for MoE.

bitsandbytes' `load_in_4bit` replaces `nn.Linear` layers only, so a transformers 5.x Mixtral keeps its fused
3-D expert stacks (about 90% of the weights) in bf16 (bitsandbytes issue #1849). Here each stack
`[E, out, in]` is quantised per expert with bitsandbytes' functional API (NF4, blocks of 64, one float32
absmax per block) and kept packed, two weights per byte.

The packed bytes live in a tensor subclass (`Nf4Tensor`) that reads as the `[E, out, in]` stack, so the
model's own experts implementations, generation and PEFT's `target_parameters` work on it unchanged. (A
`torch.nn.utils.parametrize` dequantiser was tried first: PEFT then matches targets by full name only,
nests the two stacks' wrappers in the other order, which renames adapter keys, and leaves its LoRA proxy
behind after each forward.) What makes it cheap is the experts forward installed here and the fused LoRA
path (`fused_lora.py`): they dequantise one stack at a time inside the forward and again inside the
backward, and never keep a dequantised stack alive between the two, where a plain autograd graph keeps
every layer's 16-bit stack until the backward. The tensor subclass itself is in `nf4_tensor.py`, below
both; `align quantize` is `quantize.py`.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import torch
from torch import nn

from align.moe.nf4_tensor import BLOCKSIZE, Nf4Tensor, is_nf4  # noqa: F401 (the format; re-exported)

CONFIG_KEY = "align_nf4_experts"  # in config.json of a saved quantised base: {"blocksize": 64}
STACKS = ("gate_up_proj", "down_proj")


def quantize_stack(stack: torch.Tensor, blocksize: int = BLOCKSIZE, compute_device=None) -> Nf4Tensor:
    """The stack quantised per expert (NF4, one float32 absmax per block), on the stack's own device.

    Blocks never straddle two experts (each expert's size is a multiple of the block), so the per-expert
    results laid back to back dequantise as one tensor.
    """
    import bitsandbytes.functional as bnbf

    if stack[0].numel() % blocksize:
        raise ValueError(f"expert size {tuple(stack.shape[1:])} is not a multiple of the NF4 block ({blocksize})")
    compute_device = compute_device or stack.device
    parts = [quantize_expert(expert, blocksize, compute_device, stack.device) for expert in stack.detach()]
    return Nf4Tensor(torch.cat([q for q, _ in parts]).view(-1, 1), torch.cat([a for _, a in parts]), stack.shape,
                     stack.dtype, blocksize)


def quantize_expert(matrix: torch.Tensor, blocksize: int = BLOCKSIZE, compute_device=None, store_device=None):
    """(packed uint8, float32 absmax) of one expert's [out, in] matrix, NF4 in blocks of `blocksize`, in
    bitsandbytes' format (its dequantize_4bit reads it; a test holds it bit for bit to its quantize_4bit).

    Written in torch rather than calling bitsandbytes' quantize_4bit: on the CPU that call leaves ~6 MiB of
    host memory behind per Mixtral-8x7B-sized expert matrix (measured), which a loader quantising 768 of
    them cannot afford. Nearest NF4 code by its midpoints, absmax per block, two codes per byte (the first
    in the high nibble)."""
    device = compute_device or matrix.device
    store_device = store_device or matrix.device
    code = _nf4_code(device)
    blocks = matrix.to(device).reshape(-1, blocksize).float()
    absmax = blocks.abs().amax(1)
    normed = blocks / torch.where(absmax == 0, torch.ones_like(absmax), absmax)[:, None]
    index = torch.bucketize(normed, (code[1:] + code[:-1]) / 2).to(torch.uint8).reshape(-1)
    packed = (index[0::2] << 4) | index[1::2]
    return packed.to(store_device), absmax.to(store_device)


_NF4_CODES: dict = {}


def _nf4_code(device) -> torch.Tensor:
    key = str(device)
    if key not in _NF4_CODES:
        import bitsandbytes.functional as bnbf

        _NF4_CODES[key] = bnbf.get_4bit_type("nf4", device="cpu").float().to(device)
    return _NF4_CODES[key]


def find_experts(model: nn.Module):
    """(name, experts module) of every MoE block's fused experts (under a PEFT wrapper, its base module)."""
    from align.moe.lora import find_moe_blocks

    for name, block in find_moe_blocks(model):
        experts = block.experts
        yield f"{name}.experts", experts.get_base_layer() if hasattr(experts, "get_base_layer") else experts


def quantize_experts_nf4(model: nn.Module, blocksize: int = BLOCKSIZE, compute_device=None) -> int:
    """Quantise every fused expert stack of `model` in place; returns how many stacks were quantised.

    `compute_device` (default: CUDA when present) runs the quantisation kernel; the packed bytes stay on
    the stack's own device.
    """
    if compute_device is None and torch.cuda.is_available():
        compute_device = torch.device("cuda")
    count = 0
    for _, experts in find_experts(model):
        for name in STACKS:
            stack = getattr(experts, name)
            if is_nf4(stack):
                continue
            setattr(experts, name, nn.Parameter(quantize_stack(stack, blocksize, compute_device), requires_grad=False))
            del stack
            count += 1
        install_experts_forward(experts)
    if count and hasattr(model, "config"):
        model.config.__dict__[CONFIG_KEY] = {"blocksize": blocksize}
    return count


def install_experts_forward(experts: nn.Module) -> None:
    """The experts' own forward becomes the memory-lean grouped path (no LoRA): a dequantised stack lives
    only inside its own GEMMs and is dequantised again for the backward. When PEFT's LoRA proxy sits on a
    stack (the `peft` backend), the model's own forward runs on PEFT's W + B·A: dequantise-then-PEFT."""
    if "_nf4_original_forward" in experts.__dict__:
        return
    experts._nf4_original_forward = experts.forward

    def forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        from align.moe.fused_lora import fused_experts_forward

        if all(is_nf4(getattr(self, name)) for name in STACKS):
            return fused_experts_forward(self, hidden_states, top_k_index, top_k_weights)
        return self._nf4_original_forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs)

    experts.forward = types.MethodType(forward, experts)


def nf4_stack_count(model: nn.Module) -> int:
    return sum(is_nf4(p) for p in model.parameters())


# ---------------------------------------------------------------- saving and loading a quantised base
def save_quantized(model: nn.Module, folder: str | Path) -> None:
    """config.json (with the NF4 marker) and model.safetensors: each NF4 stack as `<name>.nf4_packed` and
    `<name>.nf4_absmax`, everything else as it is."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state, blocksize = {}, None
    for name, tensor in model.state_dict().items():
        if is_nf4(tensor):
            state[f"{name}.nf4_packed"] = tensor.packed.contiguous()
            state[f"{name}.nf4_absmax"] = tensor.absmax.contiguous()
            blocksize = tensor.blocksize
        else:
            state[name] = tensor.contiguous()
    if blocksize is None:
        raise ValueError("the model has no NF4 expert stacks to save")
    model.config.__dict__[CONFIG_KEY] = {"blocksize": blocksize}
    model.config.save_pretrained(folder)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def is_quantized_checkpoint(folder: str | Path) -> bool:
    config = Path(folder) / "config.json"
    return config.is_file() and CONFIG_KEY in json.loads(config.read_text())


def load_quantized(folder: str | Path, dtype: torch.dtype | None = None, **config_overrides) -> nn.Module:
    """Rebuild the architecture without allocating weights, then assign the saved tensors: NF4 stacks as
    they were saved (nothing is dequantised), the rest in `dtype`."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder, **config_overrides)
    blocksize = getattr(config, CONFIG_KEY, {}).get("blocksize", BLOCKSIZE)
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    saved = load_file(str(folder / "model.safetensors"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    stacks = set()
    for module_name, experts in find_experts(model):
        for name in STACKS:
            key = f"{module_name}.{name}"
            if f"{key}.nf4_packed" in saved:
                stack = Nf4Tensor(saved.pop(f"{key}.nf4_packed"), saved.pop(f"{key}.nf4_absmax"),
                                  getattr(experts, name).shape, dtype, blocksize)
                setattr(experts, name, nn.Parameter(stack, requires_grad=False))
                stacks.add(key)
        install_experts_forward(experts)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in saved.items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = set(result.missing_keys) - stacks
    if missing or result.unexpected_keys:
        raise ValueError(f"{folder}: model.safetensors does not match the config: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(result.unexpected_keys)[:3]}")
    rebuild_meta_buffers(model)
    model.tie_weights()
    return model.eval()
def rebuild_meta_buffers(model: nn.Module, device=None) -> None:
    """Non-persistent buffers (rotary inverse frequencies) of a model built on the meta device aren't in any
    checkpoint: build those modules again, on `device`."""
    for name, module in model.named_modules():
        if any(b is not None and b.is_meta for b in module.buffers(recurse=False)):
            if "rotary" not in type(module).__name__.lower():
                raise ValueError(f"{name}: buffer missing from the quantised checkpoint")
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            with torch.device(device or "cpu"):
                setattr(parent, child, type(module)(config=model.config))
