"""Load a Mixtral-type model and its tokenizer the way a recipe asks, through `from_pretrained`."""

from __future__ import annotations

import logging
from pathlib import Path

from align.train.data import local_form
from align.core.errors import AlignError
from align.core.tiny_mixtral import MIXTRAL_CHAT_TEMPLATE

DTYPES = ("auto", "bfloat16", "float16", "float32")

from align.train.model_check import PACKAGED_MODELS, packaged_model_path  # noqa: E402,F401  (re-exported)


def resolve_model_path(name_or_path: str, gguf_file: str | None = None) -> str:
    """`tiny-mixtral` / `tiny-mixtral-char` (optionally `:SEED`) become their folders; anything else passes.
    With `gguf_file` (transformers' key: a file inside the folder or hub repo) the result is FOLDER/FILE.gguf,
    the form a `.gguf` path takes everywhere here (see gguf_location)."""
    from align.train.model_check import tiny_path

    if gguf_file:
        if not str(gguf_file).lower().endswith(".gguf"):
            raise AlignError(f"recipe: key 'gguf_file' must name a .gguf file, got {gguf_file!r}")
        name_or_path = f"{str(name_or_path).rstrip('/')}/{gguf_file}"
    if name_or_path in PACKAGED_MODELS:
        return packaged_model_path(name_or_path)
    tiny = tiny_path(name_or_path)
    if tiny is not None:
        return tiny
    path = Path(name_or_path).expanduser()
    if local_form(name_or_path) and not path.exists():
        raise AlignError(f"model_name_or_path: {name_or_path} not found")
    return str(path) if path.exists() else name_or_path


def gguf_location(model_path: str) -> tuple[str, dict]:
    """A GGUF model (`FOLDER/NAME.gguf`, a local file or a file in a hub repo) -> (FOLDER, {"gguf_file": NAME}),
    what transformers' from_pretrained takes; anything else -> (model_path, {})."""
    path = str(model_path)
    if not path.lower().endswith(".gguf"):
        return path, {}
    folder, _, name = path.rstrip("/").rpartition("/")
    return folder or ".", {"gguf_file": name}


def describe_gguf(model_path: str) -> str:
    """One line on what loading a GGUF file does: transformers dequantises its tensors (Q4_1, Q8_0 ...) to
    the dtype asked for; the weights are no longer quantised after loading."""
    from collections import Counter

    folder, kwargs = gguf_location(model_path)
    file = Path(folder) / kwargs["gguf_file"]
    if not file.is_file():
        return f"{model_path}: a GGUF file (from the Hub); transformers dequantises it on load"
    try:
        import gguf
    except ImportError:
        raise AlignError(f"model_name_or_path: {model_path} is a GGUF file, which needs the gguf package: "
                         'pip install "moe-align[gguf]"') from None
    types = Counter(t.tensor_type.name for t in gguf.GGUFReader(str(file)).tensors)
    quantised = {k: v for k, v in types.items() if k not in ("F32", "F16", "BF16")}
    kinds = ", ".join(f"{k} x{v}" for k, v in types.most_common())
    if quantised:
        return f"{file.name}: a quantised GGUF file ({kinds} tensors), dequantised on load"
    return f"{file.name}: a GGUF file ({kinds} tensors), loaded as is"


def check_model_args(model_args) -> None:
    """Validation that needs no model: runs before anything heavy is loaded."""
    if not str(model_args.model_name_or_path or "").strip():
        raise AlignError("recipe: key 'model_name_or_path' is empty")
    if model_args.dtype not in DTYPES:
        raise AlignError(f"recipe: key 'dtype' must be one of {', '.join(DTYPES)}, got {model_args.dtype!r}")
    impl = model_args.experts_implementation
    if impl is not None and impl not in ("eager", "batched_mm", "grouped_mm"):
        raise AlignError(f"recipe: key 'experts_implementation' must be eager, batched_mm or grouped_mm, got {impl!r}")
    if model_args.moe_lora_backend not in ("fused", "peft"):
        raise AlignError(f"recipe: key 'moe_lora_backend' must be fused or peft, got {model_args.moe_lora_backend!r}")
    if model_args.lora_r <= 0:
        raise AlignError(f"recipe: key 'lora_r' must be positive, got {model_args.lora_r}")
    if model_args.experts_4bit or model_args.load_in_4bit:
        key = "load_in_4bit" if model_args.load_in_4bit else "experts_4bit"
        if not model_args.use_lora:
            raise AlignError(f"recipe: {key}: true trains LoRA on a frozen 4-bit base; it needs use_lora: true")
        if model_args.save_merged_model:
            raise AlignError(f"recipe: {key}: true cannot save_merged_model (merging into 4-bit weights loses the "
                             "update); merge the adapter into the 16-bit base instead")


def load_tokenizer(model_path: str, chat_template_path: str | None = None, revision: str | None = None,
                   trust_remote_code: bool = False, default_template: bool = True):
    """The tokenizer of a folder, hub id or FOLDER/NAME.gguf, with a pad token; a tokenizer without a chat
    template gets Mixtral's unless default_template is false."""
    from transformers import AutoTokenizer

    kwargs = {k: v for k, v in (("revision", revision), ("trust_remote_code", trust_remote_code)) if v}
    model_path, gguf = gguf_location(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path, **kwargs, **gguf)
    if chat_template_path:
        tokenizer.chat_template = read_chat_template(chat_template_path)
    if tokenizer.chat_template is None and default_template:
        tokenizer.chat_template = MIXTRAL_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def read_chat_template(path: str) -> str:
    """A Jinja template file, or a tokenizer folder's chat_template.jinja (TRL's chat_template_path)."""
    from align.core.errors import read_user_text

    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "chat_template.jinja"
    return read_user_text(p, "chat template")


