"""The NF4 expert stack as a tensor: `Nf4Tensor` and `is_nf4`.

The storage format alone, below everything that uses it: the quantiser and loaders (`nf4.py`,
`stream_load.py`) make these tensors, the fused LoRA path (`fused_lora.py`) dequantises them inside its
GEMMs. `align.moe.nf4` re-exports both names.
"""

from __future__ import annotations

import torch

BLOCKSIZE = 64

aten = torch.ops.aten


def _dequantize(packed, absmax, shape, dtype, blocksize):
    import bitsandbytes.functional as bnbf

    state = bnbf.QuantState(absmax=absmax, shape=torch.Size(shape), code=bnbf.get_4bit_type("nf4", device=packed.device),
                            blocksize=blocksize, quant_type="nf4", dtype=dtype)
    return bnbf.dequantize_4bit(packed, state)


class Nf4Tensor(torch.Tensor):
    """An `[E, out, in]` expert stack stored as NF4 bytes that reads as a tensor of `dtype`.

    Every op but moves, views of itself and copies dequantises first, so the model's own experts forward,
    generation and PEFT's `target_parameters` (which wraps, nests and names it as it would the 16-bit
    stack, so adapters stay interchangeable) all see the stack they expect. Indexing one expert
    dequantises that expert alone. The fused path calls `dequantize()` itself, inside its own GEMMs.
    """

    @staticmethod
    def __new__(cls, packed, absmax, shape, dtype, blocksize=BLOCKSIZE):
        return torch.Tensor._make_wrapper_subclass(cls, torch.Size(shape), dtype=dtype, device=packed.device,
                                                   requires_grad=False)

    def __init__(self, packed, absmax, shape, dtype, blocksize=BLOCKSIZE):
        self.packed = packed  # uint8 [E·out·in/2, 1]
        self.absmax = absmax  # float32 [E·out·in/blocksize], experts back to back
        self.blocksize = blocksize

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return _dequantize(self.packed, self.absmax, self.shape, dtype or self.dtype, self.blocksize)

    def expert(self, index: int) -> torch.Tensor:
        per_expert = self.shape[1] * self.shape[2]
        packed = self.packed[index * per_expert // 2:(index + 1) * per_expert // 2]
        absmax = self.absmax[index * per_expert // self.blocksize:(index + 1) * per_expert // self.blocksize]
        return _dequantize(packed, absmax, self.shape[1:], self.dtype, self.blocksize)

    def _like(self, packed=None, absmax=None, dtype=None):
        return Nf4Tensor(self.packed if packed is None else packed, self.absmax if absmax is None else absmax,
                         self.shape, dtype or self.dtype, self.blocksize)

    def __tensor_flatten__(self):
        return ["packed", "absmax"], (tuple(self.shape), self.dtype, self.blocksize)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        shape, dtype, blocksize = meta
        return Nf4Tensor(inner["packed"], inner["absmax"], shape, dtype, blocksize)

    def __repr__(self, **kwargs):
        return f"Nf4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, blocksize={self.blocksize})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten.detach.default, aten.alias.default):
            return args[0]._like()
        if func is aten.clone.default:
            return args[0]._like(args[0].packed.clone(), args[0].absmax.clone())
        if func is aten._to_copy.default:
            t, device = args[0], kwargs.get("device")
            move = (lambda x: x.to(device, non_blocking=kwargs.get("non_blocking", False))) if device else (lambda x: x)
            return t._like(move(t.packed), move(t.absmax), kwargs.get("dtype"))
        if func is aten.select.int and args[1] == 0:
            return args[0].expert(args[2] % args[0].shape[0])
        if func in (aten.copy_.default, aten.set_.source_Tensor) and isinstance(args[0], Nf4Tensor):
            raise RuntimeError("an NF4 expert stack is frozen: quantise a new one instead of copying into it")
        from torch.utils._pytree import tree_map_only

        args, kwargs = tree_map_only(Nf4Tensor, lambda t: t.dequantize(), (args, kwargs))
        return func(*args, **kwargs)


def is_nf4(tensor) -> bool:
    return isinstance(tensor, Nf4Tensor)
