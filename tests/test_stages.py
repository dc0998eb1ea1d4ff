"""Tiny-model runs of every stage from its recipe: they train, log MoE statistics and write PEFT adapters."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, logits_of, stage_args


def _base_model():
    from transformers import AutoModelForCausalLM

    from align.train.models import resolve_model_path

    return AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-mixtral"), dtype=torch.float32)


def _adapter_groups(folder):
    from align.moe.lora import parameter_group

    weights = load_file(str(folder / "adapter_model.safetensors"))
    groups = {}
    for name, tensor in weights.items():
        groups.setdefault(parameter_group(name), []).append((name, tensor))
    return groups


def test_expert_and_router_lora_get_gradients():
    from peft import get_peft_model

    from align.train.config import ModelArguments
    from align.moe.lora import build_lora_config, parameter_group

    model = get_peft_model(_base_model(), build_lora_config(ModelArguments(lora_r=4), _base_model()))
    ids = torch.tensor([[1, 5, 9, 200, 3000, 17, 28, 99]])
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    (out.loss + 0.02 * out.aux_loss).backward()
    seen = {"attention": 0, "experts": 0, "router": 0}
    for name, param in model.named_parameters():
        if param.requires_grad and "lora_B" in name:  # B starts at zero, so A's gradient is zero on step one
            assert param.grad is not None and param.grad.abs().sum() > 0, name
            seen[parameter_group(name)] += 1
    assert seen["experts"] == 2 * 2 and seen["router"] == 2 and seen["attention"] == 4 * 2


def test_sft_changes_the_model_and_adapter_reloads_in_plain_peft(sft_run):
    from peft import PeftModel

    out, trained_logits = sft_run
    base_logits = logits_of(_base_model())
    assert (trained_logits - base_logits).abs().max() > 1e-4, "SFT did not change the model's output"

    reloaded = PeftModel.from_pretrained(_base_model(), str(out))
    torch.testing.assert_close(logits_of(reloaded), trained_logits, rtol=1e-5, atol=1e-5)

    groups = _adapter_groups(out)
    for group in ("attention", "experts", "router"):
        assert groups.get(group), f"adapter has no {group} LoRA weights"
    assert any(t.abs().sum() > 0 for n, t in groups["experts"] if "lora_B" in n)
    assert any(t.abs().sum() > 0 for n, t in groups["router"] if "lora_B" in n)
    assert (out / "align_config.yaml").is_file() and (out / "tokenizer.json").is_file()


def test_sft_logs_aux_loss_and_expert_load(sft_output):
    history = json.loads((sft_output / "trainer_state.json").read_text())["log_history"]
    train_logs = [h for h in history if "loss" in h]
    assert train_logs and all("aux_loss" in h for h in train_logs)
    log = train_logs[-1]
    loads = [v for k, v in log.items() if k.startswith("router/layer_0/expert_")]
    assert len(loads) == 4 and sum(loads) == pytest.approx(1.0, abs=1e-3)
    assert 0 < log["router/layer_0/entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-4


@pytest.mark.parametrize("stage", ["dpo", "kto", "nca"])
def test_preference_stage_from_sft_adapter(stage, sft_run, tmp_path):
    import importlib

    from peft import PeftModel

    sft_out, sft_logits = sft_run
    module = importlib.import_module({"dpo": "align.dpo.train", "kto": "align.kto_nca.kto", "nca": "align.kto_nca.nca"}[stage])
    trainer = module.main(stage_args(f"{stage}.yaml", tmp_path, "--adapter_name_or_path", str(sft_out),
                                     "--max_steps", "2", "--logging_steps", "1", "--learning_rate", "5e-3"))
    # The reference is a frozen copy of the SFT adapter, never the bare base model.
    ref = trainer.model.peft_config.get("ref")
    assert ref is not None
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    assert all("aux_loss" in h and "router/max_expert_load" in h for h in history if "loss" in h)

    reloaded = PeftModel.from_pretrained(_base_model(), str(tmp_path))
    assert (logits_of(reloaded) - sft_logits).abs().max() > 1e-5, f"{stage} did not move the SFT model"
    assert not (tmp_path / "ref").exists(), "the frozen reference copy should not be published"
    groups = _adapter_groups(tmp_path)
    assert groups.get("experts") and groups.get("router")


def test_resume_from_last_checkpoint(tmp_path):
    from align.sft.train import main

    main(stage_args("sft.yaml", tmp_path, "--max_steps", "2", "--save_steps", "2", "--logging_steps", "1"))
    assert (tmp_path / "checkpoint-2").is_dir()
    # The run is "killed" after step 2; a longer run with --resume_from_checkpoint picks up at step 3.
    trainer = main(stage_args("sft.yaml", tmp_path, "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1",
                              "--resume_from_checkpoint"))
    assert trainer.state.global_step == 4
    steps = [h["step"] for h in trainer.state.log_history if "loss" in h]
    assert steps == [1, 2, 3, 4]  # steps 1-2 come from the checkpoint's history, 3-4 from the resumed run


def test_merged_model_is_written(tmp_path):
    """The merged folder against the base plus the saved adapter, loaded apart (the trainer's own model is
    merged in place, so comparing with it would compare the merge with itself)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from align.sft.train import main

    main(stage_args("sft.yaml", tmp_path, "--max_steps", "3", "--save_merged_model", "true", "--learning_rate", "5e-2"))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    adapted = logits_of(PeftModel.from_pretrained(_base_model(), str(tmp_path)))
    torch.testing.assert_close(logits_of(merged), adapted, rtol=1e-4, atol=1e-4)
    assert (adapted - logits_of(_base_model())).abs().max() > 1e-3  # the adapter moved it: a wrong merge would show