def _from_pretrained(model_path: str, **kwargs):
    """`from_pretrained`, or our loader for a base saved with NF4 expert stacks (align.moe.nf4). A GGUF file
    (FOLDER/NAME.gguf) loads through transformers' gguf_file, dequantised, and says so in one log line.
    transformers' own bars ("Loading weights", "Converting and de-quantizing GGUF tensors") are off while it
    loads: only align writes to the terminal, and in a stage's log.txt each bar was a few hundred updates."""
    import transformers

    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        return _load_pretrained(model_path, **kwargs)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()


def _load_pretrained(model_path: str, **kwargs):
    from transformers import AutoModelForCausalLM

    from align.moe.nf4 import is_quantized_checkpoint, load_quantized

    folder, gguf = gguf_location(model_path)
    if gguf:
        if "quantization_config" in kwargs:
            raise AlignError(f"model_name_or_path: {model_path} is a GGUF file; load_in_4bit does not apply to it")
        logging.getLogger("align.train.models").info(describe_gguf(model_path))
        import functools

        import transformers.modeling_gguf_pytorch_utils as gguf_utils

        shown = gguf_utils.tqdm  # its bar is tqdm's own, which transformers' switch does not reach
        gguf_utils.tqdm = functools.partial(shown, disable=True)
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, **gguf, **kwargs)
        finally:
            gguf_utils.tqdm = shown
        # the weights are plain tensors now: a saved copy must not claim to be a GGUF file
        model.config.__dict__.pop("quantization_config", None)
        return model
    if is_quantized_checkpoint(model_path):
        if "quantization_config" in kwargs:
            raise AlignError(f"model_name_or_path: {model_path} was saved by `align quantize` (NF4 experts); "
                             "use experts_4bit: true, not load_in_4bit")
        dtype = kwargs.pop("dtype", None)
        return load_quantized(model_path, dtype=None if dtype == "auto" else dtype, **kwargs)
    return AutoModelForCausalLM.from_pretrained(model_path, **kwargs)


def load_for_generation(model_path: str, adapter: str | None = None, dtype: str = "float32"):
    """A model (plus an optional adapter) in eval mode for sampling, with router-logit output off (the
    aux-loss code path breaks cached, padded generation). dtype "auto" keeps the checkpoint's."""
    import torch

    model = _from_pretrained(resolve_model_path(model_path), dtype="auto" if dtype == "auto" else getattr(torch, dtype))
    model.config.output_router_logits = False
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        if not getattr(model.config, "quantization_config", None):
            # the adapter folded into the weights: generation runs at the base model's speed (LoRA on 30 layers'
            # attention, experts and router took twice as long per token on the SmolLM2 MoE, same greedy tokens);
            # a 4-bit base keeps the adapter apart (merging into NF4 would round it away)
            model = model.merge_and_unload()
    return model.eval()


def load_with_nf4_experts(model_path: str, kwargs: dict):
    """experts_4bit: each expert is quantised as its shard is read (align/moe/stream_load.py); a base saved
    by `align quantize` loads as it is. A hub id is downloaded first (its safetensors and config only)."""
    import torch

    from align.moe.nf4 import is_quantized_checkpoint
    from align.moe.stream_load import load_nf4_streaming

    folder = Path(model_path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(model_path, allow_patterns=["*.safetensors", "*.json", "tokenizer*"]))
    if is_quantized_checkpoint(folder):
        return _from_pretrained(str(folder), **kwargs)
    dtype = kwargs.get("dtype")
    if dtype in (None, "auto"):
        import json

        name = json.loads((folder / "config.json").read_text()).get("dtype") or \
            json.loads((folder / "config.json").read_text()).get("torch_dtype") or "bfloat16"
        dtype = getattr(torch, name)
    overrides = {k: kwargs[k] for k in ("attn_implementation", "experts_implementation") if k in kwargs}
    return load_nf4_streaming(folder, dtype=dtype, **overrides)


def load_model(model_args, gradient_checkpointing: bool = False, trust_remote_code: bool = False):
    """The base model (plus the starting adapter, trainable, when the recipe names one)."""
    import torch

    model_path = resolve_model_path(model_args.model_name_or_path, getattr(model_args, "gguf_file", None))
    kwargs = {}
    if model_args.dtype != "auto":
        kwargs["dtype"] = getattr(torch, model_args.dtype)
    else:
        kwargs["dtype"] = "auto"
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if model_args.experts_implementation:
        kwargs["experts_implementation"] = model_args.experts_implementation
    if getattr(model_args, "model_revision", "main") != "main":
        kwargs["revision"] = model_args.model_revision
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    if model_args.load_in_4bit:
        from transformers import BitsAndBytesConfig

        compute = kwargs["dtype"] if kwargs["dtype"] != "auto" else torch.bfloat16
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    try:
        if model_args.experts_4bit and not model_args.load_in_4bit and not gguf_location(model_path)[1]:
            model = load_with_nf4_experts(model_path, kwargs)  # never the whole 16-bit model in memory
        else:
            model = _from_pretrained(model_path, **kwargs)
    except OSError as err:
        raise AlignError(f"model_name_or_path: {model_args.model_name_or_path} could not be loaded ({err})") from None
    if model_args.experts_4bit or model_args.load_in_4bit:
        from align.moe.nf4 import nf4_stack_count, quantize_experts_nf4

        quantize_experts_nf4(model)
        if not nf4_stack_count(model):
            raise AlignError(f"model_name_or_path: {model_args.model_name_or_path} has no fused expert stacks to "
                             "quantise (experts_4bit)")
    if gradient_checkpointing:
        model.config.use_cache = False
    if model_args.adapter_name_or_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, model_args.adapter_name_or_path, is_trainable=True)
    return model, model_path
