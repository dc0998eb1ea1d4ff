"""Coming from TRL or alignment-handbook: their key names work, mapped onto ours, with did-you-mean over both."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import REPO

HANDBOOK_SFT = """\
# An alignment-handbook style recipe (recipes/zephyr-7b-beta/sft/config_qlora.yaml's shape), where only
# model_name_or_path was changed (it named mistralai/Mistral-7B-v0.1).
# Model arguments
model_name_or_path: tiny-mixtral
model_revision: main
torch_dtype: bfloat16
attn_implementation: sdpa
use_peft: true
lora_r: 16
lora_alpha: 16
lora_dropout: 0.05
lora_target_modules:
- q_proj
- k_proj
- v_proj
- o_proj

# Data training arguments
dataset_name: DATASET
dataset_train_split: train_sft
dataset_num_proc: 1

# SFT trainer config
bf16: true
do_eval: false
eval_strategy: "no"
gradient_accumulation_steps: 1
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: false
learning_rate: 2.0e-04
log_level: info
logging_steps: 1
lr_scheduler_type: cosine
max_length: 256
max_steps: 2
num_train_epochs: 1
output_dir: OUTPUT
per_device_train_batch_size: 2
push_to_hub: false
report_to:
- none
save_strategy: "no"
seed: 42
warmup_ratio: 0.1
"""


def _chat_dataset(folder):
    from datasets import Dataset, DatasetDict

    rows = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": str(i + 1)}]}
            for i in range(8)]
    DatasetDict({"train_sft": Dataset.from_list(rows), "test_sft": Dataset.from_list(rows[:2])}).save_to_disk(str(folder))


def test_a_handbook_recipe_runs_with_only_the_model_changed(tmp_path):
    from safetensors.torch import load_file

    from align.cli import main

    _chat_dataset(tmp_path / "ultrachat")
    recipe = tmp_path / "config_qlora.yaml"
    recipe.write_text(HANDBOOK_SFT.replace("DATASET", str(tmp_path / "ultrachat")).replace("OUTPUT", str(tmp_path / "out")))
    import transformers

    verbosity = transformers.logging.get_verbosity()
    try:
        assert main(["sft", "--config", str(recipe)]) == 0
    finally:  # the recipe's log_level: info sets transformers' verbosity for the whole process
        transformers.logging.set_verbosity(verbosity)
    weights = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert weights and all(".self_attn." in k for k in weights)  # LoRA where lora_target_modules said, as in TRL
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["lora_dropout"] == 0.05 and set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_trl_names_map_onto_ours():
    from trl import SFTConfig

    from align.train.config import parse_stage_recipe

    recipe = {"model_name_or_path": "tiny-mixtral", "use_peft": True, "torch_dtype": "float32", "use_rslora": True,
              "lora_target_modules": ["q_proj", "v_proj", "w1", "w2", "w3", "gate"], "dataset_name": "org/data",
              "dataset_config": "default", "dataset_train_split": "train_sft", "output_dir": "o"}
    model_args, data_args, args = parse_stage_recipe(SFTConfig, recipe, "r.yaml", apply_env=False)
    assert model_args.use_lora and model_args.dtype == "float32" and model_args.use_rslora
    # TRL's lora_target_modules is ours too, resolved against the model as PEFT does (the MLP's names of
    # the older per-expert layout mean the fused stacks, `gate` the router); the group switches step aside
    assert model_args.lora_target_modules == ["q_proj", "v_proj", "w1", "w2", "w3", "gate"]
    assert not (model_args.lora_attention or model_args.lora_experts or model_args.lora_router)
    targets = _targets(model_args)
    assert {t.rsplit(".", 1)[-1] for t in targets.modules} == {"q_proj", "v_proj"}
    assert {t.split(".", 3)[-1] for t in targets.parameters} == {"mlp.experts.gate_up_proj", "mlp.experts.down_proj",
                                                                 "mlp.gate.weight"}
    assert data_args.datasets == [{"path": "org/data", "name": "default", "split": "train_sft"}]
    assert args.assistant_only_loss  # our default: assistant turns only
    params = parse_stage_recipe(SFTConfig, {"lora_target_modules": "all-linear", "lora_target_parameters": ["gate.weight"],
                                            "datasets": ["d.jsonl"], "output_dir": "o"}, "r.yaml", apply_env=False)[0]
    targets = _targets(params)
    assert {t.rsplit(".", 1)[-1] for t in targets.modules} == {"q_proj", "k_proj", "v_proj", "o_proj"}  # not lm_head
    assert {t.split(".", 3)[-1] for t in targets.parameters} == {"mlp.gate.weight"}  # the router, not the experts


def _targets(model_args):
    """Where the recipe's LoRA goes on tiny-mixtral (built on the meta device: names, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from align.train.models import resolve_model_path
    from align.moe.lora import resolve_lora_targets

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model_path("tiny-mixtral")))
    return resolve_lora_targets(model_args, model)


