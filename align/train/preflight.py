"""Catch what TRL's trainer would only refuse in its `__init__`, before the real model loads.

Some recipe mistakes surface only when the trainer is built (an eval strategy without eval data, an
option TRL's trainer refuses for this data or model), which is after the model has loaded: minutes on a
Mixtral. Here the stage's trainer is built once against a stand-in: the real model's architecture
shrunk to one small layer (same vocabulary, same kind of experts and router), the recipe's LoRA targets,
the first rows of the real data and the real tokenizer. A ValueError or TypeError there is the recipe's
mistake and becomes the one-line error; anything else is left for the real run to report.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile

from align.core.errors import AlignError

logger = logging.getLogger("align")

EVAL_KEYS = ("load_best_model_at_end", "metric_for_best_model")


def check_eval_settings(args, source: str) -> None:
    """The stages train without eval data (the pipeline's eval stage evaluates): asking for evaluation
    during training is a mistake to name now, not inside Trainer.__init__."""
    strategy = getattr(args.eval_strategy, "value", args.eval_strategy)
    if strategy not in (None, "no"):
        raise AlignError(f"{source}: key 'eval_strategy' is {strategy!r}, but this stage has no eval data "
                         "(set eval_strategy: no; the pipeline's eval stage evaluates the models)")
    if getattr(args, "do_eval", False):
        raise AlignError(f"{source}: key 'do_eval' is true, but this stage has no eval data")
    if getattr(args, "load_best_model_at_end", False):
        raise AlignError(f"{source}: key 'load_best_model_at_end' needs evaluation during training, "
                         "which this stage does not run")


def check_stage_settings(spec, model_args, data_args, args, source: str, produced=None) -> None:
    """The recipe checks a stage makes before loading anything, which the pipeline's --check makes too: the
    stage's own, the model's and adapter's, the extras' and the eval settings'. `produced(path)`: a path an
    earlier pipeline stage makes, not there to check yet."""
    from align.train.extras import check_training_extras
    from align.train.models import check_model_args

    check = spec.check_function()
    if check is not None:
        check(model_args, data_args, args)
    check_model_args(model_args)
    check_training_extras(args, source)
    check_eval_settings(args, source)
    check_stage_model(model_args, args, source, produced)


def check_stage_model(model_args, args, source: str, produced=None) -> None:
    """The model and starting adapter are what they say (align/train/model_check.py), and a dense model is not asked
    for expert or router LoRA: before the data is prepared."""
    from align.train.model_check import check_adapter, check_experts, check_model, has_tokenizer

    name, adapter = model_args.model_name_or_path, model_args.adapter_name_or_path
    if produced is not None and produced(name):  # made by an earlier stage: checked when that stage has run
        if adapter:
            check_adapter(adapter, None, "adapter_name_or_path", source)
        return
    adapter_tokenizer = bool(adapter) and has_tokenizer(adapter)
    model = check_model(name, "model_name_or_path", source, tokenizer=not adapter_tokenizer,
                        revision=getattr(model_args, "model_revision", None),
                        trust_remote_code=getattr(args, "trust_remote_code", False),
                        gguf_file=getattr(model_args, "gguf_file", None))
    if adapter:
        check_adapter(adapter, model, "adapter_name_or_path", source)
    elif model_args.use_lora:
        check_experts(model, model_args.lora_experts, model_args.lora_router, source)


def check_lora_targets(model_args, model_path: str, source: str = "recipe") -> None:
    """The recipe's lora_target_modules / lora_target_parameters against the real architecture, built on the
    meta device (no weights, no memory): a spelling that matches nothing is named before anything loads,
    and before `accelerate launch` starts its processes."""
    if not model_args.use_lora or model_args.adapter_name_or_path:
        return
    if not (model_args.lora_target_modules or model_args.lora_target_parameters):
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from align.moe.lora import resolve_lora_targets

    try:
        config = AutoConfig.from_pretrained(model_path)
        config.__dict__.pop("align_nf4_experts", None)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as err:  # an architecture we cannot build here: the real load checks the targets
        logger.debug("lora target check skipped (%s)", err)
        return
    resolve_lora_targets(model_args, skeleton, source=source)


def _stand_in_config(model_path: str):
    from transformers import AutoConfig

    from align.train.models import gguf_location

    folder, gguf = gguf_location(model_path)
    config = copy.deepcopy(AutoConfig.from_pretrained(folder, **gguf))
    config.__dict__.pop("quantization_config", None)
    shrink = {"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 32, "moe_intermediate_size": 32,
              "shared_expert_intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "max_window_layers": 1}
    for key, value in shrink.items():
        if hasattr(config, key):
            setattr(config, key, value)
    if hasattr(config, "layer_types") and isinstance(config.layer_types, list):
        config.layer_types = config.layer_types[:1]
    config.__dict__.pop("align_nf4_experts", None)
    return config


@contextlib.contextmanager
def quiet_libraries():
    """No progress bars and no library log lines inside: a one-line error must stay one line."""
    import datasets
    import transformers

    bars = datasets.is_progress_bar_enabled()
    verbosity = transformers.logging.get_verbosity()
    datasets.disable_progress_bars()
    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
        if bars:
            datasets.enable_progress_bars()


def preflight_trainer(stage: str, model_args, args, dataset, tokenizer, model_path: str, source: str) -> None:
    """Build the stage's trainer on a stand-in model and the first rows; a refusal is the one-line error."""
    import torch
    from transformers import AutoModelForCausalLM

    from align.moe.lora import build_lora_config
    from align.stages import training_stage

    if getattr(args, "deepspeed", None):
        return  # ZeRO-3 partitions whatever is built under it: no stand-in there
    try:
        with torch.random.fork_rng(devices=[]):
            stand_in = AutoModelForCausalLM.from_config(_stand_in_config(model_path), dtype=torch.float32)
    except Exception as err:  # an architecture we cannot shrink: nothing to say before the real load
        logger.debug("preflight skipped (%s)", err)
        return
    peft_config = None
    if model_args.use_lora:
        from align.moe.lora import resolve_lora_targets

        targets = resolve_lora_targets(model_args, stand_in, strict=False)  # one layer: model.layers.3... is not in it
        if not (targets.modules or targets.parameters) and (model_args.lora_target_modules or model_args.lora_target_parameters):
            return  # spellings of layers the stand-in lacks (check_lora_targets held them against the real model)
        peft_config = build_lora_config(model_args, stand_in, targets)
    rows = dataset.select(range(min(len(dataset), 8)))
    with tempfile.TemporaryDirectory(prefix="align-preflight-") as tmp:
        trial = copy.copy(args)
        trial.output_dir, trial.report_to, trial.push_to_hub = tmp, [], False
        trial.logging_dir = tmp
        trainer = None
        try:
            trainer = training_stage(stage).trainer_class()(model=stand_in, args=trial, train_dataset=rows,
                                                            processing_class=tokenizer, peft_config=peft_config)
        except (ValueError, TypeError) as err:
            raise AlignError(f"{source}: {' '.join(str(err).split())[:400]}") from None
        except Exception as err:  # not a recipe mistake we can name; the real run will tell
            logger.debug("preflight inconclusive (%s: %s)", type(err).__name__, err)
        finally:
            del trainer
