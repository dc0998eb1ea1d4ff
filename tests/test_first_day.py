"""First-day breaks (issue 24): PEFT's LoRA target spellings, an export of a build that solved nothing,
user errors under a 2-process launch, and a build or eval whose server is down."""

from __future__ import annotations

import json

import pytest

from conftest import REPO


# ---------------------------------------------------------------- an export of a build with no correct answer
def test_an_export_of_a_build_that_solved_nothing_loads_config_by_config(tmp_path, capsys):
    from datasets import load_dataset
    from huggingface_hub import DatasetCard

    from align.cli import main
    from align.trees.builder import build_trees
    from test_trees import OracleBackend, _config

    config, actor, critic, limits = _config(tmp_path, problems="arithmetic:3:5", max_turns=2)
    build_trees(config, actor, critic, limits, actor=OracleBackend(0.0))  # every answer wrong
    capsys.readouterr()
    export = tmp_path / "export"
    assert main(["trees", "export", str(tmp_path / "trees"), "--output", str(export)]) == 0
    out, err = capsys.readouterr()
    counts = json.loads(out.strip().splitlines()[-1])
    assert counts["sft"] == counts["pairs"] == counts["pairs_ultrainteract"] == 0 and counts["kto"] > 0
    assert counts["empty_configs"] == ["sft", "pairs", "pairs_ultrainteract"]
    warning = [line for line in err.splitlines() if "no correct answer" in line]
    assert len(warning) == 1 and "sft, pairs, pairs_ultrainteract left out of the card" in warning[0]

    card = DatasetCard.load(export / "README.md")
    listed = [c["config_name"] for c in card.data.to_dict()["configs"]]
    assert listed == ["kto"]
    assert "`sft`, `pairs`, `pairs_ultrainteract` have no rows" in card.text and "no correct answer" in card.text
    cache = str(tmp_path / "cache")
    for name in listed:  # every config the card names loads, as it would from the Hub
        loaded = load_dataset(str(export), name=name, cache_dir=cache)
        assert len(loaded["train"]) == counts[name]
    import pyarrow.parquet as pq

    for name in counts["empty_configs"]:  # the empty ones keep their columns, in an empty parquet file
        empty = pq.read_table(str(export / name / "train-00000-of-00001.parquet"))
        assert empty.num_rows == 0 and {"id", "chosen" if "pairs" in name else "completion"} <= set(empty.column_names)
    from align.train.data import load_one
    from align.core.errors import AlignError

    with pytest.raises(AlignError, match="has no rows"):  # a stage given the empty folder says so in one line
        load_one(str(export / "sft"))

    # In a mixture, an empty part (one task's trees with no correct answer) is left out, saying so; the stage
    # trains on the rest. Only a mixture with no rows at all is an error.
    from align.train.config import DataArguments
    from align.train.data import load_training_data

    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{i} + 1?"},
                                                      {"role": "assistant", "content": str(i + 1)}]}) + "\n"
                             for i in range(3)))
    capsys.readouterr()
    mixed = load_training_data(DataArguments(datasets=[str(export / "sft"), str(other)]), "sft")
    assert len(mixed) == 3
    assert capsys.readouterr().out == f"[align] sft: dataset {export / 'sft'}: has no rows (an export of trees with no " \
        "correct answer leaves its sft and pairs configs empty): left out of the mixture\n"
    with pytest.raises(AlignError, match=r"has no rows .*; and so have the other 1$"):
        load_training_data(DataArguments(datasets=[str(export / "sft"), str(export / "pairs")]), "sft")

    assert main(["trees", "stats", str(tmp_path / "trees")]) == 0
    err = capsys.readouterr().err
    assert sum("no correct answer" in line for line in err.splitlines()) == 1


