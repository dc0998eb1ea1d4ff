"""Load a Mixtral-type checkpoint with NF4 expert stacks, quantising each expert as its shard is read.

transformers' loader builds every expert stack in 16 bits before anything can quantise it, so host memory
must hold the whole 16-bit model first (about 93 GB for Mixtral-8x7B). Here the architecture is built on
the meta device, the safetensors shards are read one tensor at a time, and each expert matrix is
quantised as soon as it is read: the original per-expert layout (`experts.E.w1/w2/w3.weight`, as on the
Hub; `w1` and `w3` become `gate_up_proj`, gate first) or transformers 5's fused stacks (`gate_up_proj`,
`down_proj`, read one expert slice at a time). At most one expert matrix (plus its partner w1/w3) is in
16 bits at any moment; everything else lands directly in its parameter.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import struct
from pathlib import Path

import torch
from torch import nn

from align.moe.nf4 import BLOCKSIZE, STACKS, Nf4Tensor, find_experts, install_experts_forward, quantize_expert, \
    rebuild_meta_buffers

_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<w>w[123])\.weight$")
_RENAMES = ((".block_sparse_moe.", ".mlp."),)


def checkpoint_shards(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class _ShardReader:
    """A safetensors file read tensor by tensor with plain reads, no mmap: a mapped shard's pages count in
    the process's memory while anything of it is alive (measured: a whole 3 GB checkpoint stayed resident
    when a few of its tensors were kept). Layout: 8-byte header length, JSON header, then the data."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDONLY)
        (size,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
        header = json.loads(os.pread(self.fd, size, 8))
        header.pop("__metadata__", None)
        self.base, self.entries = 8 + size, header

    def keys(self):
        return list(self.entries)

    def _read(self, start: int, end: int, dtype, shape) -> torch.Tensor:
        buffer = bytearray(end - start)
        view, done = memoryview(buffer), 0
        while done < len(buffer):
            n = os.preadv(self.fd, [view[done:]], self.base + start + done)
            if n <= 0:
                raise OSError(f"short read at byte {self.base + start + done}")
            done += n
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape) if buffer else torch.empty(shape, dtype=dtype)

    def get(self, key: str) -> torch.Tensor:
        entry = self.entries[key]
        return self._read(*entry["data_offsets"], _DTYPES[entry["dtype"]], entry["shape"])

    def shape(self, key: str) -> list[int]:
        return self.entries[key]["shape"]

    def get_first(self, key: str, index: int) -> torch.Tensor:
        """Row `index` of the first dimension only (one expert of a fused stack)."""
        entry = self.entries[key]
        dtype, shape = _DTYPES[entry["dtype"]], entry["shape"]
        row = (entry["data_offsets"][1] - entry["data_offsets"][0]) // shape[0]
        start = entry["data_offsets"][0] + index * row
        return self._read(start, start + row, dtype, shape[1:])

    def close(self):
        os.close(self.fd)


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> bool:
    module_name, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        return False
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad if old is not None else False)
        return True
    if leaf in module._buffers:
        module._buffers[leaf] = tensor
        return True
    return False


