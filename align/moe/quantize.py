"""`align quantize MODEL OUTPUT`: write a base whose expert stacks are NF4 (QLoRA for MoE), once.

A command above both the model loaders (`align/train/models.py`) and the NF4 format (`nf4.py`); it was
`align.moe.nf4.quantize_main`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from align.moe.nf4 import find_experts, is_quantized_checkpoint, nf4_stack_count, save_quantized


def main(argv: list[str] | None = None) -> int:
    """`align quantize MODEL OUTPUT`: write a base whose expert stacks are NF4, once; recipes then name
    OUTPUT as model_name_or_path and load it without quantising (or dequantising) anything."""
    from align.core.errors import AlignError, ArgumentParser

    parser = ArgumentParser(prog="align quantize", description=main.__doc__)
    parser.add_argument("model", help="hub id or folder of a Mixtral-type model (or tiny-mixtral)")
    parser.add_argument("output", help="folder to write (config, tokenizer, model.safetensors); must be new or empty")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="dtype of the non-expert weights and of the dequantised experts (default bfloat16)")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise AlignError(f"output: {output} exists and is not an empty folder")
    from align.train.model_check import check_model
    from align.train.models import load_tokenizer, resolve_model_path

    check_model(args.model, "model", tokenizer=False)  # config and weights there, before anything loads
    path = resolve_model_path(args.model)
    if Path(path).is_dir():
        if is_quantized_checkpoint(path):
            raise AlignError(f"model: {args.model} is already quantised (written by align quantize)")
    from transformers import AutoConfig, AutoModelForCausalLM

    try:  # the architecture alone, on the meta device: a model without fused experts is refused unloaded
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    except (OSError, ValueError, KeyError) as err:
        raise AlignError(f"model: {args.model} could not be loaded ({' '.join(str(err).split())[:200]})") from None
    if not any(True for _ in find_experts(skeleton)):
        raise AlignError(f"model: {args.model} ({type(skeleton).__name__}) has no fused expert stacks to quantise")
    del skeleton
    check_model(args.model, "model", tokenizer=True)  # OUTPUT gets the tokenizer too
    from align.train.models import load_with_nf4_experts

    try:  # each expert quantised as its shard is read: the 16-bit model is never in memory
        model = load_with_nf4_experts(path, {"dtype": getattr(torch, args.dtype)})
    except (OSError, ValueError) as err:
        raise AlignError(f"model: {args.model} could not be loaded ({' '.join(str(err).split())[:200]})") from None
    count = nf4_stack_count(model)
    if not count:
        raise AlignError(f"model: {args.model} has no fused expert stacks to quantise")
    tmp = output.with_name(f".{output.name}.partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    save_quantized(model, tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    load_tokenizer(path).save_pretrained(tmp)
    if output.exists():
        output.rmdir()
    tmp.replace(output)  # a kill mid-write leaves only the .partial folder, never a half-written OUTPUT
    print(f"[align] quantize: {count} expert stacks in NF4 written to {output}")
    return 0
