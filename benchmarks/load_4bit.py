"""Peak host memory of loading a Mixtral-shaped checkpoint with 4-bit experts, against loading it in 16 bits.

Writes a synthetic checkpoint (random bf16 weights, Mixtral's layout on the Hub: per-expert w1/w2/w3,
several safetensors shards with an index; the shape scaled down so it is a few GB), then loads it twice,
each in a fresh process: transformers' `from_pretrained` in bf16 (the baseline), and a recipe's path with
`experts_4bit: true` (align.train.models.load_model, which quantises each expert as its shard is read). Prints
each process's peak resident memory (VmHWM) and `peak_load_ratio` = ours / baseline; target <= 0.45.

    python benchmarks/load_4bit.py [--hidden 2048] [--intermediate 7168] [--layers 4] [--experts 8] [--shards 4]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_checkpoint(folder: Path, args) -> dict:
    """Shard by shard, one tensor at a time: writing never holds the model either."""
    import torch
    from safetensors.torch import save_file
    from transformers import MixtralConfig

    config = MixtralConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.intermediate,
                           num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=8,
                           num_local_experts=args.experts, num_experts_per_tok=2, tie_word_embeddings=False,
                           dtype="bfloat16")
    h, i, kv = args.hidden, args.intermediate, args.hidden // 16 * 8
    shapes = {"model.embed_tokens.weight": (32000, h), "model.norm.weight": (h,), "lm_head.weight": (32000, h)}
    for layer in range(args.layers):
        p = f"model.layers.{layer}"
        shapes.update({f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,),
                       f"{p}.self_attn.q_proj.weight": (h, h), f"{p}.self_attn.k_proj.weight": (kv, h),
                       f"{p}.self_attn.v_proj.weight": (kv, h), f"{p}.self_attn.o_proj.weight": (h, h),
                       f"{p}.block_sparse_moe.gate.weight": (args.experts, h)})
        for e in range(args.experts):
            shapes.update({f"{p}.block_sparse_moe.experts.{e}.w1.weight": (i, h),
                           f"{p}.block_sparse_moe.experts.{e}.w3.weight": (i, h),
                           f"{p}.block_sparse_moe.experts.{e}.w2.weight": (h, i)})
    keys = list(shapes)
    per = -(-len(keys) // args.shards)
    weight_map, total = {}, 0
    generator = torch.Generator().manual_seed(0)
    for s in range(args.shards):
        name = f"model-{s + 1:05d}-of-{args.shards:05d}.safetensors"
        part = {k: (torch.randn(shapes[k], generator=generator) * 0.02).to(torch.bfloat16) for k in keys[s * per:(s + 1) * per]}
        total += sum(t.numel() * 2 for t in part.values())
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
        del part
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    config.save_pretrained(folder)
    return {"checkpoint_gib": round(total / 2**30, 2), "tensors": len(keys), "shards": args.shards}


LOADERS = {
    "bf16": "from transformers import AutoModelForCausalLM\n"
            "model = AutoModelForCausalLM.from_pretrained({folder!r}, dtype=torch.bfloat16)\n",
    "experts_4bit": "from align.train.config import ModelArguments\nfrom align.train.models import load_model\n"
                    "model, _ = load_model(ModelArguments(model_name_or_path={folder!r}, dtype='bfloat16', experts_4bit=True))\n",
}


def measure(kind: str, folder: Path) -> dict:
    code = ("import json, time, torch\nstart = time.perf_counter()\n" + LOADERS[kind].format(folder=str(folder))
            + "seconds = time.perf_counter() - start\n"
            "status = dict(l.split(':', 1) for l in open('/proc/self/status') if ':' in l)\n"
            "kib = lambda k: int(status[k].split()[0])\n"
            "params = sum(p.numel() for p in model.parameters())\n"
            "print(json.dumps({'peak_mib': round(kib('VmHWM') / 1024, 1), 'resident_mib': round(kib('VmRSS') / 1024, 1),"
            " 'seconds': round(seconds, 1)}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return {"variant": kind, **json.loads(proc.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=7168)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--keep", help="write the checkpoint here and keep it (default: a temporary folder)")
    args = parser.parse_args()
    folder = Path(args.keep or tempfile.mkdtemp(prefix="align-load-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        info = write_checkpoint(folder, args)
        print(json.dumps({"checkpoint": {**info, "hidden": args.hidden, "intermediate": args.intermediate,
                                         "layers": args.layers, "experts": args.experts,
                                         "written_s": round(time.perf_counter() - start, 1)}}), flush=True)
        rows = [measure(kind, folder) for kind in ("bf16", "experts_4bit")]
        for row in rows:
            print(json.dumps(row), flush=True)
        print(f"peak_load_ratio={rows[1]['peak_mib'] / rows[0]['peak_mib']:.3f}")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