# ---------------------------------------------------------------- PEFT's LoRA target spellings
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
SAME_AS_DEFAULT = {  # every spelling PEFT (or axolotl, or TRL) takes for the default targets of tiny-mixtral
    "ours": {},
    "axolotl: mlp.experts.*": {"lora_target_modules": ATTENTION,
                               "lora_target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj",
                                                          "mlp.gate.weight"]},
    "suffix: experts.*": {"lora_target_modules": ATTENTION,
                          "lora_target_parameters": ["experts.gate_up_proj", "experts.down_proj", "gate.weight"]},
    "last name only": {"lora_target_modules": ATTENTION, "lora_target_parameters": ["gate_up_proj", "down_proj", "gate.weight"]},
    "full names": {"lora_target_modules": [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ATTENTION],
                   "lora_target_parameters": [f"model.layers.{i}.mlp.{p}" for i in (0, 1)
                                              for p in ("experts.gate_up_proj", "experts.down_proj", "gate.weight")]},
    "all-linear + parameters": {"lora_target_modules": "all-linear",
                                "lora_target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj",
                                                           "mlp.gate.weight"]},
    "regex string": {"lora_target_modules": r".*\.(self_attn\.[qkvo]_proj|mlp\.experts|mlp\.gate)"},
    "module names of the stacks": {"lora_target_modules": [*[f"self_attn.{p}" for p in ATTENTION], "mlp.experts", "gate"]},
    "per-expert names": {"lora_target_modules": [*ATTENTION, "w1", "w2", "w3", "router"]},
    "weights as parameters": {"lora_target_parameters": [*[f"self_attn.{p}.weight" for p in ATTENTION],
                                                         "experts.gate_up_proj", "experts.down_proj", "router.weight"],
                              "lora_attention": False},
}


@pytest.fixture(scope="module")
def tiny_base():
    from transformers import AutoModelForCausalLM

    from align.train.models import resolve_model_path

    return AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-mixtral"), dtype="float32")


def _model_args(keys: dict):
    from trl import SFTConfig

    from align.train.config import parse_stage_recipe

    return parse_stage_recipe(SFTConfig, {"datasets": ["d.jsonl"], "output_dir": "o", **keys}, "r.yaml", apply_env=False)[0]


def _adapter(base, keys: dict):
    """(LoRA state-dict keys and shapes, the fused backend's report, the targets report) of a spelling."""
    import copy

    from peft import get_peft_model

    from align.moe.fused_lora import apply_moe_lora_backend
    from align.moe.lora import build_lora_config, format_targets_report, resolve_lora_targets

    model_args = _model_args(keys)
    model = copy.deepcopy(base)
    targets = resolve_lora_targets(model_args, model)
    peft_model = get_peft_model(model, build_lora_config(model_args, model, targets))
    adapter = {k: tuple(v.shape) for k, v in peft_model.state_dict().items() if "lora_" in k}
    return adapter, apply_moe_lora_backend(peft_model, "fused"), format_targets_report(targets)


@pytest.mark.parametrize("spelling", list(SAME_AS_DEFAULT))
def test_every_peft_spelling_gives_the_same_adapter(tiny_base, spelling):
    reference, fused_reference, _ = _adapter(tiny_base, {})
    adapter, fused, report = _adapter(tiny_base, SAME_AS_DEFAULT[spelling])
    assert len(reference) == 2 * 2 * (4 + 2 + 1)  # 2 layers: A and B of 4 projections, 2 stacks and the router
    assert adapter == reference
    assert fused == fused_reference and fused["fused_experts"] == 2 and fused["fused_routers"] == 2
    assert report.startswith("lora targets: ") and "mlp.experts.gate_up_proj" in report.split("->", 1)[1]