class _Stack:
    """The experts of one stack, quantised as they come."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), dtype
        self.parts: list = [None] * shape[0]

    def put(self, expert: int, matrix: torch.Tensor, compute_device) -> None:
        self.parts[expert] = quantize_expert(matrix.to(self.dtype).contiguous(), BLOCKSIZE, compute_device, torch.device("cpu"))

    def complete(self) -> bool:
        return all(p is not None for p in self.parts)

    def tensor(self) -> Nf4Tensor:
        return Nf4Tensor(torch.cat([q for q, _ in self.parts]).view(-1, 1), torch.cat([a for _, a in self.parts]),
                         self.shape, self.dtype, BLOCKSIZE)


@contextlib.contextmanager
def _allocations_returned():
    """glibc raises its mmap threshold as large blocks are freed (up to 32 MiB), after which the freed 16-bit
    expert matrices, interleaved with the small packed ones that stay, fragment the heap: measured, the
    loader's resident memory grew by twice what it kept. With a fixed 1 MiB threshold every large block is
    its own mapping, returned on free. Restored (to glibc's ceiling) and trimmed afterwards."""
    libc = ctypes.CDLL(None)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:  # not glibc
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        getattr(libc, "malloc_trim", lambda _: None)(0)


_M_MMAP_THRESHOLD = -3


def load_nf4_streaming(folder: str | Path, dtype: torch.dtype = torch.bfloat16, compute_device=None, **config_overrides):
    """The model of `folder` (a local checkpoint folder) with every fused expert stack in NF4, never holding
    a 16-bit stack; other weights in `dtype`."""
    with _allocations_returned():
        return _load(Path(folder), dtype, compute_device, config_overrides)


def _load(folder: Path, dtype, compute_device, config_overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    if compute_device is None and torch.cuda.is_available():
        compute_device = torch.device("cuda")
    config = AutoConfig.from_pretrained(folder, **config_overrides)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    stacks: dict[str, _Stack] = {}
    for module_name, experts in find_experts(model):
        for name in STACKS:
            stacks[f"{module_name}.{name}"] = _Stack(getattr(experts, name).shape, dtype)
    halves: dict[tuple, torch.Tensor] = {}  # (gate_up key, expert) -> w1 or w3 waiting for its partner
    unknown = []
    for shard in checkpoint_shards(folder):
        f = _ShardReader(shard)
        try:
            for key in f.keys():
                name = key
                for old, new in _RENAMES:
                    name = name.replace(old, new)
                per_expert = _PER_EXPERT.match(name)
                if per_expert:
                    prefix, expert, w = per_expert["prefix"], int(per_expert["expert"]), per_expert["w"]
                    if f"{prefix}.down_proj" not in stacks or expert >= stacks[f"{prefix}.down_proj"].shape[0]:
                        raise ValueError(f"{folder}: {key} is an expert the config does not have")
                    if w == "w2":
                        stacks[f"{prefix}.down_proj"].put(expert, f.get(key), compute_device)
                        continue
                    target = f"{prefix}.gate_up_proj"
                    partner = halves.pop((target, expert, "w3" if w == "w1" else "w1"), None)
                    if partner is None:
                        halves[(target, expert, w)] = f.get(key).to(dtype)
                    else:
                        gate, up = (f.get(key), partner) if w == "w1" else (partner, f.get(key))
                        stacks[target].put(expert, torch.cat([gate.to(dtype), up.to(dtype)], 0), compute_device)
                    continue
                if name in stacks:  # a fused stack: one expert slice at a time
                    for expert in range(stacks[name].shape[0]):
                        stacks[name].put(expert, f.get_first(key, expert), compute_device)
                    continue
                tensor = f.get(key)
                if tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                if not _set_tensor(model, name, tensor):
                    unknown.append(key)
        finally:
            f.close()
    if halves:
        raise ValueError(f"{folder}: expert weights without their w1/w3 partner: {sorted(k[0] for k in halves)[:3]}")
    missing = [k for k, stack in stacks.items() if not stack.complete()]
    if missing:
        raise ValueError(f"{folder}: the checkpoint lacks expert weights of {missing[:3]}")
    for module_name, experts in find_experts(model):
        for name in STACKS:
            key = f"{module_name}.{name}"
            setattr(experts, name, nn.Parameter(stacks.pop(key).tensor(), requires_grad=False))
        install_experts_forward(experts)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    rebuild_meta_buffers(model)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left or unknown:
        raise ValueError(f"{folder}: checkpoint and config disagree: missing {left[:3]}, unexpected {unknown[:3]}")
    model.config.__dict__["align_nf4_experts"] = {"blocksize": BLOCKSIZE}
    return model.eval()


def save_hub_layout(state: dict[str, torch.Tensor], config, folder: str | Path, shards: int = 2) -> None:
    """A transformers 5 Mixtral state dict (fused stacks) written in the Hub's per-expert layout
    (`block_sparse_moe.experts.E.w1/w2/w3.weight`), in `shards` safetensors files with an index: what
    `mistralai/Mixtral-8x7B-v0.1` looks like on disk. For tests and benchmarks of the loader."""
    from safetensors.torch import save_file

    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        prefix = key.replace(".mlp.", ".block_sparse_moe.")
        if key.endswith("experts.gate_up_proj"):
            half = value.shape[1] // 2
            for e in range(value.shape[0]):
                out[f"{prefix[:-len('gate_up_proj')]}{e}.w1.weight"] = value[e, :half].contiguous()
                out[f"{prefix[:-len('gate_up_proj')]}{e}.w3.weight"] = value[e, half:].contiguous()
        elif key.endswith("experts.down_proj"):
            for e in range(value.shape[0]):
                out[f"{prefix[:-len('down_proj')]}{e}.w2.weight"] = value[e].contiguous()
        else:
            out[prefix] = value.contiguous()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(out)
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: out[k] for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(folder)
