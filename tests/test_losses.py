"""The DPO, NCA and KTO losses our stages train with equal the paper's formulas, computed by hand.

The policy adapter is perturbed away from its frozen reference copy first, so the rewards are non-zero
and a wrong formula, a wrong reference or a wrong completion mask would change the number.
"""

from __future__ import annotations

import math

import pytest
import torch

BETA = 0.1


def _rows():
    from align.train.data import ultrainteract_pair_row
    import json

    from conftest import REPO

    lines = (REPO / "data" / "tiny" / "pairs.jsonl").read_text().splitlines()[:4]
    return [ultrainteract_pair_row(json.loads(line)) for line in lines]


def _policy(sft_output):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from align.train.models import load_tokenizer, resolve_model_path

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-mixtral"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(sft_output), is_trainable=True)
    return model, load_tokenizer(str(sft_output))


def _perturb_policy(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".default." in name:
                param.add_(0.5 * torch.randn(param.shape, generator=gen))


def _ids(tokenizer, messages, generation_prompt=False):
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def _logp(model, prompt_ids, completion_ids, adapter):
    """Sum of log p(completion token | everything before it), under the named adapter."""
    model.set_adapter(adapter)
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logprobs = logits.log_softmax(-1)
    start = len(prompt_ids)
    return sum(logprobs[t - 1, ids[0, t]].item() for t in range(start, ids.shape[1]))


def _split(tokenizer, prompt, completion):
    prompt_ids = _ids(tokenizer, prompt, generation_prompt=True)
    full = _ids(tokenizer, prompt + completion)
    assert full[: len(prompt_ids)] == prompt_ids
    return prompt_ids, full[len(prompt_ids):]


def _trainer_loss(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.set_adapter("default")
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, batch))


def _logsig(x):
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("loss_type", ["sigmoid", "nca_pair"])
def test_pair_losses_match_formulas(sft_output, tmp_path, loss_type):
    from datasets import Dataset
    from trl import DPOConfig

    from align.dpo.trainer import MoEDPOTrainer

    rows = _rows()
    model, tokenizer = _policy(sft_output)
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=len(rows), beta=BETA, loss_type=[loss_type],
                     router_aux_loss_coef=0.0, bf16=False, use_cpu=True, report_to="none", max_length=None)
    trainer = MoEDPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    _perturb_policy(trainer.model)
    got = _trainer_loss(trainer)

    losses = []
    for row in rows:
        rewards = {}
        for side in ("chosen", "rejected"):
            p, c = _split(tokenizer, row["prompt"], row[side])
            rewards[side] = BETA * (_logp(trainer.model, p, c, "default") - _logp(trainer.model, p, c, "ref"))
        rc, rr = rewards["chosen"], rewards["rejected"]
        assert abs(rc) > 1e-3, "policy and reference must differ for this test to mean anything"
        if loss_type == "sigmoid":  # DPO: -log sigmoid(r_c - r_r)
            losses.append(-_logsig(rc - rr))
        else:  # NCA: -log sigmoid(r_c) - 0.5 log sigmoid(-r_c) - 0.5 log sigmoid(-r_r)
            losses.append(-_logsig(rc) - 0.5 * _logsig(-rc) - 0.5 * _logsig(-rr))
    want = sum(losses) / len(losses)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_kto_loss_matches_formula(sft_output, tmp_path):
    from datasets import Dataset
    from trl import KTOConfig

    from align.train.data import pairs_to_kto
    from align.kto_nca.trainer import MoEKTOTrainer

    rows = pairs_to_kto(Dataset.from_list(_rows()[:2])).to_list()  # desirable, undesirable, desirable, undesirable
    model, tokenizer = _policy(sft_output)
    wd, wu = 1.33, 1.0
    args = KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=len(rows), beta=BETA, desirable_weight=wd,
                     undesirable_weight=wu, router_aux_loss_coef=0.0, bf16=False, use_cpu=True, report_to="none",
                     max_length=None)
    trainer = MoEKTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    _perturb_policy(trainer.model)
    got = _trainer_loss(trainer)

    split = [_split(tokenizer, r["prompt"], r["completion"]) for r in rows]

    def logratio(p, c):
        return _logp(trainer.model, p, c, "default") - _logp(trainer.model, p, c, "ref")

    # z0: KL(pi || ref) estimated on mismatched pairs (x_i, y_{i-1}), clamped at zero.
    kl = sum(logratio(split[i][0], split[i - 1][1]) for i in range(len(rows))) / len(rows)
    kl = max(kl, 0.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    desirable = [wd * (1 - sig(BETA * (logratio(p, c) - kl))) for (p, c), r in zip(split, rows) if r["label"]]
    undesirable = [wu * (1 - sig(BETA * (kl - logratio(p, c)))) for (p, c), r in zip(split, rows) if not r["label"]]
    want = sum(desirable + undesirable) / len(rows)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