def test_group_by_length_flag_of_older_transformers():
    from trl import SFTConfig

    from align.train.config import parse_stage_recipe
    from align.core.errors import AlignError

    def strategy(**keys):
        recipe = {"datasets": ["d.jsonl"], "output_dir": "o", **keys}
        return parse_stage_recipe(SFTConfig, recipe, "r.yaml", apply_env=False)[2].train_sampling_strategy

    assert strategy(group_by_length=True) == "group_by_length"
    assert strategy(group_by_length=False) == "random"
    with pytest.raises(AlignError, match="r.yaml: key 'group_by_length' must be true or false, got 'yes'"):
        strategy(group_by_length="yes")
    with pytest.raises(AlignError, match="keys 'group_by_length' and 'train_sampling_strategy' say the same thing"):
        strategy(group_by_length=True, train_sampling_strategy="random")
    with pytest.raises(AlignError, match="group_by_length: false contradicts train_sampling_strategy: group_by_length"):
        strategy(group_by_length=False, train_sampling_strategy="group_by_length")


@pytest.mark.parametrize("argv,expected", [(["--group_by_length"], "group_by_length"),
                                           (["--group_by_length", "true"], "group_by_length"),
                                           (["--group_by_length", "False"], "random")])
def test_group_by_length_on_the_command_line(argv, expected):
    from align.train.config import parse_stage_args

    recipe = REPO / "recipes" / "tiny-mixtral" / "sft.yaml"
    args = parse_stage_args(__import__("trl").SFTConfig, ["--config", str(recipe), "--output_dir", "o", *argv])[2]
    assert args.train_sampling_strategy == expected


@pytest.mark.parametrize("key,suggestion", [("use_pef", "use_peft"), ("lora_target_module", "lora_target_modules"),
                                            ("dataset_nam", "dataset_name"), ("lora_rr", "lora_r")])
def test_did_you_mean_knows_both_names(key, suggestion):
    from trl import SFTConfig

    from align.train.config import parse_stage_recipe
    from align.core.errors import AlignError

    with pytest.raises(AlignError, match=f"did you mean '{suggestion}'"):
        parse_stage_recipe(SFTConfig, {key: 1, "output_dir": "o"}, "r.yaml", apply_env=False)


def test_mixtures_with_fraction_data_files_and_columns(tmp_path):
    from align.train.config import DataArguments
    from align.train.data import load_training_data

    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"q{i}"}],
                                     "completion": [{"role": "assistant", "content": "a"}], "extra": i}) + "\n"
                         for i in range(10)))
    folder = tmp_path / "b"
    folder.mkdir()
    (folder / "part.jsonl").write_text(a.read_text())
    data = DataArguments(datasets=[{"path": str(a), "fraction": 0.5, "columns": ["prompt", "completion"]},
                                   {"path": "json", "data_files": str(folder / "part.jsonl"), "columns": ["prompt", "completion"]}])
    mixed = load_training_data(data, "sft")
    assert len(mixed) == 15 and set(mixed.column_names) == {"prompt", "completion"}


def test_the_help_names_the_trl_keys(capsys):
    from align.cli import main

    assert main(["sft", "--help"]) == 0
    text = capsys.readouterr().out
    assert "use_peft (= use_lora)" in text and "lora_target_modules" in text and "--lora_dropout" in text


def test_dropout_with_expert_lora_is_one_line(tmp_path, capsys):
    from align.cli import main

    with pytest.raises(SystemExit):
        main(["sft", "--config", str(REPO / "recipes" / "tiny-mixtral" / "sft.yaml"), "--output_dir", str(tmp_path / "o"),
              "--lora_dropout", "0.1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lora_dropout" in err[0]
