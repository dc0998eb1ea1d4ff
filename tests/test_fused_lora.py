"""The fused MoE-LoRA path equals PEFT's ParamWrapper path: outputs and every gradient."""

from __future__ import annotations

import copy

import pytest
import torch

from align.moe.fused_lora import apply_moe_lora_backend


def _tiny(num_experts=8, dtype=torch.float32, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=num_experts,
                           num_experts_per_tok=2, experts_implementation="eager")
    model = MixtralForCausalLM(config).to(dtype)
    lora = LoraConfig(r=4, lora_alpha=8, target_parameters=["experts.gate_up_proj", "experts.down_proj", "gate.weight"])
    model = get_peft_model(model, lora)
    with torch.no_grad():  # non-zero B so LoRA actually contributes
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.3)
    return model


def _block(model):
    return model.base_model.model.model.layers[0].mlp


def _run_block(model, x):
    x = x.clone().requires_grad_(True)
    out = _block(model)(x)
    (out.float() * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.float().detach(), x.grad.float(), grads


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("tokens", [3, 64])  # 3 tokens, top-2 of 8 experts: several experts get nothing
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_fused_matches_peft(tokens, dtype, tol):
    """Outputs, input gradients and (in float32) every LoRA gradient match PEFT.

    In bf16 both paths round differently and each LoRA gradient sits 1-3% from the exact one at this
    size, so there the fused gradients are held to PEFT's own accuracy against a float64 reference
    computed from the same bf16 weights, instead of to PEFT's rounding.
    """
    peft_model = _tiny(dtype=dtype)
    fused_model = copy.deepcopy(peft_model)
    report = apply_moe_lora_backend(fused_model, "fused")
    assert report["fused_experts"] == 1 and report["fused_routers"] == 1 and not report["fallbacks"]
    x = torch.randn(1, tokens, 32, dtype=dtype)
    ref_out, ref_dx, ref_grads = _run_block(peft_model, x)
    out, dx, grads = _run_block(fused_model, x)
    assert _rel(out, ref_out) < tol
    assert _rel(dx, ref_dx) < tol
    lora_names = [n for n in ref_grads if "lora_" in n]
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora_names} >= {"gate", "experts", "base_layer"}
    assert set(grads) == set(ref_grads)
    if dtype == torch.float32:
        for name in lora_names:
            assert _rel(grads[name], ref_grads[name]) < tol, name
    else:
        exact = copy.deepcopy(peft_model).to(torch.float64)
        _, _, exact_grads = _run_block(exact, x.double())
        for name in lora_names:
            ours, theirs = _rel(grads[name], exact_grads[name]), _rel(ref_grads[name], exact_grads[name])
            assert ours <= 1.5 * theirs + 2e-3, f"{name}: fused {ours:.4f} vs PEFT {theirs:.4f} from exact"
            assert _rel(grads[name], ref_grads[name]) < 5e-2, name
    # the fused path computes no gradient for the frozen base
    assert all("lora_" in n for n in grads)


def test_experts_with_no_tokens_get_zero_lora_gradient():
    model = _tiny()
    apply_moe_lora_backend(model, "fused")
    x = torch.randn(1, 1, 32)  # one token: 2 of 8 experts used
    _, _, grads = _run_block(model, x)
    a = grads["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.default.weight"].reshape(8, 4, -1)
    used = (a.abs().sum(dim=(1, 2)) > 0).sum().item()
    assert used == 2


def test_disabled_adapter_and_reference_adapter_follow_peft():
    peft_model = _tiny()
    fused_model = copy.deepcopy(peft_model)
    apply_moe_lora_backend(fused_model, "fused")
    x = torch.randn(1, 8, 32)
    with torch.no_grad():
        with peft_model.disable_adapter(), fused_model.disable_adapter():
            torch.testing.assert_close(_block(fused_model)(x), _block(peft_model)(x), rtol=1e-5, atol=1e-6)
        base = _block(fused_model)(x)
    for m in (peft_model, fused_model):  # a second adapter, as DPO's frozen "ref" copy
        m.add_adapter("ref", m.peft_config["default"])
        m.set_adapter("ref")
    with torch.no_grad():
        torch.testing.assert_close(_block(fused_model)(x), _block(peft_model)(x), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(_block(fused_model)(x), base)


def test_gradient_checkpointing_recomputes_the_same_routing():
    from align.train.models import resolve_model_path
    from align.train.config import ModelArguments
    from align.moe.lora import build_lora_config
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    def grads(checkpointing):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-mixtral"), dtype=torch.float32)
        model = get_peft_model(base, build_lora_config(ModelArguments(lora_r=4), base))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
        apply_moe_lora_backend(model, "fused")
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        ids = torch.tensor([[1, 5, 9, 200, 3000, 17, 28, 99, 7, 401]])
        out = model(input_ids=ids, labels=ids, output_router_logits=True)
        (out.loss + 0.02 * out.aux_loss).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert set(plain) == set(checkpointed) and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6)


