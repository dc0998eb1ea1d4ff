"""Every command the README and the documentation pages (docs/*.md) show runs, through the CLI entry
point, on tiny inputs.

`test_every_readme_command_has_a_smoke_run` reads the code of the README and of every page for
`align <command> [<sub>]` and fails when one has no smoke run below, so a refactor cannot silently remove
what a command points at, and a page cannot show a command nothing runs.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from conftest import REPO, stage_args

SUBCOMMANDS = {"trees", "sandbox"}


def readme_commands() -> set[str]:
    text = "\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    code = re.findall(r"```[a-z]*\n(.*?)```", text, re.S) + re.findall(r"`([^`\n]+)`", text)
    found = set()
    for snippet in code:
        # what a page shows align print (`align: error: ...`, `[align] ...`) and Python imports are not commands
        snippet = "\n".join(line for line in snippet.splitlines()
                             if not line.lstrip().startswith(("align:", "[align]", "from align", "import align")))
        for command, sub in re.findall(r"(?<![\w/.-])align ([a-z]+)(?: ([a-z]+))?", snippet):
            found.add(f"{command} {sub}" if command in SUBCOMMANDS and sub else command)
        if "accelerate launch" in snippet:
            found.add("accelerate launch")
        if "--accelerate_config" in snippet:
            found.add("--accelerate_config")
        if re.search(r"align run \S+ --check", snippet):
            found.add("run --check")
    return found


def _cli(argv, capsys=None):
    from align.cli import main

    code = main([str(a) for a in argv])
    assert code == 0, argv
    return capsys.readouterr().out if capsys else None


@pytest.fixture(scope="module")
def trees_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("trees") / "trees"
    _cli(["trees", "build", "--config", REPO / "recipes" / "tiny-mixtral" / "trees.yaml", "--output_dir", out,
          "--limit", "2", "--max_turns", "2", "--progress", "false"])
    return out


def smoke_trees_build(tmp_path, capsys, trees_dir, sft_output):
    lines = [json.loads(line) for line in (trees_dir / "trees.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(1 <= len(t["turns"]) <= 2 for t in lines)


def smoke_trees_stats(tmp_path, capsys, trees_dir, sft_output):
    out = _cli(["trees", "stats", trees_dir], capsys)
    assert out.startswith("trees 2 ")


def smoke_trees_export(tmp_path, capsys, trees_dir, sft_output):
    out = _cli(["trees", "export", trees_dir, "--output", tmp_path / "export"], capsys)
    counts = json.loads(out.strip().splitlines()[-1])
    assert counts["kto"] >= 4 and (tmp_path / "export" / "README.md").is_file()


def smoke_trees_import(tmp_path, capsys, trees_dir, sft_output):
    rows = [{"id": f"t{i}_2_{turn}", "parent_id": f"t{i}", "task": "Math_CoT", "dataset": "test",
             "trajectory": [{"from": "user", "value": f"What is {i} + 1?"}]
             + ([{"from": "assistant", "value": "\\boxed{0}"}, {"from": "user", "value": "Your answer is wrong."}]
                if turn == 2 else []),
             "chosen": f"\\boxed{{{i + 1}}}", "rejected": "\\boxed{0}"} for i in range(2) for turn in (1, 2)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = _cli(["trees", "import", path, "--output", tmp_path / "imported"], capsys)
    assert json.loads(out.strip().splitlines()[-1]) == {"trees_written": 2}


def smoke_verify(tmp_path, capsys, trees_dir, sft_output):
    from align.tasks.problems import load_problems

    problems = load_problems("arithmetic:2:0")[0]
    responses = tmp_path / "responses.jsonl"
    responses.write_text(json.dumps({"problem_id": problems[0].id, "response": f"\\boxed{{{problems[0].answer}}}"}) + "\n"
                         + json.dumps({"problem_id": problems[1].id, "response": "\\boxed{-1}"}) + "\n")
    out = _cli(["verify", "--problems", "arithmetic:2:0", "--responses", responses], capsys)
    assert out.strip().endswith("1 passed, 1 failed")


def smoke_sandbox_run(tmp_path, capsys, trees_dir, sft_output):
    program = tmp_path / "p.py"
    program.write_text("print(6 * 7)\n")
    verdict = json.loads(_cli(["sandbox", "run", program, "--timeout", "5"], capsys).strip().splitlines()[-1])
    assert verdict["status"] == "ok" and verdict["stdout"].strip() == "42"


def smoke_quantize(tmp_path, capsys, trees_dir, sft_output):
    _cli(["quantize", "tiny-mixtral", tmp_path / "q", "--dtype", "float32"])
    assert (tmp_path / "q" / "model.safetensors").is_file() and (tmp_path / "q" / "tokenizer.json").is_file()


def smoke_upcycle(tmp_path, capsys, trees_dir, sft_output):
    from test_real_model import _dense_folder

    _dense_folder(tmp_path / "dense")
    _cli(["upcycle", tmp_path / "dense", tmp_path / "moe", "--experts", "2", "--top-k", "1"])
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 2


def _stage(stage, tmp_path, sft_output):
    extra = [] if stage == "sft" else ["--adapter_name_or_path", sft_output]
    _cli([stage, *stage_args(f"{stage}.yaml", tmp_path / stage, "--max_steps", "1", *map(str, extra))])
    assert (tmp_path / stage / "adapter_model.safetensors").is_file()


def smoke_sft(tmp_path, capsys, trees_dir, sft_output):
    _stage("sft", tmp_path, sft_output)


def smoke_dpo(tmp_path, capsys, trees_dir, sft_output):
    _stage("dpo", tmp_path, sft_output)


def smoke_kto(tmp_path, capsys, trees_dir, sft_output):
    _stage("kto", tmp_path, sft_output)


def smoke_nca(tmp_path, capsys, trees_dir, sft_output):
    _stage("nca", tmp_path, sft_output)


def smoke_eval(tmp_path, capsys, trees_dir, sft_output):
    spec = tmp_path / "eval.yaml"
    spec.write_text(yaml.safe_dump({"problems": "addition:4:999:2:heldout", "max_new_tokens": 8,
                                    "models": {"base": {"model": "tiny-mixtral-char"}}}))
    _cli(["eval", "--config", spec, "--output", tmp_path / "eval"])
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["models"]["base"]["n"] == 4


def smoke_publish(tmp_path, capsys, trees_dir, sft_output):
    _cli(["publish", sft_output, "--repo-id", "org/tiny", "--dry-run", "--output", tmp_path / "hub"])
    assert (tmp_path / "hub" / "README.md").is_file() and (tmp_path / "hub" / "adapter_config.json").is_file()


def _pipeline(tmp_path):
    spec = {"output_dir": str(tmp_path / "out"), "accelerate_config": str(REPO / "recipes" / "accelerate" / "cpu.yaml"),
            "stages": [{"name": "data", "kind": "data", "generator": "addition-sft", "n": 16, "seed": 1, "digits": [2]},
                       {"name": "boot", "kind": "sft", "recipe": str(REPO / "recipes" / "quickstart" / "bootstrap.yaml"),
                        "set": {"datasets": ["${data}/train.jsonl"], "max_steps": 1, "per_device_train_batch_size": 4}}]}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def smoke_run(tmp_path, capsys, trees_dir, sft_output):
    """`align run`, whose training stages go through `accelerate launch -m align STAGE`."""
    _cli(["run", _pipeline(tmp_path)])
    assert (tmp_path / "out" / "boot" / "model.safetensors").is_file()
    assert "accelerate.commands.launch" in (tmp_path / "out" / "boot" / "log.txt").read_text()


def smoke_accelerate_config(tmp_path, capsys, trees_dir, sft_output):
    """`align STAGE --accelerate_config NAME`: checked here, then trained under `accelerate launch`."""
    out = _cli(["sft", "--accelerate_config", "cpu", *stage_args("sft.yaml", tmp_path / "sft", "--max_steps", "1")],
               capsys)
    assert "launching accelerate launch --config_file recipes/accelerate/cpu.yaml -m align sft" in out
    assert (tmp_path / "sft" / "adapter_model.safetensors").is_file()


def smoke_run_check(tmp_path, capsys, trees_dir, sft_output):
    out = _cli(["run", REPO / "recipes" / "quickstart" / "pipeline.yaml", "--check"], capsys)
    assert out.strip().endswith("13 stages check out")


SMOKE = {name[len("smoke_"):].replace("_", " "): fn for name, fn in dict(globals()).items() if name.startswith("smoke_")}
SMOKE["accelerate launch"] = smoke_run
SMOKE["--accelerate_config"] = SMOKE.pop("accelerate config")
SMOKE["run --check"] = SMOKE.pop("run check")


def test_every_readme_command_has_a_smoke_run():
    documented = readme_commands()
    assert {"run", "sft", "trees build", "quantize", "accelerate launch"} <= documented  # the parser works
    assert documented - set(SMOKE) == set(), "README / docs commands without a smoke run"


@pytest.mark.parametrize("command", sorted(set(SMOKE) - {"accelerate launch"}))
def test_readme_command_runs(command, tmp_path, capsys, trees_dir, sft_output):
    SMOKE[command](tmp_path, capsys, trees_dir, sft_output)
