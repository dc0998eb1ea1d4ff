"""A machine that never saw the project: the tiny models build from nothing, every module the code imports
is a declared dependency, and every command answers --help."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tomllib

import pytest

from conftest import FIXED_INPUT, REPO


def _clean_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "ALIGN_"))}
    return {**env, "ALIGN_HOME": str(tmp_path / "align"), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}


def test_tiny_models_build_from_an_empty_home(tmp_path):
    """Both embedded models are written from an empty ALIGN_HOME and HF_HOME, offline, in a fresh process:
    the Mixtral SentencePiece tokenizer (which transformers reads through protobuf) gives Mixtral's ids."""
    code = """
import json
from transformers import AutoModelForCausalLM
from align.train.models import load_tokenizer
from align.core.tiny_mixtral import tiny_mixtral_path
out = {}
for name in ("tiny-mixtral", "tiny-mixtral-char"):
    path = tiny_mixtral_path(0, name)
    tokenizer = load_tokenizer(str(path))
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "12 + 3 ="}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    out[name] = {"ids": list(ids), "vocab": model.config.vocab_size, "tokenizer": len(tokenizer)}
print(json.dumps(out))
"""
    env = _clean_env(tmp_path)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["tiny-mixtral"]["ids"] == FIXED_INPUT[0]  # <s> [INST] 12 + 3 = [/INST], Mixtral's own ids
    assert out["tiny-mixtral"]["vocab"] == out["tiny-mixtral"]["tokenizer"] == 32000
    assert out["tiny-mixtral-char"]["vocab"] == out["tiny-mixtral-char"]["tokenizer"] == 100
    assert (tmp_path / "align" / "models" / "tiny-mixtral-s0" / "model.safetensors").is_file()


def _imported_top_level_modules() -> dict[str, str]:
    """Top-level module -> first file importing it, over every absolute import in align/ and benchmarks/."""
    found: dict[str, str] = {}
    for path in sorted([*(REPO / "align").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(REPO)))
    return found


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


# module -> the extra that declares it: imported only inside the feature that needs it, which says which
# extra to install when it is missing (a GGUF file as a model needs gguf)
OPTIONAL_IMPORTS = {"gguf": "gguf"}


def test_every_imported_package_is_a_declared_dependency():
    from importlib.metadata import packages_distributions

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {_requirement_name(r) for r in project["dependencies"]}
    for module, extra in OPTIONAL_IMPORTS.items():  # imported only where that extra's feature is used
        assert module in {_requirement_name(r) for r in project["optional-dependencies"][extra]}, (module, extra)
        declared.add(module)
    for requirement in project["dependencies"]:
        assert re.search(r"<\s*[\d.]+", requirement), f"{requirement}: every range needs an upper bound"
    distributions = packages_distributions()
    missing = []
    for module, where in _imported_top_level_modules().items():
        if module in sys.stdlib_module_names or module in ("align", "__future__"):
            continue
        owners = {d.lower().replace("_", "-") for d in distributions.get(module, [])}
        if not owners & declared:
            missing.append(f"{module} ({where}; installed by {sorted(owners) or 'nothing'})")
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def _listed_commands() -> list[str]:
    from align.cli import usage

    text = usage()
    block = text.split("commands:\n", 1)[1].split("\n\n", 1)[0]
    return [line.split()[0] for line in block.splitlines() if line.strip()]


SUBCOMMANDS = {"trees": ["build", "export", "stats", "import"], "sandbox": ["run"]}


def test_the_listed_commands_are_the_cli_table():
    from align.cli import COMMANDS
    from align.stages import TRAINING_STAGES

    assert _listed_commands() == list(COMMANDS)
    assert set(TRAINING_STAGES) <= set(COMMANDS)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_command_answers_help(flag, capsys):
    from align.cli import main

    invocations = []
    for command in _listed_commands():
        invocations.append([command])
        invocations += [[command, sub] for sub in SUBCOMMANDS.get(command, [])]
    for argv in invocations:
        try:
            code = main([*argv, flag])
        except SystemExit as exit_:  # argparse ends --help with SystemExit(0)
            code = exit_.code
        out = capsys.readouterr()
        assert code in (0, None), (argv, out.err)
        assert "usage:" in out.out and "Traceback" not in out.out + out.err, (argv, out)


def test_stage_help_lists_every_key_with_type_default_and_help(capsys):
    import dataclasses

    from align.cli import main
    from align.train.config import DataArguments, ModelArguments
    from trl import KTOConfig

    assert main(["kto", "--help"]) == 0
    text = capsys.readouterr().out
    for cls in (ModelArguments, DataArguments, KTOConfig):
        for f in dataclasses.fields(cls):
            if f.init and not f.name.startswith("_"):
                assert f"\n  --{f.name}  " in text, f.name
    assert "--desirable_weight  float  (default: 1.0)" in text
    assert "--lora_r  int  (default: 16)" in text and "LoRA rank" in text


def test_help_in_a_fresh_process_is_clean(tmp_path):
    """The real entry point: exit 0, the usage on stdout, and nothing on stderr (no third-party log lines)."""
    proc = subprocess.run([sys.executable, "-m", "align", "sft", "--help"], capture_output=True, text=True,
                          env=_clean_env(tmp_path), cwd=REPO, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: align sft")
    assert proc.stderr.strip() == "", proc.stderr