def test_unknown_layout_falls_back_with_a_reason():
    model = _tiny()
    _block(model).gate.base_layer.__class__ = type("CustomRouter", (torch.nn.Module,), {})
    report = apply_moe_lora_backend(model, "fused")
    assert report["fused_routers"] == 0 and any("CustomRouter" in r for r in report["fallbacks"])


def test_whole_model_loss_aux_loss_and_gradients_match_peft():
    peft_model = _tiny(num_experts=4)
    fused_model = copy.deepcopy(peft_model)
    apply_moe_lora_backend(fused_model, "fused")
    ids = torch.randint(0, 128, (2, 12))
    results = []
    for model in (peft_model, fused_model):
        out = model(input_ids=ids, labels=ids, output_router_logits=True)
        (out.loss + 0.02 * out.aux_loss).backward()
        results.append((out.loss.item(), out.aux_loss.item(),
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, a0, g0), (l1, a1, g1) = results
    assert l1 == pytest.approx(l0, rel=1e-5) and a1 == pytest.approx(a0, rel=1e-5)
    for name in g0:
        assert _rel(g1[name], g0[name]) < 1e-4, name


def test_short_sft_same_loss_curve_and_adapters_round_trip(tmp_path):
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from align.train.models import resolve_model_path
    from align.sft.train import main as sft
    from conftest import FIXED_INPUT, stage_args

    curves = {}
    for backend in ("peft", "fused"):
        out = tmp_path / backend
        sft(stage_args("sft.yaml", out, "--max_steps", "4", "--logging_steps", "1", "--moe_lora_backend", backend))
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        curves[backend] = [h["loss"] for h in history if "loss" in h]
    assert len(curves["fused"]) == 4
    assert curves["fused"] == pytest.approx(curves["peft"], rel=1e-3)

    # an adapter trained with plain PEFT continues under the fused path with the same outputs
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-mixtral"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(tmp_path / "peft"), is_trainable=True)
    ids = torch.tensor(FIXED_INPUT)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        report = apply_moe_lora_backend(model, "fused")
        fused = model(input_ids=ids).logits
    assert report["fused_experts"] == 2 and report["fused_routers"] == 2
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_adapter_layout_is_checked_against_the_installed_peft(monkeypatch):
    from peft.tuners.lora.layer import ParamWrapper

    model = _tiny()
    with torch.no_grad():  # a fresh adapter: B is zero, which any layout would reproduce
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.zero_()
    before = {n: p.clone() for n, p in model.named_parameters() if "lora_" in n}
    original = ParamWrapper.get_delta_factors

    def another_layout(self, adapter):  # as if a PEFT release ordered the experts of B differently
        lhs, rhs, scaling = original(self, adapter)
        return lhs.flip(0), rhs, scaling

    monkeypatch.setattr(ParamWrapper, "get_delta_factors", another_layout)
    rng = torch.get_rng_state()
    report = apply_moe_lora_backend(model, "fused")
    assert torch.equal(torch.get_rng_state(), rng)  # the probe leaves the training run's random stream alone
    assert report["fused_experts"] == 0 and any("layout" in r for r in report["fallbacks"])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_" in n)  # probe undone


def test_bf16_router_whose_rows_are_under_16_bytes():
    """4 experts in bf16: router logits rows of 8 bytes, which grouped GEMM kernels refuse."""
    peft_model = _tiny(num_experts=4, dtype=torch.bfloat16)
    fused_model = copy.deepcopy(peft_model)
    assert apply_moe_lora_backend(fused_model, "fused")["fused_routers"] == 1
    x = torch.randn(1, 5, 32, dtype=torch.bfloat16)
    ref_out, ref_dx, _ = _run_block(peft_model, x)
    out, dx, grads = _run_block(fused_model, x)
    assert _rel(out, ref_out) < 1e-2 and _rel(dx, ref_dx) < 1e-2
    assert any(".gate." in n and "lora_B" in n for n in grads)


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_fused_trains_under_autocast_like_peft(amp):
    """float32 weights under autocast (what `bf16: true` / `fp16: true` run): the fused path computes in the
    autocast dtype as PEFT's does, and its gradients reach the float32 LoRA weights. Both paths are held to
    the float32 result: the fused one no worse than PEFT's own rounding (plus a margin)."""
    peft_model = _tiny()
    fused_model = copy.deepcopy(peft_model)
    apply_moe_lora_backend(fused_model, "fused")
    exact = _run_block(copy.deepcopy(peft_model), torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(3)))
    x = torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=amp):
        ours = _run_block(fused_model, x)
        theirs = _run_block(peft_model, x)
    assert set(ours[2]) == set(theirs[2]) and all(p.dtype == torch.float32 for p in fused_model.parameters())
    for got, ref, full in ((ours[0], theirs[0], exact[0]), (ours[1], theirs[1], exact[1])):
        assert _rel(got, full) <= 2 * _rel(ref, full) + 1e-2
    for name in theirs[2]:
        if "lora_" in name:
            assert _rel(ours[2][name], exact[2][name]) <= 2 * _rel(theirs[2][name], exact[2][name]) + 2e-2, name
