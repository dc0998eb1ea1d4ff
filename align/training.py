"""What every training stage does around its TRL trainer: load, adapt, train, save.

Stage entries (`align/sft`, `align/dpo`, `align/kto_nca`) call `run_stage` with their name; the registry
(`align/stages.py`) holds their TRL config class, trainer, columns and checks; nothing MoE-specific lives
in them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from align.config import parse_stage_args, resolved_config
from align.data import load_training_data
from align.errors import AlignError, warnings_unless_user_error
from align.models import check_model_args, load_model, load_tokenizer, resolve_model_path
from align.moe.fused_lora import apply_moe_lora_backend
from align.moe.lora import build_lora_config, format_trainable_report

logger = logging.getLogger("align")

RESOLVED_CONFIG_NAME = "align_config.yaml"


def _resume_value(value):
    """`--resume_from_checkpoint` alone (or `true`) means the last checkpoint in output_dir."""
    if value is None or value is False:
        return None
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "last"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "no", "0"):
        return None
    if isinstance(value, str) and not Path(value).is_dir():
        raise AlignError(f"resume_from_checkpoint: {value} is not a checkpoint folder")
    return value


def _has_checkpoint(output_dir: str) -> bool:
    return any(p.name.startswith("checkpoint-") for p in Path(output_dir).glob("checkpoint-*"))


def prepare_stage(stage: str, argv: list[str]):
    """Parse and validate the recipe, then load the data: everything that can fail before a model loads."""
    from align.extras import check_training_extras
    from align.preflight import check_eval_settings, preflight_trainer, quiet_libraries
    from align.stages import training_stage

    spec = training_stage(stage)
    with warnings_unless_user_error():
        model_args, data_args, args = parse_stage_args(spec.config_class(), argv)
        check = spec.check_function()
        if check is not None:
            check(model_args, data_args, args)
        check_model_args(model_args)
        source = getattr(args, "_align_recipe_source", "recipe")
        check_training_extras(args, source)
        check_eval_settings(args, source)
        resume = _resume_value(args.resume_from_checkpoint)
        if resume is True and not _has_checkpoint(args.output_dir):
            raise AlignError(f"resume_from_checkpoint: no checkpoint-* folder in {args.output_dir} to resume from")
        dataset = load_training_data(data_args, stage)
        with quiet_libraries():
            model_path = resolve_model_path(model_args.model_name_or_path)
            tokenizer = load_tokenizer(model_args.adapter_name_or_path or model_path)
            preflight_trainer(stage, model_args, args, dataset, tokenizer, model_path, source)
    return model_args, data_args, args, dataset, resume


def run_stage(stage: str, argv: list[str]):
    """Run one training stage from its recipe; returns the trainer (for tests and the pipeline).

    `--help` / `-h` prints every recipe key instead; `--accelerate_config NAME|FILE` validates the recipe,
    then runs the stage under `accelerate launch` with that config."""
    from align.stages import training_stage

    if "--help" in argv or "-h" in argv:
        from align.config import stage_help

        print(stage_help(stage))
        return 0
    if "--accelerate_config" in argv or any(a.startswith("--accelerate_config=") for a in argv):
        from align.launch import relaunch_under_accelerate

        return relaunch_under_accelerate(stage, argv)
    model_args, data_args, args, dataset, resume = prepare_stage(stage, argv)
    logger.info("%s: %d training rows", stage, len(dataset))

    model, model_path = load_model(model_args, gradient_checkpointing=args.gradient_checkpointing)
    tokenizer = load_tokenizer(model_args.adapter_name_or_path or model_path)
    from peft import PeftModel

    if not model_args.use_lora:
        if isinstance(model, PeftModel):
            raise AlignError("recipe: use_lora: false cannot start from adapter_name_or_path (merge it first)")
        peft_config = None
        logger.info("%s: full-parameter training (use_lora: false)", stage)
    elif isinstance(model, PeftModel):
        peft_config = None  # train the starting adapter; TRL keeps a frozen copy of it as the reference
        logger.info("%s: training adapter %s (lora_* recipe keys come from that adapter)", stage,
                    model_args.adapter_name_or_path)
    else:
        peft_config = build_lora_config(model_args, model)

    trainer_cls = training_stage(stage).trainer_class()
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                          peft_config=peft_config)
    fused = apply_moe_lora_backend(trainer.model, model_args.moe_lora_backend)
    if model_args.router_stats:
        trainer.enable_router_stats()
    if trainer.is_world_process_zero():
        print(f"[align] {stage}: {format_trainable_report(trainer.model)}", flush=True)
        print(f"[align] {stage}: moe_lora_backend={fused['backend']} fused expert stacks={fused['fused_experts']} "
              f"fused routers={fused['fused_routers']} fallbacks={len(fused['fallbacks'])}", flush=True)

    trainer.train(resume_from_checkpoint=resume)
    save_stage_outputs(trainer, tokenizer, model_args, data_args, args, stage)
    return trainer


def save_stage_outputs(trainer, tokenizer, model_args, data_args, args, stage: str) -> None:
    """Adapter, tokenizer, resolved config, log history and (on request) a merged model in output_dir."""
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = trainer.accelerator.unwrap_model(trainer.model)
    is_peft = hasattr(model, "peft_config")
    if is_peft:
        # The frozen "ref" copy only serves training; the published adapter is "default" alone.
        model.save_pretrained(out, selected_adapters=["default"])
    else:
        # TRL switches router logits on for the aux loss; saved on, they break cached generation later.
        model.config.output_router_logits = False
        model.save_pretrained(out)  # full-parameter training: a complete model folder
    tokenizer.save_pretrained(out)
    trainer.save_state()
    config = resolved_config(model_args, data_args, args)
    config["stage"] = stage
    config["base_model_path"] = (getattr(model.peft_config["default"], "base_model_name_or_path", None) if is_peft
                                 else model_args.model_name_or_path)
    (out / RESOLVED_CONFIG_NAME).write_text(yaml.safe_dump(config, sort_keys=False))
    if model_args.save_merged_model and is_peft:
        merged_dir = out / "merged"
        if "ref" in model.peft_config:
            model.delete_adapter("ref")
        merged = model.merge_and_unload()
        merged.save_pretrained(merged_dir)
        tokenizer.save_pretrained(merged_dir)
    print(f"[align] {stage}: adapter written to {out}", flush=True)
