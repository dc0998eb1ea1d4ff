"""Every recipe in recipes/ parses against the installed TRL and starts with the command that runs it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO

RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
STAGES = ("sft", "dpo", "kto", "nca")


def _stage_config_class(stage):
    from trl import DPOConfig, KTOConfig, SFTConfig

    return {"sft": SFTConfig, "dpo": DPOConfig, "nca": DPOConfig, "kto": KTOConfig}[stage]


def test_there_are_recipes():
    names = {p.relative_to(REPO / "recipes").as_posix() for p in RECIPES}
    for model in ("tiny-mixtral", "mixtral-8x7b", "mixtral-8x22b"):
        for stage in STAGES:
            assert f"{model}/{stage}.yaml" in names
    for acc in ("single_gpu", "multi_gpu", "zero3", "fsdp2"):
        assert f"accelerate/{acc}.yaml" in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(REPO / "recipes").as_posix())
def test_recipe_starts_with_its_command(path: Path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("align " in first or "accelerate " in first), first
    rel = path.relative_to(REPO).as_posix()
    if path.parent.name != "accelerate":
        assert rel in first, f"{rel}: the first comment should name the recipe itself"


@pytest.mark.parametrize("path", [p for p in RECIPES if p.stem in STAGES], ids=lambda p: p.relative_to(REPO).as_posix())
def test_stage_recipe_validates(path: Path):
    from align.train.config import parse_stage_args

    model_args, data_args, args = parse_stage_args(_stage_config_class(path.stem), ["--config", str(path), "--use_cpu", "true"])
    assert data_args.datasets, "a stage recipe names its data"
    assert args.output_dir
    if path.stem == "nca":
        assert list(args.loss_type) == ["nca_pair"]
    if path.stem in ("dpo", "kto", "nca"):
        assert model_args.adapter_name_or_path, "preference stages start from the SFT adapter"
    assert args.router_aux_loss_coef and args.router_aux_loss_coef > 0


@pytest.mark.parametrize("path", [p for p in RECIPES if p.parent.name == "accelerate"], ids=lambda p: p.name)
def test_accelerate_config_loads(path: Path):
    config = yaml.safe_load(path.read_text())
    assert config["distributed_type"] in ("NO", "MULTI_GPU", "DEEPSPEED", "FSDP")
    assert config["num_processes"] >= 1


@pytest.mark.parametrize("path", [p for p in RECIPES if p.stem == "trees"], ids=lambda p: p.relative_to(REPO).as_posix())
def test_trees_recipe_validates(path: Path):
    from align.train.config import load_recipe_file
    from align.trees.builder import parse_trees_config

    config, actor, critic, limits = parse_trees_config(load_recipe_file(path), str(path))
    assert 1 <= config.max_turns <= 5 and config.samples_per_turn >= 2
    if not any(cpu in path.as_posix() for cpu in ("quickstart", "smollm2-moe")):  # (CPU pipelines pick their depth)
        assert config.max_turns == 5  # UltraInteract's depth
    assert actor.backend in ("local", "server") and critic.type in ("observation", "steps", "llm")


def test_trees_recipe_errors_name_the_key(tmp_path):
    from align.core.errors import AlignError
    from align.trees.builder import parse_trees_config

    with pytest.raises(AlignError, match=r"x.yaml: actor: unknown key 'temprature' \(did you mean 'temperature'\?\)"):
        parse_trees_config({"actor": {"temprature": 1.0}}, "x.yaml")
    with pytest.raises(AlignError, match="samples_per_turn"):
        parse_trees_config({"samples_per_turn": 1}, "x.yaml")
