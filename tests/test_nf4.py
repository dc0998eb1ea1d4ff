"""4-bit (NF4) expert stacks: quantised per expert with bitsandbytes, trained through the fused path, equal
to dequantise-then-PEFT, never holding a dequantised stack across forward and backward, saved and loaded."""

from __future__ import annotations

import copy

import pytest
import torch

from align.moe.fused_lora import apply_moe_lora_backend
from align.moe.nf4 import Nf4Tensor, find_experts, is_nf4, quantize_experts_nf4, quantize_stack


def _tiny(num_experts=8, dtype=torch.float32, seed=0):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=num_experts,
                           num_experts_per_tok=2, experts_implementation="grouped_mm")
    return MixtralForCausalLM(config).to(dtype)


def _with_lora(model, seed=1):
    from peft import get_peft_model

    from align.train.config import ModelArguments
    from align.moe.lora import build_lora_config

    model = get_peft_model(model, build_lora_config(ModelArguments(lora_r=4, lora_alpha=8), model))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-zero B so LoRA actually contributes
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def _quantized_and_reference(dtype=torch.float32):
    """The 4-bit model, and a 16-bit model holding exactly its dequantised weights (the reference)."""
    reference = _tiny(dtype=dtype)
    quantized = copy.deepcopy(reference)
    assert quantize_experts_nf4(quantized) == 4
    with torch.no_grad():
        for (_, ours), (_, theirs) in zip(find_experts(quantized), find_experts(reference)):
            theirs.gate_up_proj.copy_(ours.gate_up_proj.dequantize())
            theirs.down_proj.copy_(ours.down_proj.dequantize())
    return quantized, reference


def _train_step(model, embeds):
    embeds = embeds.clone().requires_grad_(True)
    labels = torch.arange(embeds.shape[1]).remainder(128).unsqueeze(0)
    out = model(inputs_embeds=embeds, labels=labels, output_router_logits=True)
    (out.loss + 0.02 * out.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out.loss.item(), embeds.grad, grads


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def test_stack_is_quantised_per_expert_with_bitsandbytes():
    import bitsandbytes.functional as bnbf

    stack = torch.randn(4, 96, 64)
    nf4 = quantize_stack(stack)
    assert nf4.packed.dtype == torch.uint8 and nf4.packed.numel() == stack.numel() // 2
    assert nf4.shape == stack.shape and nf4.dtype == stack.dtype
    whole = nf4.dequantize()
    for e in range(4):
        packed, state = bnbf.quantize_4bit(stack[e], blocksize=64, quant_type="nf4", compress_statistics=False)
        expected = bnbf.dequantize_4bit(packed, state)
        assert torch.equal(whole[e], expected)
        assert torch.equal(nf4[e], expected)  # indexing one expert dequantises that expert alone
    assert 0 < _rel(whole, stack) < 0.15  # NF4 error, not an identity
    with pytest.raises(ValueError, match="multiple of the NF4 block"):
        quantize_stack(torch.randn(2, 3, 7))


@pytest.mark.parametrize("tokens", [3, 40])  # 3 tokens, top-2 of 8 experts: several experts get nothing
def test_fused_4bit_matches_dequantize_then_peft(tokens):
    quantized, reference = _quantized_and_reference()
    fused, ref = _with_lora(quantized), _with_lora(reference)
    report = apply_moe_lora_backend(fused, "fused")
    assert report["fused_experts"] == 2 and not report["fallbacks"]
    embeds = torch.randn(1, tokens, 32)
    loss, dx, grads = _train_step(fused, embeds)
    ref_loss, ref_dx, ref_grads = _train_step(ref, embeds)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert _rel(dx, ref_dx) < 1e-5
    assert set(grads) == set(ref_grads) and any(".experts." in n for n in grads)
    for name in ref_grads:
        assert _rel(grads[name], ref_grads[name]) < 1e-5, name
    # The same adapter names as on a 16-bit base: adapters move between the two.
    assert {n for n, _ in fused.named_parameters() if "lora_" in n} == {n for n, _ in ref.named_parameters() if "lora_" in n}


def test_peft_backend_on_4bit_is_dequantize_then_peft():
    quantized, reference = _quantized_and_reference()
    peft_4bit, ref = _with_lora(quantized), _with_lora(reference)
    apply_moe_lora_backend(peft_4bit, "peft")
    embeds = torch.randn(1, 16, 32)
    for _ in range(2):  # PEFT's parametrization comes off cleanly: the second step is the same as the first
        loss, dx, grads = _train_step(peft_4bit, embeds)
        ref_loss, ref_dx, ref_grads = _train_step(ref, embeds)
        assert loss == pytest.approx(ref_loss, rel=1e-6) and _rel(dx, ref_dx) < 1e-6
        assert all(_rel(grads[n], ref_grads[n]) < 1e-5 for n in ref_grads)
    assert all(is_nf4(experts.gate_up_proj) for _, experts in find_experts(peft_4bit))


def _largest_saved_tensor(model, embeds):
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(inputs_embeds=embeds.clone().requires_grad_(True))
    out.logits.sum().backward()
    return max(sizes)


def test_fused_4bit_keeps_no_dequantized_stack_between_forward_and_backward():
    quantized, _ = _quantized_and_reference()
    stack_numel = next(find_experts(quantized))[1].down_proj.numel()
    embeds = torch.randn(1, 4, 32)
    frozen = copy.deepcopy(quantized)  # no LoRA on the experts at all: the installed experts forward
    assert _largest_saved_tensor(frozen, embeds) < stack_numel
    fused = _with_lora(copy.deepcopy(quantized))
    apply_moe_lora_backend(fused, "fused")
    assert _largest_saved_tensor(fused, embeds) < stack_numel
    peft_4bit = _with_lora(quantized)  # PEFT's path keeps W + B·A for its backward: the test can fail
    apply_moe_lora_backend(peft_4bit, "peft")
    assert _largest_saved_tensor(peft_4bit, embeds) >= stack_numel


def test_quantized_base_saves_and_loads(tmp_path):
    from safetensors.torch import load_file

    from align.train.config import ModelArguments
    from align.train.models import load_model
    from align.moe.nf4 import save_quantized

    quantized, _ = _quantized_and_reference()
    save_quantized(quantized, tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert any(k.endswith(".nf4_packed") and v.dtype == torch.uint8 for k, v in saved.items())
    assert not any(k.endswith("experts.gate_up_proj") for k in saved)
    loaded, _ = load_model(ModelArguments(model_name_or_path=str(tmp_path), dtype="float32"))
    assert all(is_nf4(e.gate_up_proj) and is_nf4(e.down_proj) for _, e in find_experts(loaded))
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, quantized.eval()(input_ids=ids).logits, rtol=0, atol=0)
    from align.core.errors import AlignError

    with pytest.raises(AlignError, match="use experts_4bit: true, not load_in_4bit"):
        load_model(ModelArguments(model_name_or_path=str(tmp_path), dtype="float32", load_in_4bit=True))


def test_nf4_tensor_moves_and_copies_without_dequantising():
    nf4 = quantize_stack(torch.randn(2, 64, 32))
    for copied in (nf4.detach(), nf4.clone(), copy.deepcopy(nf4), nf4.to("cpu"), nf4.to(torch.bfloat16)):
        assert isinstance(copied, Nf4Tensor) and copied.shape == nf4.shape
    assert nf4.to(torch.bfloat16).dequantize().dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="frozen"):
        nf4.copy_(torch.zeros(2, 64, 32))


