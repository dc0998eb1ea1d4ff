"""Bad input ends with one line naming the file and key/column, exit code 2, before any model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
    from align.config import parse_stage_args
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

    from align.config import ModelArguments
    from align.errors import AlignError
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
    lines = [l for l in proc.stderr.splitlines() if l.strip() and "Warning" not in l and "warn" not in l]
    assert lines == [l for l in lines if l.startswith("align: error:")] and len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "did you mean 'lora_alpha'" in proc.stderr
    assert not (home / "models").exists()
