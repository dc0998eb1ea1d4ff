"""A whole Mixtral-8x7B-shaped model with random weights, LoRA training steps: tokens/s, peak memory, MFU.

LoRA (rank 16) on attention, both expert stacks and the router, AdamW on the adapters, router aux loss on,
one sequence of `--tokens` per micro-batch. The model is built on the GPU layer by layer (never whole in
16 bits): with `--experts-4bit` each expert stack is quantised to NF4 as soon as it is made, which is what
lets Mixtral-8x7B (93 GB in bf16) train on one 80 GB GPU.

MFU counts the model's FLOPs per token (forward 2·active parameters + causal attention; the training step
3x that with the input-gradient backward and, with activation checkpointing, one more forward: the
convention of shared/reference/moe-lora-cost.md) against the bf16 matmul rate measured in the same run
(an 8192³ product) and against the H100's 989 TFLOP/s datasheet figure.

    python benchmarks/moe_model.py --experts-4bit --tokens 4096 --checkpointing on    # QLoRA, H100
    python benchmarks/moe_model.py --experts-4bit --tokens 4096 --checkpointing off
    python benchmarks/moe_model.py --tokens 4096 --checkpointing on                   # bf16 LoRA, H200
    python benchmarks/moe_model.py --layers 2 --hidden 256 --intermediate 512 --device cpu --dtype float32  # smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATASHEET_TFLOPS = 989.4  # H100 SXM dense bf16


def build_model(args):
    import torch
    from torch import nn
    from transformers import MixtralConfig, MixtralForCausalLM

    from align.moe.nf4 import install_experts_forward, quantize_stack, rebuild_meta_buffers

    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    config = MixtralConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                           num_attention_heads=args.hidden // 128, num_key_value_heads=max(1, args.hidden // 512),
                           num_local_experts=8, num_experts_per_tok=2, vocab_size=32000, max_position_embeddings=32768,
                           experts_implementation="grouped_mm", output_router_logits=True, router_aux_loss_coef=0.02,
                           use_cache=False)
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    generator = torch.Generator(device=device).manual_seed(0)
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            real = torch.empty(param.shape, dtype=dtype, device=device)
            real.normal_(0, 0.02, generator=generator) if param.dim() > 1 else real.fill_(1.0)
            if args.experts_4bit and name in ("gate_up_proj", "down_proj"):
                real = quantize_stack(real)
            setattr(module, name, nn.Parameter(real, requires_grad=False))
        if args.experts_4bit and hasattr(module, "gate_up_proj"):
            install_experts_forward(module)
    rebuild_meta_buffers(model, device)
    return model


def model_flops_per_token(args, checkpointing: bool) -> float:
    h, i, layers, t = args.hidden, args.intermediate, args.layers, args.tokens
    kv = max(1, h // 512) * 128
    per_layer = 2 * h * h + 2 * h * kv + 2 * 3 * h * i + 8 * h  # attention projections, top-2 experts, router
    forward = 2 * (layers * per_layer + h * 32000) + layers * 2 * t * h  # + causal QKᵀ and AV
    return forward * (4 if checkpointing else 3)


def matmul_tflops(device) -> float:
    import torch

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (time.perf_counter() - start) / 1e12


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--experts-4bit", action="store_true")
    parser.add_argument("--checkpointing", choices=["on", "off"], default="on")
    parser.add_argument("--backend", choices=["fused", "peft"], default="fused")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    import torch
    from peft import get_peft_model

    from align.train.config import ModelArguments
    from align.moe.fused_lora import apply_moe_lora_backend
    from align.moe.lora import build_lora_config

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    peak_tflops = matmul_tflops(device) if cuda else None
    start = time.perf_counter()
    model = build_model(args)
    model = get_peft_model(model, build_lora_config(ModelArguments(lora_r=args.rank, lora_alpha=2 * args.rank), model))
    report = apply_moe_lora_backend(model, args.backend)
    checkpointing = args.checkpointing == "on"
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    build_s = time.perf_counter() - start
    ids = torch.randint(0, 32000, (1, args.tokens), device=device)
    result = {"model": f"mixtral L{args.layers} H{args.hidden} I{args.intermediate} E8 top2", "tokens": args.tokens,
              "experts_4bit": args.experts_4bit, "checkpointing": args.checkpointing, "backend": args.backend,
              "fused_stacks": report["fused_experts"], "trainable": sum(p.numel() for p in params),
              "build_s": round(build_s, 1)}
    if cuda:
        result["resident_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out

    try:
        step()  # warm-up: kernels, allocator, optimizer state
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            out = step()
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    except torch.OutOfMemoryError as err:
        result["status"] = f"out of memory: {str(err).splitlines()[0][:160]}"
        if cuda:
            result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        print(json.dumps(result))
        return
    tokens_per_s = args.tokens * args.steps / elapsed
    achieved = tokens_per_s * model_flops_per_token(args, checkpointing) / 1e12
    result.update({"status": "ok", "loss": round(out.loss.item(), 3), "aux_loss": round(out.aux_loss.item(), 3),
                   "tokens_per_s": round(tokens_per_s, 1), "model_tflops": round(achieved, 1)})
    if cuda:
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["matmul_tflops_measured"] = round(peak_tflops, 1)
        result["mfu_vs_measured_matmul"] = round(achieved / peak_tflops, 3)
        result["mfu_vs_datasheet"] = round(achieved / DATASHEET_TFLOPS, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