def test_a_layer_spelling_adapts_that_layer_only_and_the_fused_path_follows(tiny_base):
    import torch

    adapter, fused, report = _adapter(tiny_base, {"lora_target_parameters": ["model.layers.1.mlp.experts.gate_up_proj"]})
    stacks = sorted(k for k in adapter if ".experts." in k)
    assert stacks == ["base_model.model.model.layers.1.mlp.experts.lora_A.default.weight",
                      "base_model.model.model.layers.1.mlp.experts.lora_B.default.weight"]
    assert fused["fused_experts"] == 1 and fused["fused_routers"] == 0 and not fused["fallbacks"]
    assert "'model.layers.1.mlp.experts.gate_up_proj' -> model.layers.1.mlp.experts.gate_up_proj" in report
    # the fused forward (only gate_up_proj adapted) equals PEFT's
    import copy

    from peft import get_peft_model

    from align.moe.fused_lora import apply_moe_lora_backend
    from align.moe.lora import build_lora_config

    model_args = _model_args({"lora_target_parameters": ["model.layers.1.mlp.experts.gate_up_proj"], "lora_attention": False})
    model = copy.deepcopy(tiny_base)
    peft_model = get_peft_model(model, build_lora_config(model_args, model))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.3)
    fused_model = copy.deepcopy(peft_model)
    assert apply_moe_lora_backend(fused_model, "fused")["fused_experts"] == 1
    ids = torch.tensor([[1, 733, 16289, 28793, 28705, 28740]])
    with torch.no_grad():
        assert torch.allclose(fused_model(ids).logits, peft_model(ids).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("keys,message", [
    ({"lora_target_parameters": ["mlp.expert.gate_up_proj"]},
     "r.yaml: key 'lora_target_parameters': 'mlp.expert.gate_up_proj' matches no parameter of MixtralForCausalLM; "
     "it has model.embed_tokens.weight, self_attn.q_proj.weight"),
    ({"lora_target_parameters": ["input_layernorm.weight"]}, "names only 1-D parameters"),
    ({"lora_target_modules": ["qproj"]},
     "key 'lora_target_modules': 'qproj' matches no module of MixtralForCausalLM that LoRA can adapt; it has "
     "model.embed_tokens, self_attn.q_proj, self_attn.k_proj, self_attn.v_proj, self_attn.o_proj, lm_head, "
     "mlp.experts, mlp.gate"),
    ({"lora_target_modules": "model\\.layers\\.9\\..*"}, "matches no module"),
    ({"lora_target_modules": "(q_proj"}, "is not a valid regular expression"),
])
def test_a_spelling_that_matches_nothing_is_one_line_before_the_data_loads(tmp_path, capsys, keys, message):
    import yaml

    from align.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model_name_or_path": "tiny-mixtral", "output_dir": str(tmp_path / "o"),
                                      "datasets": [str(tmp_path / "not-there.jsonl")], **keys}))
    with pytest.raises(SystemExit) as stop:
        main(["sft", "--config", str(recipe)])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("align: error: ") and message.replace("r.yaml", str(recipe)) in err[0]


def test_the_axolotl_spelling_trains_with_the_default_adapter_keys(tmp_path, capsys, tiny_base):
    from safetensors.torch import load_file

    from align.sft.train import main as sft

    from conftest import stage_args

    sft(stage_args("sft.yaml", tmp_path / "out", "--max_steps", "1", "--lora_target_modules", *ATTENTION,
                   "--lora_target_parameters", "mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"))
    out = capsys.readouterr().out
    assert "[align] sft: lora targets: lora_target_modules 'q_proj' -> model.layers.{0-1}.self_attn.q_proj" in out
    assert "lora_target_parameters 'mlp.experts.gate_up_proj' -> model.layers.{0-1}.mlp.experts.gate_up_proj" in out
    assert "fused expert stacks=2 fused routers=2" in out
    saved = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == set(ATTENTION)
    assert set(config["target_parameters"]) == {"gate_up_proj", "down_proj", "gate.weight"}
    reference = _adapter(tiny_base, {"lora_r": 8})[0]  # the recipe's rank, the default targets' adapter, as PEFT saves it (no adapter name)
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k.replace(".default.", "."): v for k, v in reference.items()}


# ---------------------------------------------------------------- a build or an eval whose server is down
def _dead_url():
    from test_trees import _free_port

    return f"http://127.0.0.1:{_free_port()}/v1"  # loopback, nothing listens there


def test_a_build_against_a_dead_server_stops_in_seconds_with_one_line(tmp_path, capsys):
    import time

    import yaml

    from align.cli import main

    url = _dead_url()
    recipe = tmp_path / "trees.yaml"
    recipe.write_text(yaml.safe_dump({"problems": "arithmetic:6:0", "output_dir": str(tmp_path / "trees"),
                                      "progress": False, "actor": {"backend": "server", "model": "m", "base_urls": [url],
                                                                   "max_retries": 4, "backoff_s": 5}}))
    start = time.monotonic()
    with pytest.raises(SystemExit) as stop:
        main(["trees", "build", "--config", str(recipe)])
    assert time.monotonic() - start < 60  # one request's retries alone would wait 5 + 10 + 20 + 40 s
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"align: error: actor: no server answers at base_urls ({url}/: ")
    assert "Connect" in err[0] and "actor.base_urls" in err[0]
    assert not (tmp_path / "trees" / "failures.jsonl").exists()  # no problem was tried


