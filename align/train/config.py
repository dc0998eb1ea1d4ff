"""Stage recipes: YAML mapped 1:1 onto our argument dataclasses plus TRL's config dataclass.

A recipe is flat: every key is a field of `ModelArguments`, `DataArguments` or the stage's TRL config
(`SFTConfig`, `DPOConfig`, `KTOConfig`), so every TRL option works without code here. We validate keys
and types ourselves before TRL sees them, because `TrlParser` copies YAML values through unchecked and
a typo would otherwise surface as a traceback an hour into a run.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from align.core.errors import AlignError, read_user_text


@dataclass
class ModelArguments:
    """Which model to load, how, and where LoRA goes."""

    model_name_or_path: str = field(
        default="tiny-mixtral",
        metadata={"help": "Hub id or local folder of a Mixtral-type MoE causal LM; `tiny-mixtral` is the embedded test model."},
    )
    gguf_file: str | None = field(
        default=None,
        metadata={"help": "A .gguf file inside model_name_or_path (a folder or hub repo), as transformers' gguf_file; "
                  "model_name_or_path may also point at the .gguf file itself. Quantised GGUF weights are "
                  "dequantised on load (needs the gguf extra)."},
    )
    adapter_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A PEFT adapter to start from (the SFT stage's output for DPO/KTO/NCA). The policy trains it; "
                  "the reference is a frozen copy of it."},
    )
    dtype: str = field(default="auto", metadata={"help": "auto, bfloat16, float16 or float32."})
    attn_implementation: str | None = field(default=None, metadata={"help": "eager, sdpa, flash_attention_2 ..."})
    experts_implementation: str | None = field(
        default=None, metadata={"help": "transformers experts kernel: eager, batched_mm or grouped_mm (default: model's)."}
    )
    use_lora: bool = field(
        default=True, metadata={"help": "Train LoRA adapters (default); false trains every weight (full fine-tuning)."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank, shared by every targeted group."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha; the update is scaled by alpha / r."})
    lora_attention: bool = field(default=True, metadata={"help": "LoRA on the attention projections."})
    lora_attention_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "Attention projection names to adapt when lora_attention is on."},
    )
    lora_experts: bool = field(default=True, metadata={"help": "LoRA on the fused expert stacks (gate_up_proj, down_proj)."})
    lora_router: bool = field(default=True, metadata={"help": "LoRA on the router weight (mlp.gate.weight)."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "PEFT's / TRL's target_modules: module names matched as PEFT does (a full name, or the end "
                  "of one: q_proj, self_attn.q_proj, model.layers.3.self_attn.q_proj), a regular expression "
                  "matched against full names, or all-linear. Names of the expert stacks or the router (mlp.experts, "
                  "gate, w1/w2/w3, gate_proj/up_proj/down_proj, router) mean their parameters. Given, it replaces "
                  "lora_attention / lora_experts / lora_router unless the recipe sets those too."},
    )
    lora_target_parameters: list[str] | None = field(
        default=None,
        metadata={"help": "PEFT's target_parameters: parameter names matched by the end of the full name "
                  "(gate_up_proj, experts.gate_up_proj, mlp.experts.gate_up_proj, "
                  "model.layers.3.mlp.experts.gate_up_proj, gate.weight). Given, it replaces lora_experts / "
                  "lora_router unless the recipe sets those too. What each spelling matched is printed at the start."},
    )
    moe_lora_backend: str = field(
        default="fused",
        metadata={"help": "fused: LoRA on experts/router without building W + B·A (align/moe/fused_lora.py); "
                  "peft: PEFT's ParamWrapper path. Modules the fused path can't serve fall back to peft, logged."},
    )
    experts_4bit: bool = field(
        default=False,
        metadata={"help": "QLoRA for MoE: quantise each fused expert stack to NF4 per expert (bitsandbytes' functional "
                  "API) and dequantise it one layer at a time inside the fused forward and backward "
                  "(align/moe/nf4.py). A folder saved by align.moe.nf4.save_quantized loads as it is."},
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "QLoRA: bitsandbytes NF4 for the nn.Linear layers (attention) plus experts_4bit for the "
                  "expert stacks, which bitsandbytes alone leaves in 16 bits."},
    )
    save_merged_model: bool = field(
        default=False, metadata={"help": "Also write the base with the adapter merged in, to <output_dir>/merged."}
    )
    router_stats: bool = field(
        default=True, metadata={"help": "Log per-layer expert load and router entropy at every logging step."}
    )
    lora_dropout: float = field(
        default=0.0, metadata={"help": "Dropout on the LoRA input of the attention projections. PEFT's expert and router "
                               "LoRA (target_parameters) take none: above 0 it needs lora_experts and lora_router off."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA: scale alpha / sqrt(r) instead of alpha / r."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of a hub model."})
    # (trust_remote_code and, for SFT, chat_template_path are TRL's own training keys: they work as in TRL)


@dataclass
class DataArguments:
    """Training data: one or several datasets, mixed by weight."""

    datasets: list[Any] = field(
        default_factory=list,
        metadata={"help": "List of datasets. Each is a path/hub id, or a mapping with `path` and optional `weight` "
                  "(fraction of rows to keep; above 1 repeats rows), `split` (default train), `name` (hub config)."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap on rows after mixing (for smoke runs)."})
    data_seed_mix: int = field(default=42, metadata={"help": "Seed of the subsampling and shuffling of the mixture."})


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def coerce(value: Any, tp: Any) -> Any:
    """Return `value` converted to the annotation `tp`, or raise TypeError with what was expected.

    Strings are converted where the conversion is unambiguous, because YAML reads `2e-5` as a string
    and command-line overrides are always strings.
    """
    origin = typing.get_origin(tp)
    if tp is Any or tp is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        if isinstance(value, str) and value == "null" and type(None) in options:
            return None  # `--key null` on the command line (but "none" stays a string: report_to uses it)
        # Try exact-type matches first so that "3" stays a str when str is allowed.
        for option in sorted((o for o in options if o is not type(None)), key=lambda o: o is not str):
            try:
                return coerce(value, option)
            except TypeError:
                continue
        raise TypeError(" or ".join(_type_name(o) for o in options if o is not type(None)))
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        raise TypeError(f"one of {list(allowed)}")
    if origin in (list, tuple) or tp in (list, tuple):
        (item_tp,) = typing.get_args(tp)[:1] or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",")] if value else []
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"a list of {_type_name(item_tp)}")
        return [coerce(v, item_tp) for v in value]
    if origin is dict or tp is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        if not isinstance(value, dict):
            raise TypeError("a mapping")
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value).value if isinstance(value, str) else tp(value)
        except ValueError:
            raise TypeError(f"one of {[m.value for m in tp]}") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        raise TypeError("true or false")
    if tp is int:
        if isinstance(value, bool):
            raise TypeError("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise TypeError("an integer")
    if tp is float:
        if isinstance(value, bool):
            raise TypeError("a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise TypeError("a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise TypeError("a string")
    return value


def _field_types(classes) -> dict[str, tuple[type, Any]]:
    out: dict[str, tuple[type, Any]] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init:
                out.setdefault(f.name, (cls, hints.get(f.name, Any)))
    return out


def parse_cli_overrides(argv: list[str], source: str = "command line") -> dict[str, Any]:
    """`--key value` pairs (and `--key=value`); a bare `--flag` means true; several values after one key
    (`--report_to wandb tensorboard`, as TRL's parser takes them) make a list."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise AlignError(f"{source}: unexpected argument '{token}' (options look like --key value)")
        key = token[2:]
        i += 1
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            values = []
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
            value = "true" if not values else values[0] if len(values) == 1 else values
        out[key.replace("-", "_")] = value
    return out


def load_recipe_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise AlignError(f"{path}: recipe file not found")
    text = read_user_text(path, "recipe file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise AlignError(f"{path}:{where} is not valid YAML ({' '.join(str(getattr(err, 'problem', err)).split())})") from None
    except RecursionError:
        raise AlignError(f"{path}: is nested too deeply to be a recipe") from None
    except ValueError as err:  # an integer of thousands of digits
        raise AlignError(f"{path}: not a usable recipe ({' '.join(str(err).split())[:120]})") from None
    if data is None or data == {}:
        raise AlignError(f"{path}: the recipe is empty (a recipe is a YAML mapping of key: value)")
    if not isinstance(data, dict):
        raise AlignError(f"{path}: a recipe must be a YAML mapping of key: value, not a {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise AlignError(f"{path}: key {bad[0]!r} is not a name (recipe keys are strings)")
    from align.core.leaks import restore

    return restore(path, data)  # the secrets a pipeline wrote masked and handed this process in memory


def _help_type(tp) -> str:
    """A field's annotation as a user reads it: `int`, `str | None`, `one of a, b`, `list of str`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_help_type(o) for o in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_help_type(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(str(m.value) for m in tp)
    if tp is type(None):
        return "null"
    return _type_name(tp)


def _help_default(f) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default.value if isinstance(f.default, enum.Enum) else f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "required"
    text = json_like(value)
    return text if len(text) <= 60 else text[:57] + "..."


def json_like(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def keys_help(groups: list[tuple[str, type]], width: int = 100) -> str:
    """Every field of each (title, dataclass) with its type, default and help text."""
    import textwrap

    lines = []
    for title, cls in groups:
        hints = typing.get_type_hints(cls)
        lines += ["", f"{title} ({cls.__module__}.{cls.__name__}):"]
        for f in dataclasses.fields(cls):
            if not f.init or f.name.startswith("_"):
                continue
            lines.append(f"  --{f.name}  {_help_type(hints.get(f.name, Any))}  (default: {_help_default(f)})")
            text = " ".join(str(f.metadata.get("help") or "").split())
            if text:
                lines += textwrap.wrap(text, width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def stage_help(stage: str) -> str:
    """`align STAGE --help`: every recipe key of the stage, generated from the dataclasses."""
    from align.stages import training_stage

    spec = training_stage(stage)
    config_cls = spec.config_class()
    head = [f"usage: align {stage} --config RECIPE.yaml [--key value ...] [--accelerate_config NAME|FILE]",
            "", f"{spec.summary}.",
            "A recipe is flat YAML: every key below goes in it as `key: value`, or on the command line as",
            "`--key value` (which overrides the recipe; several values make a list: --report_to wandb tensorboard).",
            "--accelerate_config NAME|FILE checks the recipe, then runs the stage under `accelerate launch`",
            "(names: recipes/accelerate/*.yaml, e.g. single_gpu, multi_gpu, zero3, fsdp2, cpu).",
            "Data columns: " + " or ".join("/".join(g) for g in spec.columns)
            + f", or the UltraInteract columns {'/'.join(spec.released)}.",
            "TRL / alignment-handbook names work too: " + ", ".join(f"{k} (= {v})" for k, v in TRL_NAMES.items()) + "."]
    return "\n".join(head) + "\n" + keys_help([("model", ModelArguments), ("data", DataArguments),
                                                  (f"training, TRL's {config_cls.__name__}", config_cls)])


# TRL's ModelConfig / ScriptArguments and alignment-handbook names -> ours (did-you-mean looks at both).
TRL_NAMES = {"use_peft": "use_lora", "torch_dtype": "dtype", "warmup_ratio": "warmup_steps",
             "max_seq_length": "max_length", "evaluation_strategy": "eval_strategy",
             "group_by_length": "train_sampling_strategy: group_by_length",
             "dataset_name": "datasets",
             "dataset_config": "datasets[].name", "dataset_train_split": "datasets[].split"}
ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def translate_trl_keys(values: dict[str, Any], source: str) -> dict[str, Any]:
    """A recipe written with TRL's / alignment-handbook's key names, as ours (see TRL_NAMES)."""
    out = dict(values)

    def take(trl_key, ours):
        if trl_key in out:
            if ours in out:
                raise AlignError(f"{source}: keys '{trl_key}' and '{ours}' say the same thing; keep one")
            out[ours] = out.pop(trl_key)

    take("use_peft", "use_lora")
    take("torch_dtype", "dtype")
    if "warmup_ratio" in out:
        ratio = out["warmup_ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise AlignError(f"{source}: key 'warmup_ratio' must be a fraction from 0 up to (not including) 1, got {ratio!r}")
    take("warmup_ratio", "warmup_steps")  # transformers 5: warmup_steps below 1 is a ratio
    take("max_seq_length", "max_length")  # older TRL
    take("evaluation_strategy", "eval_strategy")  # older transformers
    if "group_by_length" in out:  # older transformers: a flag for what is now one train_sampling_strategy
        grouped = out.pop("group_by_length")
        grouped = {"true": True, "false": False}.get(grouped.lower(), grouped) if isinstance(grouped, str) else grouped
        if not isinstance(grouped, bool):
            raise AlignError(f"{source}: key 'group_by_length' must be true or false, got {grouped!r}")
        strategy = out.get("train_sampling_strategy")
        if grouped and strategy is not None:
            raise AlignError(f"{source}: keys 'group_by_length' and 'train_sampling_strategy' say the same thing; keep one")
        if not grouped and strategy == "group_by_length":
            raise AlignError(f"{source}: group_by_length: false contradicts train_sampling_strategy: group_by_length")
        if grouped:
            out["train_sampling_strategy"] = "group_by_length"
    # lora_target_modules / lora_target_parameters are ours too, resolved against the model by PEFT's rules
    # (align/moe/lora.py); given, they say where LoRA goes, in place of the lora_* group switches' defaults.
    flags = {}
    for key in ("lora_target_modules", "lora_target_parameters"):
        if key in out and out[key] is None:  # `key: null`: not given
            del out[key]
    if "lora_target_modules" in out:
        modules = out["lora_target_modules"]
        if isinstance(modules, str):  # a regular expression (PEFT's string form), else names split on commas
            from align.moe.lora import is_regex

            modules = [modules] if is_regex(modules) else [m.strip() for m in modules.split(",") if m.strip()]
        if not isinstance(modules, list) or not modules or not all(isinstance(m, str) and m for m in modules):
            raise AlignError(f"{source}: key 'lora_target_modules' must be a list of module names, a regular "
                             "expression or all-linear")
        out["lora_target_modules"] = modules
        flags = {"lora_attention": False, "lora_experts": False, "lora_router": False}
    if "lora_target_parameters" in out:
        params = out["lora_target_parameters"]
        params = [p.strip() for p in params.split(",") if p.strip()] if isinstance(params, str) else params
        if not isinstance(params, list) or not params or not all(isinstance(p, str) and p for p in params):
            raise AlignError(f"{source}: key 'lora_target_parameters' must be a list of parameter names")
        out["lora_target_parameters"] = params
        flags.update({"lora_experts": False, "lora_router": False})
    for key, value in flags.items():
        out.setdefault(key, value)
    if "dataset_name" in out:
        if "datasets" in out:
            raise AlignError(f"{source}: keys 'dataset_name' and 'datasets' both name the data; keep one")
        entry = {"path": out.pop("dataset_name")}
        if "dataset_config" in out:
            entry["name"] = out.pop("dataset_config")
        if "dataset_train_split" in out:
            entry["split"] = out.pop("dataset_train_split")
        out["datasets"] = [entry]
    for key in ("dataset_config", "dataset_train_split"):
        if key in out:
            raise AlignError(f"{source}: key '{key}' goes with dataset_name (or put it in a datasets entry)")
    out.pop("dataset_test_split", None)  # serves TRL's in-training eval, which a stage does not run (see eval)
    if out.pop("dataset_streaming", False):
        raise AlignError(f"{source}: key 'dataset_streaming' is not supported (the stages load their data whole)")
    return out


# transformers 5.25 renamed gradient checkpointing (the old names still work, with a FutureWarning on every
# run, and TRL's configs set the old one by default); where the installed transformers has the new names,
# a recipe's old keys become them, so the run says nothing about names the recipe did not choose.
CHECKPOINTING_RENAMES = (("gradient_checkpointing", "activation_checkpointing"),
                         ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"))


def current_names(values: dict[str, Any], train_config_cls, source: str) -> dict[str, Any]:
    """A recipe's gradient_checkpointing(_kwargs) as activation_checkpointing(_kwargs), where the config has those."""
    names = {f.name for f in dataclasses.fields(train_config_cls)}
    out = dict(values)
    for old, new in CHECKPOINTING_RENAMES:
        if old in out and new in names:
            if new in out and out[new] != out[old]:
                raise AlignError(f"{source}: keys '{old}' and '{new}' say the same thing (the first is the old name "
                                 "of the second); keep one")
            out[new] = out.pop(old)
    return out


def checkpointing_default(values: dict[str, Any], train_config_cls) -> dict[str, Any]:
    """TRL's default for checkpointing (its configs default gradient_checkpointing to true), under the current name."""
    fields = {f.name: f for f in dataclasses.fields(train_config_cls)}
    if "activation_checkpointing" not in fields or "activation_checkpointing" in values:
        return {}
    old = fields.get("gradient_checkpointing")
    default = old.default if old is not None and old.default is not dataclasses.MISSING else None
    return {} if default is None else {"activation_checkpointing": bool(default)}


def validate_keys(values: dict[str, Any], classes, source: str) -> dict[str, Any]:
    """Check every key exists in one of `classes` and coerce its value to the field's type."""
    known = _field_types(classes)
    known_fields = {f.name: f for cls in reversed(list(classes)) for f in dataclasses.fields(cls)}
    out = {}
    for key, value in values.items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known) + list(TRL_NAMES), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise AlignError(f"{source}: unknown key '{key}'{hint}")
        _, tp = known[key]
        try:
            out[key] = coerce(value, tp)
        except TypeError as err:
            raise AlignError(f"{source}: key '{key}' must be {err}, got {type(value).__name__} {short_repr(value)}") from None
        check_range(key, out[key], known_fields[key].metadata, source)
    return out


def short_repr(value: Any, limit: int = 120) -> str:
    """repr for an error line, cut: a YAML alias bomb expands to gigabytes when printed whole."""
    import reprlib

    short = reprlib.Repr()
    short.maxstring, short.maxother, short.maxlist, short.maxdict, short.maxlevel = limit, limit, 8, 8, 3
    text = short.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_range(key: str, value: Any, metadata, source: str) -> None:
    """Numbers are finite (no nan / inf) and within a field's `range` metadata, (low, high), None = open."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and value != value:
        raise AlignError(f"{source}: key '{key}' must be a number, got nan")
    low, high = metadata.get("range", (None, None)) if metadata else (None, None)
    if "range" in (metadata or {}) and isinstance(value, float) and value in (float("inf"), float("-inf")):
        raise AlignError(f"{source}: key '{key}' must be finite, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"at most {high}" if low is None else f"between {low} and {high}"
        raise AlignError(f"{source}: key '{key}' must be {bounds}, got {value!r}")


# Ranges of the stage options (ours, and TRL / transformers options their own dataclasses take unchecked
# and only fail on deep inside training: a ZeroDivisionError at the first step, after the model has
# loaded). Not in the fields' metadata: TRL's parser hands metadata to argparse, which refuses unknown keys.
TRAINER_RANGES = {
    "lora_r": (1, 65536), "lora_alpha": (1, None), "max_train_samples": (1, None), "lora_dropout": (0.0, 0.99),
    "per_device_train_batch_size": (1, None), "per_device_eval_batch_size": (1, None),
    "gradient_accumulation_steps": (1, None), "max_length": (1, None), "max_prompt_length": (1, None),
    "max_completion_length": (1, None), "seed": (0, 2**32 - 1), "data_seed": (0, 2**32 - 1),
    "learning_rate": (0.0, None), "num_train_epochs": (0.0, None), "max_steps": (-1, None),
    "warmup_steps": (0.0, None), "weight_decay": (0.0, None),
    "max_grad_norm": (0.0, None), "logging_steps": (0.0, None), "save_steps": (0.0, None),
    "save_total_limit": (0, None), "beta": (0.0, None), "router_aux_loss_coef": (0.0, None),
    "dataloader_num_workers": (0, None), "desirable_weight": (0.0, None), "undesirable_weight": (0.0, None),
}


def cpu_processes_defaults(values: dict) -> dict:
    """On a machine without a GPU the stage trains on the CPU (transformers refuses bf16 there unless told
    use_cpu); several processes (an accelerate launch) reduce over gloo (otherwise they would train one
    model each). Keys the recipe sets are kept."""
    import torch

    if torch.cuda.is_available() or getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return {}
    defaults = [("use_cpu", True)] + ([("ddp_backend", "gloo")] if int(os.environ.get("WORLD_SIZE", "1")) > 1 else [])
    return {k: v for k, v in defaults if k not in values}


def parse_stage_args(train_config_cls, argv: list[str]):
    """Parse `--config FILE` plus `--key value` overrides into (ModelArguments, DataArguments, train config).

    Unknown keys, wrong types and TRL's own validation errors become one-line AlignErrors.
    """
    argv = list(argv)
    recipe: dict[str, Any] = {}
    source = "command line"
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise AlignError("command line: --config needs a recipe file")
        source = argv[i + 1]
        recipe = load_recipe_file(source)
        del argv[i : i + 2]
    return parse_stage_recipe(train_config_cls, recipe, source, parse_cli_overrides(argv))


def parse_stage_recipe(train_config_cls, recipe: dict[str, Any], source: str, overrides: dict | None = None,
                       apply_env: bool = True):
    """A recipe mapping (plus command-line overrides) into the three dataclasses; `env:` sets variables
    unless apply_env is false (a check that must change nothing)."""
    from trl import TrlParser

    recipe = dict(recipe)
    env = recipe.pop("env", None) or {}
    if not isinstance(env, dict):
        raise AlignError(f"{source}: key 'env' must be a mapping of variable: value")
    for name, value in env.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise AlignError(f"{source}: env: {short_repr(name)} is not a variable name")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)) or "\0" in str(value):
            raise AlignError(f"{source}: env: {name} must be a string or a number")
    if apply_env:
        for name, value in env.items():
            os.environ[str(name)] = str(value)

    classes = (ModelArguments, DataArguments, train_config_cls)
    values = current_names(validate_keys(translate_trl_keys(recipe, source), classes, source), train_config_cls, source)
    values.update(current_names(validate_keys(translate_trl_keys(overrides or {}, "command line"), classes,
                                              "command line"), train_config_cls, "command line"))
    values.update(checkpointing_default(values, train_config_cls))
    values.update(cpu_processes_defaults(values))
    names = {f.name for f in dataclasses.fields(train_config_cls)}
    if "assistant_only_loss" in names and not {"assistant_only_loss", "completion_only_loss"} & set(values):
        values["assistant_only_loss"] = True  # our default (TRL's is false): multi-turn SFT trains on assistant turns
    if values.get("output_dir") in (None, ""):
        raise AlignError(f"{source}: key 'output_dir' is required")
    if Path(values["output_dir"]).exists() and not Path(values["output_dir"]).is_dir():
        raise AlignError(f"{source}: key 'output_dir': {values['output_dir']} is a file, not a folder")
    for key, (low, high) in TRAINER_RANGES.items():
        if key in values:
            check_range(key, values[key], {"range": (low, high)}, source)

    parser = TrlParser(classes)
    parser.set_defaults_with_config(**values)
    try:
        model_args, data_args, train_args = parser.parse_args_into_dataclasses(args=[])
    except (ValueError, TypeError) as err:
        raise AlignError(f"{source}: {' '.join(str(err).split())}") from None
    train_args._align_recipe_source = source  # noqa: SLF001 - kept for the resolved-config dump
    hold_secrets(train_args)
    return model_args, data_args, train_args


def hold_secrets(train_args) -> None:
    """Take the credentials off the training arguments before a Trainer pickles them (training_args.bin in
    the output folder and every checkpoint): a key that holds one (hub_token) is kept in this process's
    memory only (align.core.leaks.held: the stage's own push uses it) and set to None; a credential-looking value
    in any other option (no training option needs one) is masked. docs/secrets.md says why."""
    from align.core.leaks import credential_in, hold, mask_text, secret_key

    for f in dataclasses.fields(train_args):
        value = getattr(train_args, f.name, None)
        if secret_key(f.name):
            given = isinstance(value, (str, int)) and not isinstance(value, bool) and str(value) != ""
            hold(train_args, f.name, str(value) if given else None)
            if given:
                setattr(train_args, f.name, None)
        elif isinstance(value, str) and credential_in(value):
            setattr(train_args, f.name, mask_text(value))
        elif isinstance(value, list) and any(isinstance(v, str) and credential_in(v) for v in value):
            setattr(train_args, f.name, [mask_text(v) if isinstance(v, str) else v for v in value])


def resolved_config(model_args, data_args, train_args) -> dict[str, Any]:
    """Every option the stage ran with, as plain YAML-able values (written next to the adapter), with its
    credentials masked (align.core.leaks.mask; a hub_token the stage holds in memory reads as masked)."""
    from align.core.leaks import MASK, held, mask, secret_key

    def plain(obj):
        out = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if isinstance(v, enum.Enum):
                v = v.value
            try:
                yaml.safe_dump(v)
            except yaml.YAMLError:
                v = str(v)
            out[f.name] = v
        return out

    training = {k: v for k, v in plain(train_args).items() if not k.startswith("_")}
    training.update({k: MASK for k, v in training.items() if v is None and secret_key(k) and held(train_args, k) is not None})
    return mask({"model": plain(model_args), "data": plain(data_args), "training": training})[0]
