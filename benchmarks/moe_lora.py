"""One Mixtral MoE layer, forward + backward with LoRA on both expert stacks and the router.

Variants, all measured in the same run (each in its own process, so peak memory is its own):
  eager+peft        transformers' eager experts loop, PEFT ParamWrapper (builds W + B·A)
  grouped_mm+peft   transformers' grouped_mm experts, PEFT ParamWrapper        <- the baseline
  fused             align.moe.fused_lora (grouped LoRA linears, no W', no dW)
and each again with 4-bit (NF4) expert stacks (align.moe.nf4): the PEFT rows then dequantise the stack
and run PEFT on it (what PEFT can do with a 4-bit stack), the fused row dequantises inside its own GEMMs.
Printed as ratios against grouped_mm+peft in the same precision and against the 16-bit grouped_mm+peft;
the last lines are `speedup_vs_peft=X peak_memory_ratio=Y` for the fused path (16-bit, then 4-bit).
Peak memory is the device's peak over a step (weights included); `peak_extra_mib` is its growth over
the resident weights.

    python benchmarks/moe_lora.py                                   # CPU default shape (< 2 min)
    python benchmarks/moe_lora.py --device cuda --dtype bfloat16 --hidden 4096 --intermediate 14336 \\
        --experts 8 --tokens 8192 --iters 10                         # Mixtral-8x7B layer on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BITS16 = {"eager+peft": ("eager", "peft"), "grouped_mm+peft": ("grouped_mm", "peft"), "fused": ("grouped_mm", "fused")}
VARIANTS = {**{k: (*v, False) for k, v in BITS16.items()}, **{f"{k} (4-bit experts)": (*v, True) for k, v in BITS16.items()}}
BASELINE = "grouped_mm+peft"


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def run_variant(args) -> dict:
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from torch import nn
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from align.moe.fused_lora import apply_moe_lora_backend
    from align.moe.nf4 import quantize_experts_nf4

    impl, backend, four_bit = VARIANTS[args.variant]
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_local_experts=args.experts,
                           num_experts_per_tok=args.top_k, experts_implementation=impl)
    torch.set_default_dtype(dtype)  # build the layer in place, in its dtype (a Mixtral layer is 2.8 GB in bf16)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = MixtralSparseMoeBlock(config)

        def forward(self, x):
            return self.mlp(x)

    with torch.device(device):
        layer = Layer()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02)
    if four_bit:
        assert quantize_experts_nf4(layer) == 2
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                      target_parameters=["experts.gate_up_proj", "experts.down_proj", "gate.weight"])
    layer = inject_adapter_in_model(lora, layer)
    for name, p in layer.named_parameters():
        if p.is_floating_point():
            p.requires_grad_("lora_" in name)
        if "lora_B" in name:
            with torch.no_grad():
                p.normal_(0, 0.01)
    report = apply_moe_lora_backend(layer, backend)
    if backend == "fused":
        assert report["fused_experts"] == 1 and report["fused_routers"] == 1, report

    x = torch.randn(1, args.tokens, args.hidden, device=device, dtype=dtype)
    grad = torch.randn_like(x)

    def step():
        inp = x.detach().requires_grad_(True)
        out = layer(inp)
        out.backward(grad)
        for p in layer.parameters():
            p.grad = None

    step()  # warm-up (kernels, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
        resident = base_mem
    else:
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS counter
            f.write("5")
        base_mem = _rss_kib("VmRSS") * 1024
        resident = base_mem
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak_total = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_kib("VmHWM") * 1024
    return {"variant": args.variant, "tokens_per_s": args.tokens * args.iters / elapsed,
            "peak_mib": peak_total / 2**20, "peak_extra_mib": max(peak_total - base_mem, 0) / 2**20,
            "resident_mib": resident / 2**20, "seconds_per_step": elapsed / args.iters}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1792)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--only", help="comma-separated variants to run (default: all)")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    shape = {k: getattr(args, k) for k in ("device", "dtype", "hidden", "intermediate", "experts", "top_k", "tokens", "rank", "iters")}
    print(json.dumps({"shape": shape}))
    results = {}
    wanted = args.only.split(",") if args.only else list(VARIANTS)
    for variant in wanted:
        cmd = [sys.executable, __file__, "--variant", variant] + [
            f"--{k.replace('_', '-')}={v}" for k, v in shape.items()]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if proc.returncode != 0:
            print(f"{variant}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            raise SystemExit(1)
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    def ratios(r, base, tag):
        if base is None:
            return
        r[f"speed_vs_{tag}"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
        r[f"peak_memory_vs_{tag}"] = round(r["peak_mib"] / max(base["peak_mib"], 1e-9), 3)

    for variant, r in results.items():
        four_bit = VARIANTS[variant][2]
        same_precision = results.get(BASELINE + (" (4-bit experts)" if four_bit else ""))
        ratios(r, same_precision, "grouped_mm_peft_same_precision" if four_bit else "grouped_mm_peft")
        if four_bit:
            ratios(r, results.get(BASELINE), "grouped_mm_peft_16bit")
    for variant, r in results.items():
        print(json.dumps({k: round(v, 4 if k == "seconds_per_step" else 1) if k.endswith(("_s", "_mib", "_step")) else v
                          for k, v in r.items()}))
    for fused, tag, prefix in (("fused (4-bit experts)", "grouped_mm_peft_same_precision", "4-bit experts: "),
                               ("fused", "grouped_mm_peft", "")):
        if fused in results and f"speed_vs_{tag}" in results[fused]:
            r = results[fused]
            print(f"{prefix}speedup_vs_peft={r[f'speed_vs_{tag}']} peak_memory_ratio={r[f'peak_memory_vs_{tag}']}")


if __name__ == "__main__":
    main()