def test_truncation_report_counts_cut_and_dropped_rows():
    from datasets import Dataset

    from align.train.training import truncation_report

    sft = Dataset.from_dict({"input_ids": [[1] * 5, [1] * 8, [1] * 8, [1] * 3]})
    assert truncation_report(4, sft, 8) == (4, "2 of the 4 rows left reach max_length 8 (cut there if longer) "
                                               "(raise max_length to keep them whole)")
    left, said = truncation_report(6, sft, 8)
    assert left == 4 and said.startswith("max_length 8 leaves 2 of 6 rows without a completion token")
    assert truncation_report(4, sft, 9) == (4, None) and truncation_report(4, sft, None) == (None, None)
    assert truncation_report(2, sft.select([0, 3]), 8) == (2, None)  # the rows of 8 are in its table, not in it
    pairs = Dataset.from_dict({"prompt_ids": [[1] * 4, [1] * 2], "chosen_ids": [[1] * 3, [1] * 2],
                               "rejected_ids": [[1] * 5, [1]]})
    assert truncation_report(2, pairs, 8)[1].startswith("1 of the 2 rows left reach max_length 8")  # 4 + 5 > 8
    assert truncation_report(2, pairs, 9) == (2, None)
    # packed: 4 rows in 2 bins is not 2 rows dropped; the prompt-only row (labels all -100) is, and under bfd
    # a row of max_length may have been cut
    x = -100
    packed = Dataset.from_dict({"input_ids": [[1] * 8, [1] * 8], "seq_lengths": [[3, 5], [6, 2]],
                                "labels": [[x, 1, 1, x, x, 1, 1, 1], [x, x, x, x, x, x, x, 1]]})
    assert truncation_report(4, packed, 6, "bfd") == (3, "max_length 6 leaves 1 of 4 rows without a completion "
                                                         "token, so they are not trained on (raise max_length to "
                                                         "keep them whole)")
    assert truncation_report(4, packed, 5, "bfd")[1].endswith("; 1 of the 3 rows left reach max_length 5 (cut there "
                                                              "if longer) (raise max_length to keep them whole)")
    assert truncation_report(4, packed, 6, "bfd_split") == (3, None)
    assert truncation_report(4, packed, 6, "wrapped") == (2, None)
    none_left = Dataset.from_dict({"input_ids": [[1] * 4], "seq_lengths": [[2, 2]], "labels": [[x] * 4]})
    assert truncation_report(2, none_left, 4, "bfd")[0] == 0


def test_a_stage_says_what_max_length_cut(tmp_path, capsys):
    """TRL cuts rows at max_length and drops those left without a completion token, silently; the stage says
    so, and refuses a max_length that leaves no row at all."""
    import yaml

    from align.core.errors import AlignError
    from align.sft.train import main

    long_prompt = " ".join(["seven plus eight"] * 30)
    rows = [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": "15"}]}
            for p in ["7+8", "1+2", "3+4", long_prompt, long_prompt]]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = yaml.safe_load((REPO / "recipes" / "tiny-mixtral" / "sft.yaml").read_text())
    recipe["datasets"] = [{"path": str(tmp_path / "rows.jsonl")}]
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(recipe))

    def run(max_length: int, out: str, *more: str):
        main(["--config", str(tmp_path / "sft.yaml"), "--output_dir", str(tmp_path / out), "--max_steps", "1",
              "--max_length", str(max_length), *more])
        return [line for line in capsys.readouterr().out.splitlines() if "warning:" in line]

    said = run(60, "short")
    assert said == ["[align] sft: warning: max_length 60 leaves 2 of 5 rows without a completion token, so they are "
                    "not trained on (raise max_length to keep them whole)"], said
    assert run(2048, "long") == []
    said = run(60, "packed", "--packing", "true")  # in bins of 60 the two cut rows stay, with nothing to train
    assert said == ["[align] sft: warning: max_length 60 leaves 2 of 5 rows without a completion token, so they are "
                    "not trained on (raise max_length to keep them whole)"], said
    with pytest.raises(AlignError, match="key 'max_length' is 8, which leaves none of the 5 rows"):
        run(8, "none")
    with pytest.raises(AlignError, match="key 'max_length' is 8, which leaves none of the 5 rows"):
        run(8, "none-packed", "--packing", "true")
