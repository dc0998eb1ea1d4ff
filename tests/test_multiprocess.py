"""Training in two processes (DDP over gloo, on the CPU) equals one process with the same micro-batches,
saving goes through the trainer (the adapter loads in plain PEFT), and the router statistics are summed
over the processes and leave padding out."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, stage_args

MULTI_CPU = REPO / "recipes" / "accelerate" / "multi_cpu.yaml"


FSDP2 = REPO / "recipes" / "accelerate" / "fsdp2.yaml"


def _launch(stage, out, *extra, processes=2, config=MULTI_CPU):
    """`accelerate launch` of a tiny recipe: 2 processes of 4 rows, or 1 process accumulating 2 x 4 rows."""
    common = [*stage_args(f"{stage}.yaml", out, "--max_steps", "3", "--logging_steps", "1", "--per_device_train_batch_size",
                          "4", "--report_to", "none", "--learning_rate", "5e-3"), *map(str, extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if processes == 2:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
        if config == FSDP2:  # the shipped FSDP2 config as it is, on 2 CPU processes over gloo, in float32
            cmd += ["--num_processes", "2", "--mixed_precision", "no"]
            env["ALIGN_CPU_FSDP"] = "1"
        cmd += ["-m", "align", stage, *common]
    else:
        cmd = [sys.executable, "-m", "align", stage, *common, "--gradient_accumulation_steps", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_two_processes_equal_one_with_the_same_micro_batches(stage, tmp_path, sft_output):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from align.train.models import resolve_model_path

    extra = [] if stage == "sft" else ["--adapter_name_or_path", sft_output]
    two = _launch(stage, tmp_path / "two", *extra)
    assert "distributed=MULTI_CPU processes=2" in two and two.count("adapter written") == 1
    _launch(stage, tmp_path / "one", *extra, processes=1)
    a, b = load_file(str(tmp_path / "two" / "adapter_model.safetensors")), load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for key in a:  # float32 on one CPU: the same sums in the same order; stated tolerance 1e-6 relative
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-8)
    assert any(t.abs().sum() > 0 for k, t in a.items() if "lora_B" in k)
    history = {run: [h for h in json.loads((tmp_path / run / "trainer_state.json").read_text())["log_history"] if "loss" in h]
               for run in ("two", "one")}
    assert len(history["two"]) == len(history["one"]) == 3
    for x, y in zip(history["two"], history["one"]):  # router statistics summed over both processes
        assert {k: v for k, v in x.items() if k.startswith("router/")} == {k: v for k, v in y.items() if k.startswith("router/")}
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-mixtral"), dtype=torch.float32)
    PeftModel.from_pretrained(base, str(tmp_path / "two"))  # the saved adapter loads in plain PEFT
    assert not (tmp_path / "two" / "ref").exists()


def test_router_statistics_leave_padding_out():
    from transformers import AutoModelForCausalLM

    from align.train.models import resolve_model_path
    from align.moe.router_stats import RouterStats

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-mixtral"), dtype=torch.float32)
    stats = RouterStats(model)
    ids = torch.tensor([[1, 5, 9, 200, 3000, 17, 28, 99], [1, 7, 8, 9, 0, 0, 0, 0]])
    mask = torch.tensor([[1] * 8, [1] * 4 + [0] * 4])
    with torch.enable_grad():
        model(input_ids=ids, attention_mask=mask)
    tokens = [float(s[-1]) for s in stats._sums]
    assert tokens == [12.0] * len(stats.layers)  # 16 positions, 4 of them padding
    counts = [float(s[:-2].sum()) for s in stats._sums]
    assert counts == [12.0 * 2] * len(stats.layers)  # top-2 of each real token
    snap = stats.snapshot()
    assert sum(v for k, v in snap.items() if k.startswith("router/layer_0/expert_")) == pytest.approx(1.0)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_fsdp2_shards_on_two_cpu_processes_and_equals_one(stage, tmp_path, sft_output):
    """recipes/accelerate/fsdp2.yaml (one shard unit per decoder layer, sharded checkpoints) on 2 processes
    over gloo (ALIGN_CPU_FSDP, align/train/cpu_fsdp.py): the parameters are sharded, the final save gathers the
    full adapter, and it equals one process with the same micro-batches."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from align.train.models import resolve_model_path

    extra = [] if stage == "sft" else ["--adapter_name_or_path", sft_output]
    two = _launch(stage, tmp_path / "two", *extra, config=FSDP2)
    assert "distributed=FSDP processes=2" in two and two.count("adapter written") == 1
    sharded, total = map(int, re.search(r"fsdp: (\d+) of (\d+) parameter tensors sharded", two).groups())
    assert sharded == total > 0  # every parameter, LoRA's included, lives in shards
    _launch(stage, tmp_path / "one", *extra, processes=1)
    a, b = load_file(str(tmp_path / "two" / "adapter_model.safetensors")), load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for key in a:  # float32; stated tolerance 1e-6 relative (the reduce-scatter sums the same two gradients)
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-8)
    assert any(t.abs().sum() > 0 for k, t in a.items() if "lora_B" in k)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-mixtral"), dtype=torch.float32)
    PeftModel.from_pretrained(base, str(tmp_path / "two"))  # the gathered adapter loads in plain PEFT


def test_a_sharded_config_on_a_cpu_machine_is_refused(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU machine runs FSDP")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "recipes" / "accelerate" / "fsdp2.yaml"),
           "--num_processes", "2", "--mixed_precision", "no", "-m", "align", "sft",
           *stage_args("sft.yaml", tmp_path / "o", "--max_steps", "1")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode != 0 and "needs GPUs" in proc.stderr and not (tmp_path / "o" / "adapter_model.safetensors").exists()


def test_zero3_config_is_valid_but_cannot_run_here():
    """ZeRO-3 needs DeepSpeed and GPUs: its config is checked (keys, the MoE leaf class), not run."""
    import yaml

    config = yaml.safe_load((REPO / "recipes" / "accelerate" / "zero3.yaml").read_text())
    assert config["distributed_type"] == "DEEPSPEED" and config["deepspeed_config"]["zero_stage"] == 3
    from transformers import MixtralForCausalLM  # noqa: F401  (the class below must exist)
    import transformers.models.mixtral.modeling_mixtral as mixtral

    assert hasattr(mixtral, config["deepspeed_config"]["deepspeed_moe_layer_cls_names"])
    fsdp = yaml.safe_load((REPO / "recipes" / "accelerate" / "fsdp2.yaml").read_text())
    assert hasattr(mixtral, fsdp["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"])


def test_push_to_hub_pushes_the_saved_folder(tmp_path, monkeypatch):
    import align.publishing.publish

    pushed = []
    monkeypatch.setattr(align.publishing.publish, "push_folder", lambda folder, repo, **kw: pushed.append((folder, repo, kw)) or "url")
    from align.cli import main

    assert main(["sft", *stage_args("sft.yaml", tmp_path / "o", "--max_steps", "1", "--push_to_hub", "true",
                                    "--hub_model_id", "me/tiny-sft")]) == 0
    assert pushed == [(str(tmp_path / "o"), "me/tiny-sft", {"private": True})]
    assert (tmp_path / "o" / "adapter_model.safetensors").exists()