def test_qlora_sft_trains_and_adapter_loads_on_both_bases(sft_4bit, sft_output):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from align.train.config import ModelArguments
    from align.train.models import load_model, resolve_model_path
    from conftest import logits_of

    out, trained_logits = sft_4bit
    keys = set(load_file(str(out / "adapter_model.safetensors")))
    assert keys == set(load_file(str(sft_output / "adapter_model.safetensors")))  # same names as a 16-bit run
    on_4bit, _ = load_model(ModelArguments(experts_4bit=True, adapter_name_or_path=str(out), dtype="float32"))
    torch.testing.assert_close(logits_of(on_4bit), trained_logits, rtol=1e-5, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-mixtral"), dtype=torch.float32)
    on_16bit = logits_of(PeftModel.from_pretrained(base, str(out)))  # plain PEFT, 16-bit base: close, not equal
    assert (on_16bit - trained_logits).abs().max() < 0.1 * trained_logits.abs().max()


@pytest.mark.parametrize("stage", ["dpo", "kto", "nca"])
def test_preference_stages_accept_4bit_experts(stage, sft_4bit, tmp_path):
    import importlib
    import json

    from conftest import stage_args

    module = importlib.import_module({"dpo": "align.dpo.train", "kto": "align.kto_nca.kto", "nca": "align.kto_nca.nca"}[stage])
    trainer = module.main(stage_args(f"{stage}.yaml", tmp_path, "--adapter_name_or_path", str(sft_4bit[0]),
                                     "--max_steps", "1", "--logging_steps", "1", "--experts_4bit", "true"))
    assert sum(is_nf4(p) for p in trainer.model.parameters()) == 4
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    assert any("loss" in h for h in history) and (tmp_path / "adapter_model.safetensors").is_file()


def test_align_quantize_cli_writes_a_base_with_the_in_memory_logits(tmp_path, capsys):
    """`align quantize MODEL OUT`, then OUT as a recipe's model: nothing is quantised again, and the logits
    equal those of the same model quantised in memory (bit for bit)."""
    from transformers import AutoModelForCausalLM

    from align.cli import main
    from align.train.config import ModelArguments
    from align.train.models import load_model, load_tokenizer, resolve_model_path
    from align.moe.nf4 import is_quantized_checkpoint
    from conftest import logits_of

    out = tmp_path / "tiny-nf4"
    assert main(["quantize", "tiny-mixtral", str(out), "--dtype", "float32"]) == 0
    assert "4 expert stacks in NF4" in capsys.readouterr().out
    assert is_quantized_checkpoint(out) and not (tmp_path / ".tiny-nf4.partial").exists()
    loaded, _ = load_model(ModelArguments(model_name_or_path=str(out), dtype="float32", experts_4bit=True))
    assert all(is_nf4(e.gate_up_proj) and is_nf4(e.down_proj) for _, e in find_experts(loaded))
    in_memory = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-mixtral"), dtype=torch.float32)
    assert quantize_experts_nf4(in_memory) == 4
    torch.testing.assert_close(logits_of(loaded), logits_of(in_memory), rtol=0, atol=0)
    unquantized = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-mixtral"), dtype=torch.float32)
    assert (logits_of(loaded) - logits_of(unquantized)).abs().max() > 0  # the test can tell the two apart
    assert load_tokenizer(str(out)).chat_template


@pytest.mark.parametrize("case", ["output_not_empty", "no_such_folder", "not_a_model", "already_quantised", "no_experts"])
def test_align_quantize_bad_input_is_one_line(case, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from align.cli import main

    out, model = tmp_path / "out", "tiny-mixtral"
    if case == "output_not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "no_such_folder":
        model = str(tmp_path / "nope")
    elif case == "not_a_model":
        model = str(tmp_path)
    elif case == "already_quantised":
        assert main(["quantize", "tiny-mixtral", str(tmp_path / "q"), "--dtype", "float32"]) == 0
        model = str(tmp_path / "q")
    else:
        model = str(tmp_path / "llama")
        LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1)).save_pretrained(model)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["quantize", model, str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("align: error:"), err
    expected = {"output_not_empty": "not an empty folder", "no_such_folder": "not found", "not_a_model": "no config.json",
                "already_quantised": "already quantised", "no_experts": "no fused expert stacks"}[case]
    assert expected in err[0]
    if case == "output_not_empty":
        assert (out / "keep.txt").read_text() == "mine"


def test_experts_are_quantised_as_the_shards_load(tmp_path):
    """experts_4bit on a checkpoint in the Hub's per-expert layout, two shards (w1 and w3 of an expert may sit
    in different shards), and on transformers' own fused layout: the same NF4 model, bit for bit, as loading
    in 16 bits and quantising after, without the loader ever building a 16-bit stack."""
    from transformers import AutoModelForCausalLM

    from align.train.config import ModelArguments
    from align.train.models import load_model, resolve_model_path
    from align.moe.stream_load import save_hub_layout
    from conftest import logits_of

    path = resolve_model_path("tiny-mixtral")
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    save_hub_layout(full.state_dict(), full.config, tmp_path / "hub", shards=3)
    # the layout is the Hub's as transformers reads it: its own loader rebuilds the same 16-bit model from it
    hub = AutoModelForCausalLM.from_pretrained(tmp_path / "hub", dtype=torch.float32)
    torch.testing.assert_close(logits_of(hub), logits_of(full), rtol=0, atol=0)
    quantize_experts_nf4(full)
    expected = logits_of(full)
    built = []
    real_quantize_stack = __import__("align.moe.nf4", fromlist=["quantize_stack"]).quantize_stack
    import align.moe.nf4 as nf4

    nf4.quantize_stack = lambda *a, **k: built.append(1) or real_quantize_stack(*a, **k)  # a whole-stack quantisation
    try:
        for folder in (tmp_path / "hub", path):
            model, _ = load_model(ModelArguments(model_name_or_path=str(folder), dtype="float32", experts_4bit=True))
            assert all(is_nf4(e.gate_up_proj) and is_nf4(e.down_proj) for _, e in find_experts(model))
            torch.testing.assert_close(logits_of(model), expected, rtol=0, atol=0)
    finally:
        nf4.quantize_stack = real_quantize_stack
    assert not built, "a 16-bit stack was built and quantised whole"


def test_our_nf4_quantiser_is_bitsandbytes_format_bit_for_bit():
    import bitsandbytes.functional as bnbf

    from align.moe.nf4 import quantize_expert

    for x in (torch.zeros(64, 64), (torch.randn(128, 256) * 3).to(torch.bfloat16), torch.randn(64, 128).half(),
              torch.tensor([[0.5] * 64, [-2.0] * 64])):
        packed, state = bnbf.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=False)
        ours, absmax = quantize_expert(x)
        assert torch.equal(packed.view(-1), ours) and torch.equal(state.absmax.float(), absmax)
