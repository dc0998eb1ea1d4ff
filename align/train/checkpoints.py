"""Checkpoints a stage can resume from: which are whole, how they are written and loaded, the preemption save.

- A checkpoint is whole when its trainer_state.json (the Trainer writes it last, after the weights, the
  optimizer, the scheduler and the RNG states) reads back with the folder's step, and its weights are there:
  one cut off by a kill is skipped, and the newest whole one is resumed from.
- A full fine-tune's checkpoints are written in the layout the model runs in (transformers' fused
  `mlp.experts.gate_up_proj`, `mlp.gate`), not the Hub layout `save_pretrained` converts back to
  (`block_sparse_moe.experts.N.w1`): the Trainer loads a checkpoint with a plain `load_state_dict`,
  without the conversion mapping (huggingface/transformers#43701), and a Hub-layout checkpoint would put
  every router and expert back to the base weights. A checkpoint in the Hub layout (written before this)
  is loaded through the conversion mapping. The stage's final model keeps the Hub layout.
- `PreemptionCallback`: after SIGTERM / SIGINT / SIGHUP / SIGUSR1 the trainer saves a checkpoint at the next
  step boundary and stops (every process of a multi-process run at the same step).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from pathlib import Path

from align.core import lifecycle

logger = logging.getLogger("align")

ALIGN_STATE = "align_state.json"  # what TRL keeps outside the Trainer's state: its running token count
STEP = re.compile(r"^checkpoint-(\d+)$")
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
           "adapter_model.safetensors", "adapter_model.bin", "pytorch_model_fsdp.bin")


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not a whole checkpoint (None: it is one)."""
    match = STEP.match(folder.name)
    if not match or not folder.is_dir():
        return "not a checkpoint-N folder"
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except FileNotFoundError:
        return "no trainer_state.json (cut off while being written)"
    except (ValueError, OSError):
        return "trainer_state.json is cut off"
    if not isinstance(state, dict) or state.get("global_step") != int(match.group(1)):
        return f"trainer_state.json is for step {state.get('global_step') if isinstance(state, dict) else '?'}"
    names = {p.name for p in folder.iterdir()}
    sharded = any(n.startswith(("pytorch_model_fsdp", "global_step")) for n in names)  # FSDP / DeepSpeed
    if not sharded and not names & set(WEIGHTS):
        return "no model weights"
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index in names:
            try:
                shards = set(json.loads((folder / index).read_text())["weight_map"].values())
            except (ValueError, KeyError, OSError):
                return f"{index} is cut off"
            if shards - names:
                return f"weight shard {sorted(shards - names)[0]} is missing"
    return None