class _BusyHandler(__import__("http.server").server.BaseHTTPRequestHandler):
    """A server that is up (GET answers 501) but refuses every completion with a 400."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        from test_trees import _send_json

        self.rfile.read(int(self.headers["Content-Length"]))
        _send_json(self, 400, {"error": "model m is not served here"})


def test_a_dead_url_is_left_out_and_a_build_where_every_problem_failed_says_so(tmp_path, capsys):
    import threading
    from http.server import ThreadingHTTPServer

    import yaml

    from align.cli import main

    class _Server(ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass  # a client that hung up before its 400 (the build had already given up) is not the build's output

    server = _Server(("127.0.0.1", 0), _BusyHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dead, alive = _dead_url(), f"http://127.0.0.1:{server.server_address[1]}/v1"
        recipe = tmp_path / "trees.yaml"
        recipe.write_text(yaml.safe_dump({"problems": "arithmetic:3:0", "output_dir": str(tmp_path / "trees"),
                                          "progress": False, "actor": {"backend": "server", "model": "m",
                                                                       "base_urls": [dead, alive], "max_retries": 0}}))
        assert main(["trees", "build", "--config", str(recipe)]) == 1
    finally:
        server.shutdown()
    out, err = capsys.readouterr()
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["failed"] == 3 and summary["built"] == 0
    assert summary["backend"]["requests"] == 3 * 2  # the first turn's 2 samples of each problem, no retry
    err = err.strip().splitlines()
    assert len(err) == 2, err
    assert err[0].startswith(f"align: warning: actor: {dead}/ does not answer (") and "using the other base_urls" in err[0]
    failures = tmp_path / "trees" / "failures.jsonl"
    assert err[1].startswith(f"align: trees: every problem failed (3 of 3); the errors are in {failures} (first: ")
    assert "HTTP 400" in err[1] and len(failures.read_text().splitlines()) == 3
    assert all(alive in json.loads(line)["error"] for line in failures.read_text().splitlines())  # none to the dead one


def test_an_eval_through_a_dead_server_stops_in_seconds_with_one_line(tmp_path, capsys):
    import time

    import yaml

    from align.cli import main

    url = _dead_url()
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(yaml.safe_dump({"problems": "addition:4", "models": {
        "served": {"model": "m", "backend": "server", "base_urls": [url], "max_retries": 8}}}))
    start = time.monotonic()
    with pytest.raises(SystemExit) as stop:
        main(["eval", "--config", str(recipe), "--output", str(tmp_path / "eval")])
    assert time.monotonic() - start < 60  # one request's retries alone would wait 1 + 2 + ... + 128 s
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"align: error: eval: model m: no server answers at base_urls ({url}/: ")


# ---------------------------------------------------------------- a user error under a 2-process launch
def _two_process_launch(module: str, tmp_path):
    """A real 2-process CPU launch (recipes/accelerate/multi_cpu.yaml) of a stage whose recipe is missing:
    every process meets the same user error, as early as a stage can (before TRL loads)."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", module, "--config_file", str(REPO / "recipes" / "accelerate" / "multi_cpu.yaml"),
           "-m", "align", "sft", "--config", str(tmp_path / "missing.yaml")]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_under_plain_accelerate_launch_a_user_error_is_printed_once_and_named_by_the_report(tmp_path):
    proc = _two_process_launch("accelerate.commands.launch", tmp_path)
    line = f"align: error: {tmp_path / 'missing.yaml'}: recipe file not found"
    assert proc.returncode != 0
    assert [x for x in proc.stderr.splitlines() if x.startswith("align: error:")] == [line]  # the main process only
    root_cause = proc.stderr.split("Root Cause (first observed failure):", 1)[1]
    assert f"traceback : {line}" in root_cause and "exitcode  : 2" in root_cause  # the launcher's report names it


def test_through_align_launch_a_user_error_is_one_line_without_the_launcher_report(tmp_path):
    proc = _two_process_launch("align.train.launch", tmp_path)  # what `align STAGE --accelerate_config` runs
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"align: error: {tmp_path / 'missing.yaml'}: recipe file not found",
        "align: accelerate launch: process 0 exited with code 2; its error is above (the others were stopped)"]


def test_a_sharded_config_on_a_cpu_machine_is_refused_before_the_launch(tmp_path, capsys, monkeypatch):
    import subprocess

    import torch

    from align.cli import main

    if torch.cuda.is_available():
        pytest.skip("a GPU machine runs FSDP")
    monkeypatch.delenv("ALIGN_CPU_FSDP", raising=False)
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("accelerate was launched"))
    with pytest.raises(SystemExit) as stop:
        main(["sft", "--config", str(REPO / "recipes" / "tiny-mixtral" / "sft.yaml"), "--output_dir", str(tmp_path / "o"),
              "--accelerate_config", "fsdp2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1
    assert err[0].startswith("align: error: ") and "fsdp2.yaml: the accelerate config asks for FSDP, which needs GPUs" in err[0]
