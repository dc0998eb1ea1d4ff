"""Bad input ends with one line naming the file and key/column, exit code 2, before any model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO

TINY_SFT = REPO / "recipes" / "tiny-mixtral" / "sft.yaml"


def _recipe(tmp_path, **changes):
    import yaml

    recipe = yaml.safe_load(TINY_SFT.read_text())
    recipe.update(changes)
    recipe["output_dir"] = str(tmp_path / "out")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _run(capsys, argv):
    from align.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2
    assert len(err) == 1, err
    assert err[0].startswith("align: error: ")
    return err[0]


def test_unknown_key_suggests_the_closest(tmp_path, capsys):
    line = _run(capsys, ["sft", "--config", str(_recipe(tmp_path, learning_rat=1e-4))])
    assert "recipe.yaml" in line and "'learning_rat'" in line and "did you mean 'learning_rate'" in line


def test_unknown_command_line_key(tmp_path, capsys):
    line = _run(capsys, ["sft", "--config", str(TINY_SFT), "--lora_rank", "4"])
    assert "command line" in line and "'lora_rank'" in line and "lora_r" in line


def test_wrong_type(tmp_path, capsys):
    line = _run(capsys, ["sft", "--config", str(_recipe(tmp_path, per_device_train_batch_size="four"))])
    assert "'per_device_train_batch_size'" in line and "integer" in line and "four" in line


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    from align.train.config import parse_stage_args
    from trl import SFTConfig

    path = tmp_path / "r.yaml"
    path.write_text(TINY_SFT.read_text().replace("learning_rate: 2.0e-3", "learning_rate: 2e-3"))
    _, _, args = parse_stage_args(SFTConfig, ["--config", str(path)])
    assert args.learning_rate == pytest.approx(2e-3)


def test_missing_dataset_column(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    line = _run(capsys, ["sft", "--config", str(_recipe(tmp_path, datasets=[{"path": str(data)}]))])
    assert str(data) in line and "messages" in line and "question" in line


def test_missing_column_for_preference_stage(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
    recipe = REPO / "recipes" / "tiny-mixtral" / "nca.yaml"
    line = _run(capsys, ["nca", "--config", str(recipe), "--datasets", str(data), "--adapter_name_or_path", "",
                         "--output_dir", str(tmp_path / "o")])
    assert "rejected" in line and str(data) in line


def test_empty_dataset(tmp_path, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    line = _run(capsys, ["sft", "--config", str(_recipe(tmp_path, datasets=[str(data)]))])
    assert str(data) in line and ("no rows" in line or "could not be loaded" in line)


def test_missing_dataset_file(tmp_path, capsys):
    line = _run(capsys, ["sft", "--config", str(_recipe(tmp_path, datasets=["./nope/missing.jsonl"]))])
    assert "missing.jsonl" in line and "not found" in line


def test_missing_recipe_file(capsys):
    line = _run(capsys, ["sft", "--config", "recipes/none/sft.yaml"])
    assert "recipes/none/sft.yaml" in line and "not found" in line


def test_missing_adapter_folder(tmp_path, capsys):
    recipe = REPO / "recipes" / "tiny-mixtral" / "dpo.yaml"
    line = _run(capsys, ["dpo", "--config", str(recipe), "--adapter_name_or_path", str(tmp_path / "nope"),
                         "--output_dir", str(tmp_path / "o")])
    assert "adapter_name_or_path" in line and "nope" in line


def test_nca_needs_nca_loss(tmp_path, capsys):
    recipe = REPO / "recipes" / "tiny-mixtral" / "nca.yaml"
    line = _run(capsys, ["nca", "--config", str(recipe), "--loss_type", "sigmoid", "--output_dir", str(tmp_path / "o")])
    assert "loss_type" in line and "nca_pair" in line


@pytest.mark.parametrize("key,changes,words", [
    ("experts_4bit", {"use_lora": False}, "use_lora"),
    ("load_in_4bit", {"save_merged_model": True}, "save_merged_model"),
])
def test_4bit_refuses_what_it_cannot_do(tmp_path, capsys, key, changes, words):
    line = _run(capsys, ["sft", "--config", str(_recipe(tmp_path, **{key: True}, **changes))])
    assert key in line and words in line


def test_attention_only_model_rejects_expert_lora():
    from transformers import LlamaConfig, LlamaForCausalLM

    from align.train.config import ModelArguments
    from align.core.errors import AlignError
    from align.moe.lora import build_lora_config

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(AlignError, match="LlamaForCausalLM has no MoE block"):
        build_lora_config(ModelArguments(), model)
    config = build_lora_config(ModelArguments(lora_experts=False, lora_router=False), model)
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_subprocess_exit_code_no_traceback_no_model_built(tmp_path):
    """The real entry point: exit 2, one line, and the tiny model was never even written."""
    home = tmp_path / "home"
    env = {**os.environ, "ALIGN_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-m", "align", "sft", "--config", str(_recipe(tmp_path, lora_alpah=3))],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("align: error:"), proc.stderr  # no third-party log lines
    assert "did you mean 'lora_alpha'" in lines[0]
    assert not (home / "models").exists()


# A site directory whose sitecustomize makes some modules unimportable, as on a machine without the extra.
_BLOCKER = """
import importlib.abc, importlib.util, sys
BLOCKED = {blocked!r}
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}")
        return None