def newest_checkpoint(output_dir: str | Path) -> tuple[Path | None, list[str]]:
    """(the newest whole checkpoint-N in output_dir or None, a note for each newer one skipped)."""
    folders = [p for p in Path(output_dir).glob("checkpoint-*") if STEP.match(p.name) and p.is_dir()]
    skipped = []
    for folder in sorted(folders, key=lambda p: int(STEP.match(p.name).group(1)), reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append(f"{folder.name} skipped: {problem}")
    return None, skipped


def checkpoint_steps(folder: Path) -> tuple[int, int | None]:
    """(the checkpoint's step, the run's max_steps) from its trainer_state.json."""
    state = json.loads((Path(folder) / "trainer_state.json").read_text())
    return int(state["global_step"]), state.get("max_steps")


def resume_line(stage: str, folder: Path) -> str:
    step, total = checkpoint_steps(folder)
    return f"{stage}: resuming from {Path(folder).name} of {total} steps" if total else f"{stage}: resuming from {Path(folder).name}"


class CheckpointMixin:
    """Trainer mixin: full-model checkpoints in the layout the model runs in, and loaded in either layout;
    TRL's running token count (the `num_tokens` of the log) kept in the checkpoint and restored with it."""

    def _save_checkpoint(self, model, trial):
        from transformers import PreTrainedModel

        unwrapped = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        full = isinstance(unwrapped, PreTrainedModel) and not hasattr(unwrapped, "peft_config")
        if full:
            unwrapped.save_pretrained = functools.partial(type(unwrapped).save_pretrained, unwrapped,
                                                          save_original_format=False)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            if full:
                del unwrapped.save_pretrained
        if self.args.should_save and hasattr(self, "_total_train_tokens"):
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            if folder.is_dir():  # (rotated away at once with save_total_limit 0)
                lifecycle.write_json_atomic(folder / ALIGN_STATE, {"total_train_tokens": self._total_train_tokens})

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        from transformers import PreTrainedModel

        self._restore_token_count(Path(resume_from_checkpoint))
        target = model if model is not None else self.model
        folder = Path(resume_from_checkpoint)
        single = folder / "model.safetensors"
        if (isinstance(target, PreTrainedModel) and not hasattr(target, "peft_config") and single.is_file()
                and not getattr(self, "is_fsdp_enabled", False) and not getattr(self, "is_deepspeed_enabled", False)):
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as f:
                keys = set(f.keys())
            if keys - set(target.state_dict()):  # the Hub layout: through the conversion mapping
                return load_through_conversion(target, single)
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _restore_token_count(self, folder: Path) -> None:
        if not hasattr(self, "_total_train_tokens"):
            return
        try:
            self._total_train_tokens = json.loads((folder / ALIGN_STATE).read_text())["total_train_tokens"]
        except (OSError, ValueError, KeyError):  # a checkpoint from before: the last logged count
            history = json.loads((folder / "trainer_state.json").read_text()).get("log_history", [])
            self._total_train_tokens = next((h["num_tokens"] for h in reversed(history) if "num_tokens" in h), 0)


def load_through_conversion(model, weights_file: Path) -> None:
    """Load a checkpoint written in the Hub layout into `model` as from_pretrained would (the model's
    conversion mapping), every weight accounted for."""
    import torch
    from safetensors.torch import load_file
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    from align.core.errors import AlignError

    state_dict = load_file(str(weights_file), device="cpu")
    # The loader puts new Parameters in the model; the values go into the model's own tensors instead (their
    # device, dtype, requires_grad and ties as they were), and those are put back.
    own = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}
    config = LoadStateDictConfig(weight_mapping=get_model_conversion_mapping(model), dtype=next(iter(own.values())).dtype)
    with torch.no_grad():
        info, _ = convert_and_load_state_dict_in_model(model=model, state_dict=state_dict, load_config=config)
        loaded = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}
        for name, tensor in own.items():
            new = loaded.get(name)
            if new is not None and new is not tensor:
                tensor.copy_(new.to(device=tensor.device, dtype=tensor.dtype))
            module_path, _, attribute = name.rpartition(".")
            module = model.get_submodule(module_path) if module_path else model
            if isinstance(tensor, torch.nn.Parameter):
                module._parameters[attribute] = tensor
            else:
                module._buffers[attribute] = tensor
    missing = set(getattr(info, "missing_keys", ()) or ()) - set(getattr(model, "_tied_weights_keys", None) or ())
    unexpected = set(getattr(info, "unexpected_keys", ()) or ())
    if missing or unexpected:
        raise AlignError(f"{weights_file}: does not match the model (missing {sorted(missing)[:3]}, unexpected "
                         f"{sorted(unexpected)[:3]}); restart the stage (align run --force)")
    logger.info("loaded %s through the model's conversion mapping (Hub layout)", weights_file)


def preemption_callback(stage: str):
    """At the first step boundary after a stop signal (any process's): save a checkpoint, stop training."""
    from transformers import TrainerCallback

    class _Preemption(TrainerCallback):
        signum = None

        def on_step_end(self, args, state, control, **kwargs):
            signum = lifecycle.requested()
            if args.world_size > 1:
                import torch
                import torch.distributed as dist

                if dist.is_available() and dist.is_initialized():  # every process stops at the same step
                    flag = torch.tensor([signum or 0], device=args.device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    signum = int(flag.item()) or None
            if signum:
                self.signum = signum
                control.should_save = True
                control.should_training_stop = True
                if state.is_world_process_zero:
                    print(f"[align] {stage}: {lifecycle.signal_name(signum)}: saving checkpoint-{state.global_step} "
                          "and stopping", flush=True)
            return control

    return _Preemption()
