"""What every training stage does around its TRL trainer: load, adapt, train, save.

Stage entries (`align/sft`, `align/dpo`, `align/kto_nca`) call `run_stage` with their name; the registry
(`align/stages.py`) holds their TRL config class, trainer, columns and checks; nothing MoE-specific lives
in them.
"""

from __future__ import annotations

import logging
import os
import signal
import warnings
from pathlib import Path

import yaml

from align.train.config import parse_stage_args, resolved_config
from align.train.data import load_training_data
from align.core.errors import AlignError, warnings_unless_user_error
from align.train.launch import check_sharding
from align.train.models import load_model, load_tokenizer, resolve_model_path
from align.moe.fused_lora import apply_moe_lora_backend
from align.moe.lora import build_lora_config, format_targets_report, format_trainable_report, resolve_lora_targets

logger = logging.getLogger("align")

# transformers 5.25 renamed gradient checkpointing to activation checkpointing; recipes' old keys are mapped to
# the new ones (align/train/config.py), but PEFT and TRL still read the model's old `is_gradient_checkpointing`, whose
# FutureWarning would then show on every run about a name no recipe chose.
warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing` is deprecated", category=FutureWarning)

RESOLVED_CONFIG_NAME = "align_config.yaml"


def _resume_value(value, output_dir: str):
    """`--resume_from_checkpoint` alone (or `true`) means the newest whole checkpoint in output_dir (one cut
    off by a kill is skipped); a folder must be a whole checkpoint."""
    from align.train.checkpoints import checkpoint_problem, newest_checkpoint

    if value is None or value is False:
        return None
    if value is True or isinstance(value, str) and value.lower() in ("true", "yes", "1", "last"):
        newest, skipped = newest_checkpoint(output_dir)
        if newest is None:
            raise AlignError(f"resume_from_checkpoint: no whole checkpoint-* folder in {output_dir} to resume from"
                             + (f" ({'; '.join(skipped)})" if skipped else ""))
        for note in skipped:
            logger.warning("resume_from_checkpoint: %s", note)
        return str(newest)
    if isinstance(value, str) and value.lower() in ("false", "no", "0"):
        return None
    if not Path(value).is_dir():
        raise AlignError(f"resume_from_checkpoint: {value} is not a checkpoint folder")
    problem = checkpoint_problem(Path(value))
    if problem:
        raise AlignError(f"resume_from_checkpoint: {value} is not a whole checkpoint ({problem})")
    return value


def prepare_stage(stage: str, argv: list[str], preflight: bool = True):
    """Parse and validate the recipe, then load the data: everything that can fail before a model loads
    (`preflight`: and the trainer on a stand-in model, which the launcher of several processes leaves to
    them: it would hold a GPU for the whole run)."""
    from align.train.preflight import check_lora_targets, check_stage_settings, preflight_trainer, quiet_libraries
    from align.stages import training_stage

    spec = training_stage(stage)
    with warnings_unless_user_error():
        model_args, data_args, args = parse_stage_args(spec.config_class(), argv)
        source = getattr(args, "_align_recipe_source", "recipe")
        check_stage_settings(spec, model_args, data_args, args, source)
        with quiet_libraries():
            check_lora_targets(model_args, resolve_model_path(model_args.model_name_or_path, model_args.gguf_file), source)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        sharded = [name for name, var in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
                   if os.environ.get(var, "").lower() == "true"]
        if check_sharding(sharded[0] if sharded else None, source):
            from align.train import cpu_fsdp

            cpu_fsdp.enable()  # sharded over gloo on the CPUs (a check of sharded training, not for speed)
        if world > 1 and args.world_size != world:
            raise AlignError(f"{source}: {world} processes were launched, but they would not train together "
                             f"(distributed: {args.parallel_mode.value}); an FSDP or DeepSpeed config needs GPUs: on a "
                             "CPU machine launch with recipes/accelerate/multi_cpu.yaml")
        from align.core import lifecycle

        if os.environ.get("RANK", "0") == "0":  # one writer per output folder (a launching ancestor may hold it)
            lifecycle.lock_folder(args.output_dir, f"align {stage}")
        try:
            resume = _resume_value(args.resume_from_checkpoint, args.output_dir)
            dataset = load_training_data(data_args, stage)
            with quiet_libraries():
                model_path = resolve_model_path(model_args.model_name_or_path, model_args.gguf_file)
                tokenizer = _stage_tokenizer(model_args, args, model_path)
                dataset = render_stage_rows(stage, dataset, tokenizer, args, _template_source(model_args, args, model_path))
                if preflight:
                    preflight_trainer(stage, model_args, trainer_args(args), dataset, tokenizer, model_path, source)
        except BaseException:
            lifecycle.unlock_folder(args.output_dir)
            raise
    return model_args, data_args, args, dataset, resume


def _template_source(model_args, args, model_path: str) -> str:
    """Where the stage's chat template comes from, for an error about it."""
    return getattr(args, "chat_template_path", None) or model_args.adapter_name_or_path or model_path


def render_stage_rows(stage: str, dataset, tokenizer, args, source: str):
    """The rows as the model's own chat template renders them (align/train/chat.py). SFT with assistant_only_loss on a
    template TRL cannot mask (no {% generation %} markers, not one TRL patches): every row tokenized here, each
    assistant turn cut out and checked, and TRL trains on those masks (`trainer_args` then turns its own
    assistant_only_loss off); other SFT rows: a system message placed as the template places it. Preference
    stages: each prompt's system message placed so, and the template checked to render a prompt the same with
    and without its completions."""
    from align.train import chat

    if stage == "sft":
        args._align_own_masks = False
        if getattr(args, "assistant_only_loss", False) and chat.needs_own_masks(tokenizer):
            args._align_own_masks = True
            return chat.sft_rows(dataset, tokenizer, source, getattr(args, "completion_only_loss", None),
                                 getattr(args, "dataset_num_proc", None))
        return chat.placed_rows(dataset, tokenizer)
    completions = tuple(c for c in ("chosen", "rejected", "completion") if c in dataset.column_names)
    return chat.preference_rows(dataset, tokenizer, source, completions)


def trainer_args(args):
    """The config the TRL trainer gets: the recipe's, except that rows align has already masked (SFT on a
    template TRL cannot mask) go in with TRL's assistant_only_loss off (TRL would refuse tokenized rows)."""
    import copy

    if not getattr(args, "_align_own_masks", False):
        return args
    args = copy.copy(args)
    args.assistant_only_loss = False
    return args


def _stage_tokenizer(model_args, args, model_path: str):
    """The starting adapter's tokenizer (it carries the chat template training used), else the model's (at
    model_revision); TRL's chat_template_path replaces the template."""
    from align.train.model_check import has_tokenizer

    adapter = model_args.adapter_name_or_path
    source = adapter if adapter and has_tokenizer(adapter) else model_path
    revision = None if source == adapter or model_args.model_revision == "main" else model_args.model_revision
    try:
        return load_tokenizer(source, getattr(args, "chat_template_path", None), revision,
                              getattr(args, "trust_remote_code", False))
    except OSError as err:  # not found, offline, no tokenizer files: the stage cannot render its rows
        reason = " ".join(str(err).split())[:300]
        key = "adapter_name_or_path" if source == adapter else "model_name_or_path"
        raise AlignError(f"{key}: {source}: its tokenizer could not be loaded ({reason})") from None


def run_stage(stage: str, argv: list[str]):
    """Run one training stage from its recipe; returns the trainer (for tests and the pipeline).

    `--help` / `-h` prints every recipe key instead; `--accelerate_config NAME|FILE` validates the recipe,
    then runs the stage under `accelerate launch` with that config."""
    if "--help" in argv or "-h" in argv:
        from align.train.config import stage_help

        print(stage_help(stage))
        return 0
    if "--accelerate_config" in argv or any(a.startswith("--accelerate_config=") for a in argv):
        from align.train.launch import relaunch_under_accelerate

        return relaunch_under_accelerate(stage, argv, prepare_stage)
    from align.core import lifecycle

    lifecycle.reset()  # (a stop signal before this point ended the command already)
    lifecycle.install((signal.SIGUSR1,))  # Slurm's signal before a time limit: a checkpoint, then out (as SIGTERM)
    model_args, data_args, args, dataset, resume = prepare_stage(stage, argv)
    try:
        return _train_stage(stage, model_args, data_args, args, dataset, resume)
    finally:
        lifecycle.unlock_folder(args.output_dir)


def _train_stage(stage: str, model_args, data_args, args, dataset, resume):
    from align.core import lifecycle
    from align.train.checkpoints import preemption_callback, resume_line
    from align.stages import training_stage

    logger.info("%s: %d training rows", stage, len(dataset))

    model, model_path = load_model(model_args, gradient_checkpointing=args.gradient_checkpointing,
                                   trust_remote_code=getattr(args, "trust_remote_code", False))
    tokenizer = _stage_tokenizer(model_args, args, model_path)
    from peft import PeftModel

    targets = None
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
        targets = resolve_lora_targets(model_args, model, source=getattr(args, "_align_recipe_source", "recipe"))
        peft_config = build_lora_config(model_args, model, targets)

    # push_to_hub: the folder is pushed once it is saved whole (secrets checked first); the trainer's own
    # pushes (a repo made at init, every checkpoint pushed) stay off.
    args._align_push, args.push_to_hub = bool(args.push_to_hub), False
    trainer_cls = training_stage(stage).trainer_class()
    trainer = trainer_cls(model=model, args=trainer_args(args), train_dataset=dataset, processing_class=tokenizer,
                          peft_config=peft_config)
    trainer.add_callback(progress_callback(stage))
    preemption = preemption_callback(stage)
    trainer.add_callback(preemption)
    max_length = getattr(args, "max_length", None)
    packing = getattr(args, "packing_strategy", None) if getattr(args, "packing", False) else None
    left, cut = truncation_report(len(dataset), trainer.train_dataset, max_length, packing)  # every rank: all stop
    if left == 0 < len(dataset):
        raise AlignError(f"{getattr(args, '_align_recipe_source', 'recipe')}: key 'max_length' is {max_length}, "
                         f"which leaves none of the {len(dataset)} rows a completion token to train on")
    if cut and trainer.is_world_process_zero():
        print(f"[align] {stage}: warning: {cut}", flush=True)
    if getattr(trainer, "is_fsdp_enabled", False):
        trainer.add_callback(shard_report(stage))
    fused = apply_moe_lora_backend(trainer.model, model_args.moe_lora_backend)
    if model_args.router_stats:
        trainer.enable_router_stats()
    if trainer.is_world_process_zero():
        print(f"[align] {stage}: {format_trainable_report(trainer.model)}", flush=True)
        if targets is not None:
            print(f"[align] {stage}: {format_targets_report(targets)}", flush=True)
        print(f"[align] {stage}: moe_lora_backend={fused['backend']} fused expert stacks={fused['fused_experts']} "
              f"fused routers={fused['fused_routers']} fallbacks={len(fused['fallbacks'])}", flush=True)
        state = trainer.accelerator.state
        print(f"[align] {stage}: distributed={getattr(state.distributed_type, 'value', state.distributed_type)} "
              f"processes={state.num_processes} device={state.device}", flush=True)

    if resume and trainer.is_world_process_zero():
        print(f"[align] {resume_line(stage, Path(resume))}", flush=True)
    with lifecycle.deferred():  # a stop signal: a checkpoint at the next step boundary, then out
        trainer.train(resume_from_checkpoint=resume)
    if preemption.signum:
        raise lifecycle.Interrupted(preemption.signum)
    with lifecycle.deferred():  # the final save is finished once begun (the stage is then done)
        save_stage_outputs(trainer, tokenizer, model_args, data_args, args, stage)
    return trainer


def truncation_report(rows_in: int, prepared, max_length: int | None,
                      packing: str | None = None) -> tuple[int | None, str | None]:
    """What max_length did to the rows, which TRL does without a word: it cuts every row at max_length and
    drops those left without a completion token (packed, `packing` the strategy: keeps them in their bin, with
    nothing to train on). Returns (rows left with a completion token, the line to say or None); (None,
    None) for a streamed dataset or no max_length. Counted in Arrow: cheap enough on every rank."""
    import numpy as np
    import pyarrow.compute as pc
    from datasets import Dataset

    if max_length is None or not isinstance(prepared, Dataset):  # a streamed dataset is not counted
        return None, None
    columns = prepared.column_names

    def arrow(*names):
        return prepared.select_columns(list(names)).with_format("arrow")[:]  # the dataset's rows only

    def lengths_of(table, name):
        return pc.list_value_length(table[name]).to_numpy(zero_copy_only=False)

    longer, rows, left = 0, len(prepared), len(prepared)
    if packing is not None:  # a row is a bin of several; seq_lengths holds theirs
        if packing == "wrapped" or "seq_lengths" not in columns:  # rows run across bins: none is cut
            return left, None
        table = arrow(*[c for c in ("labels", "seq_lengths") if c in columns])
        lengths = pc.list_flatten(table["seq_lengths"]).to_numpy(zero_copy_only=False)
        rows = len(lengths)
        trained = np.ones(rows, dtype=bool)
        if "labels" in columns and rows:
            labels = pc.list_flatten(table["labels"]).to_numpy(zero_copy_only=False)
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            trained = np.add.reduceat(labels != -100, starts) > 0
        left = int(trained.sum())
        if packing != "bfd":  # bfd_split carries the rest of a long row into another bin: none is cut
            return left, None
        lengths, longer = lengths[trained], 1  # cut already: a row of max_length may have been longer
    elif "input_ids" in columns:  # SFT: already cut, so a row at max_length may have been longer
        lengths, longer = lengths_of(arrow("input_ids"), "input_ids"), 1
    elif "prompt_ids" in columns:  # preference rows, cut per batch: the prompt, then its longest completion
        answers = [c for c in columns if c.endswith("_ids") and c != "prompt_ids" and not c.startswith("KL_")]
        table = arrow("prompt_ids", *answers)
        longest = np.max([lengths_of(table, c) for c in answers], axis=0) if answers else 0
        lengths = lengths_of(table, "prompt_ids") + longest
    else:
        return left, None
    cut = int((np.asarray(lengths) + longer > max_length).sum())
    dropped = (rows if packing else rows_in) - left
    said = []
    if dropped > 0:
        said.append(f"max_length {max_length} leaves {dropped} of {rows_in} rows without a completion token, "
                    "so they are not trained on")
    if cut:
        said.append(f"{cut} of the {left} rows left reach max_length {max_length} (cut there if longer)")
    return left, ("; ".join(said) + " (raise max_length to keep them whole)" if said else None)


def progress_callback(stage: str):
    """Steps done of max_steps and the last loss, for `align run`'s live line (align/core/progress.py); the
    trainer's own bar stays as it is."""
    from transformers import TrainerCallback

    from align.core.progress import Progress

    class _Progress(TrainerCallback):
        shown = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.shown = Progress(stage, state.max_steps or None, "step", bar=False)

        def on_step_end(self, args, state, control, **kwargs):
            if self.shown is not None:
                self.shown.set(state.global_step, total=state.max_steps or None)

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = next((logs[k] for k in ("loss", "train_loss") if isinstance((logs or {}).get(k), (int, float))), None)
            if self.shown is not None and loss is not None:
                self.shown.set(state.global_step, note=f"loss {loss:.4g}")

        def on_train_end(self, args, state, control, **kwargs):
            if self.shown is not None:
                self.shown.close()

    return _Progress()


def shard_report(stage: str):
    """Under FSDP, once the trainer has wrapped the model: how many parameter tensors are sharded."""
    from transformers import TrainerCallback

    class _Shards(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            from torch.distributed.tensor import DTensor

            params = list(model.parameters()) if model is not None else []
            if state.is_world_process_zero:
                sharded = sum(isinstance(p, DTensor) for p in params)
                print(f"[align] {stage}: fsdp: {sharded} of {len(params)} parameter tensors sharded", flush=True)

    return _Shards()


def save_stage_outputs(trainer, tokenizer, model_args, data_args, args, stage: str) -> None:
    """Adapter, tokenizer, resolved config, log history and (on request) a merged model in output_dir; then
    the push, when the recipe asks for it.

    Saving goes through the trainer on every process: under FSDP or ZeRO-3 it gathers the sharded weights
    (accelerate's state dict) before the main process writes them, where a save of one rank's own module
    would write its shard. The frozen "ref" copy of a preference stage only serves training: it is saved as
    a second adapter and removed, so the folder is the "default" adapter alone."""
    import shutil

    out = Path(args.output_dir)
    model = trainer.accelerator.unwrap_model(trainer.model)
    is_peft = hasattr(model, "peft_config")
    if not is_peft:  # TRL switches router logits on for the aux loss; saved on, they break cached generation
        model.config.output_router_logits = False
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if getattr(trainer, "is_fsdp_enabled", False) and plugin is not None and "FULL_STATE_DICT" not in str(plugin.state_dict_type):
        # Under a sharded state dict (fsdp_state_dict_type: SHARDED_STATE_DICT, for fast checkpoints) the
        # trainer saves no model into output_dir at all: the final save gathers the full state instead.
        plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(out))
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return
    if is_peft and "ref" in model.peft_config:
        shutil.rmtree(out / "ref", ignore_errors=True)
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
    if getattr(args, "_align_push", False):
        from align.core.leaks import held
        from align.publishing.publish import push_folder

        token = held(args, "hub_token")  # the recipe's, kept in memory only (align.train.config.hold_secrets)
        repo = args.hub_model_id or out.name
        url = push_folder(str(out), repo if "/" in repo else f"{_hub_user(token)}/{repo}",
                          private=args.hub_private_repo is not False, **({"token": token} if token else {}))
        print(f"[align] {stage}: pushed to {url}", flush=True)


def _hub_user(token: str | None = None) -> str:
    from huggingface_hub import whoami

    try:
        return whoami(token=token or os.environ.get("HF_TOKEN"))["name"]
    except Exception as err:
        raise AlignError(f"push_to_hub: set hub_model_id: ORG/NAME (no Hub login to name the repo: {err})") from None