sys.meta_path.insert(0, _Block())
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: None if name.split(".")[0] in BLOCKED else _find_spec(name, *a, **k)
"""


def _run_without(tmp_path, blocked, argv, timeout=120):
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_BLOCKER.format(blocked=set(blocked)))
    home = tmp_path / "home"
    env = {**os.environ, "ALIGN_HOME": str(home), "PYTHONPATH": str(site)}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "align", *map(str, argv)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=timeout)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("align: error:"), proc.stderr
    assert not (home / "models").exists(), "the model was loaded before the error"
    return lines[0], time.monotonic() - start


def test_missing_report_to_backend_fails_before_the_model_loads(tmp_path):
    line, seconds = _run_without(tmp_path, {"tensorboard", "tensorboardX"},
                                 ["sft", "--config", _recipe(tmp_path, report_to="tensorboard")])
    assert "report_to" in line and "tensorboard" in line and "moe-align[tracking]" in line
    assert seconds < 60  # the import of TRL and friends, not a model load


def test_report_to_takes_space_separated_values_and_checks_each(tmp_path):
    line, _ = _run_without(tmp_path, {"wandb"}, ["sft", "--config", TINY_SFT, "--report_to", "none", "wandb"])
    assert "wandb" in line and "moe-align[tracking]" in line


def test_deepspeed_accelerate_config_needs_deepspeed(tmp_path):
    zero3 = REPO / "recipes" / "accelerate" / "zero3.yaml"
    line, _ = _run_without(tmp_path, {"deepspeed"}, ["sft", "--config", TINY_SFT, "--accelerate_config", "zero3"])
    assert "zero3.yaml" in line and "DeepSpeed" in line and "moe-align[deepspeed]" in line
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(f"output_dir: {tmp_path / 'out'}\naccelerate_config: {zero3}\nstages:\n"
                        f"  - {{name: sft, kind: sft, recipe: {TINY_SFT}}}\n")
    line, _ = _run_without(tmp_path, {"deepspeed"}, ["run", pipeline])
    assert "zero3.yaml" in line and "moe-align[deepspeed]" in line and not (tmp_path / "out").exists()


def test_pipeline_stage_with_a_missing_tracker_fails_before_any_stage_runs(tmp_path):
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(f"output_dir: {tmp_path / 'out'}\nstages:\n"
                        f"  - {{name: sft, kind: sft, recipe: {TINY_SFT}, set: {{report_to: [wandb]}}}}\n")
    line, _ = _run_without(tmp_path, {"wandb"}, ["run", pipeline])
    assert "stages[0] (sft)" in line and "wandb" in line and not (tmp_path / "out").exists()


def test_unknown_accelerate_config_name(tmp_path, capsys):
    line = _run(capsys, ["sft", "--config", str(TINY_SFT), "--accelerate_config", "zero9"])
    assert "zero9" in line and "zero3" in line


@pytest.mark.parametrize("flags,words", [
    (["--eval_strategy", "steps"], "eval_strategy"),
    (["--load_best_model_at_end", "true"], "load_best_model_at_end"),
    (["--lora_attention_modules", "q_proj", "lm_head"], "lm_head"),  # refused by SFTTrainer.__init__ itself
])
def test_trainer_init_mistakes_fail_before_the_model_loads(flags, words, tmp_path, capsys, monkeypatch):
    import align.train.models

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(align.train.models, "_from_pretrained", no_model)
    line = _run(capsys, ["sft", "--config", str(_recipe(tmp_path)), *flags])
    assert words in line
