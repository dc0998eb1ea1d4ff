"""Assistant-only masks on the chat templates real models ship (tests/fixtures/chat_templates.json), one
rendering for every stage, and SFT of a dense SmolLM2-shaped model through `align sft`.

Tokenizers are built here, offline: the [INST] families and Phi-3 (SentencePiece models) on the real Mixtral
SentencePiece file (plus the family's special tokens), the byte-level BPE families on a BPE trained on the
fly with the family's special tokens."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from align.train import chat
from align.core.errors import AlignError

FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "chat_templates.json").read_text())
SPLITTABLE = ["chatml_smollm2", "mixtral_instruct", "mixtral_instruct_v01_original", "llama3", "gemma", "phi3", "qwen2_5",
              "tulu_olmo2"]
TRL_PATCHED = ["llama3", "gemma", "phi3", "qwen2_5"]

SYSTEM = "You are a careful math tutor."
ROW = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Solve: what is 12 + 7? Present your final answer as \\boxed{Your Answer}."},
    {"role": "assistant", "content": "12 + 7 = 18.\nThe answer is \\boxed{18}."},
    {"role": "user", "content": "Observation: Your answer is wrong.\nCritique: 12 + 7 is 19; check the units digit."},
    {"role": "assistant", "content": "You are right: 2 + 7 = 9, so 12 + 7 = 19. The answer is \\boxed{19}."},
]
# what each family writes after an assistant message's content, before the next message (the last turn: to the end)
END_OF_TURN = {
    "chatml_smollm2": ("<|im_end|>\n", "<|im_end|>\n"),
    "mixtral_instruct": ("</s>", "</s>"),
    "mixtral_instruct_v01_original": ("</s>", "</s>"),
    "llama3": ("<|eot_id|>", "<|eot_id|>"),
    "gemma": ("<end_of_turn>\n", "<end_of_turn>\n"),
    "phi3": ("<|end|>\n", "<|end|>\n<|endoftext|>"),
    "qwen2_5": ("<|im_end|>\n", "<|im_end|>\n"),
    "tulu_olmo2": ("<|endoftext|>", "<|endoftext|>"),  # the newline after a middle turn's eos comes before <|user|>
}


@functools.lru_cache(maxsize=None)
def family_tokenizer(name: str):
    fixture = FIXTURES[name]
    if fixture["bos"] == "<s>":  # SentencePiece families
        from align.core.tiny_mixtral import build_mixtral_tokenizer

        tokenizer = build_mixtral_tokenizer()
        if fixture["specials"]:
            tokenizer.add_tokens(fixture["specials"], special_tokens=True)
        tokenizer.eos_token = fixture["eos"]
    else:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        corpus = [m["content"] for m in ROW] * 4 + ["system user assistant model You are a helpful AI assistant named "
                                                    "SmolLM, trained by Hugging Face. Qwen, created by Alibaba Cloud."]
        backend.train_from_iterator(corpus, trainers.BpeTrainer(
            vocab_size=600, special_tokens=fixture["specials"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=fixture["eos"], pad_token=fixture["eos"],
                                            **({"bos_token": fixture["bos"]} if fixture["bos"] else {}))
    tokenizer.chat_template = fixture["template"]
    return tokenizer


def spans(mask):
    out, start = [], None
    for i, bit in enumerate(list(mask) + [0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            out.append((start, i))
            start = None
    return out


def masked_texts(tokenizer, messages, mask):
    """The text of each masked stretch, read from the rendering by token offsets (not by decoding)."""
    full = chat.render(tokenizer, messages)
    offsets = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return full, [full[offsets[a][0]:offsets[b - 1][1]] for a, b in spans(mask)]


@pytest.mark.parametrize("name", SPLITTABLE)
def test_mask_covers_exactly_the_assistant_turns(name):
    tokenizer = family_tokenizer(name)
    messages = chat.conversation(tokenizer, ROW)
    ids, mask, no_stop = chat.assistant_mask(tokenizer, messages)
    assert len(ids) == len(mask) and no_stop == 0
    full, texts = masked_texts(tokenizer, messages, mask)
    middle, last = END_OF_TURN[name]
    assert [t.strip(" ") for t in texts] == [ROW[2]["content"] + middle, ROW[4]["content"] + last]
    # nothing of the system, instruction or observation-plus-critique turns is trained on
    unmasked = "".join(tokenizer.decode([i]) for i, m in zip(ids, mask) if not m)
    for text in (SYSTEM, "Observation: Your answer is wrong.", "check the units digit"):
        assert text.replace(" ", "") in unmasked.replace(" ", "").replace("▁", "")
    # the system prompt is in the rendering, before the instruction: where the template puts it, or (a template
    # that refuses a system message) at the head of the first user turn
    assert SYSTEM in full and full.index(SYSTEM) < full.index("Solve: what is 12 + 7?")
    if not chat.takes_system(tokenizer):
        assert messages[0]["role"] == "user" and messages[0]["content"].startswith(SYSTEM + "\n\n")


def test_which_templates_align_masks_itself():
    from align.core.tiny_mixtral import build_char_tokenizer

    from trl.chat_template_utils import get_training_chat_template

    patched = []
    for n in SPLITTABLE:
        try:
            patched.append(get_training_chat_template(family_tokenizer(n)) and n)
        except ValueError:
            pass
    assert patched == TRL_PATCHED == [n for n in SPLITTABLE if FIXTURES[n]["trl_patches"]]
    # Qwen2.5: TRL patches it, but its patch trains the assistant header's newline too (see below)
    assert [n for n in SPLITTABLE if chat.needs_own_masks(family_tokenizer(n))] == [
        "chatml_smollm2", "mixtral_instruct", "mixtral_instruct_v01_original", "qwen2_5", "tulu_olmo2"]
    assert not chat.needs_own_masks(build_char_tokenizer())  # align's default template has {% generation %} markers
    # Qwen3's template (one TRL patches) drops earlier turns' reasoning, so align cannot cut it: TRL's mask stays
    import copy

    import trl

    qwen3 = copy.copy(family_tokenizer("qwen2_5"))
    qwen3.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen3.jinja").read_text()
    with pytest.raises(chat.Unsplittable):
        chat.assistant_mask(qwen3, chat.conversation(qwen3, ROW))
    assert not chat.needs_own_masks(qwen3)
    assert [n for n in SPLITTABLE if chat.takes_system(family_tokenizer(n))] == [
        "chatml_smollm2", "mixtral_instruct", "llama3", "phi3", "qwen2_5", "tulu_olmo2"]


@pytest.mark.parametrize("name", TRL_PATCHED)
def test_trl_patched_templates_give_the_same_mask(name):
    from trl.chat_template_utils import get_training_chat_template

    tokenizer = family_tokenizer(name)
    patched = get_training_chat_template(tokenizer)
    assert patched is not None and patched != tokenizer.chat_template
    messages = chat.conversation(tokenizer, ROW)
    ids, mask, _ = chat.assistant_mask(tokenizer, messages)
    trl = tokenizer.apply_chat_template(messages, chat_template=patched, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    assert list(trl["input_ids"]) == ids  # TRL's patch renders the same text
    differ = [i for i, (a, b) in enumerate(zip(mask, trl["assistant_masks"])) if a != b]
    if name != "qwen2_5":
        assert differ == [] and 1 in mask
        assert not chat.needs_own_masks(tokenizer)  # align sft leaves these to TRL: the same mask
        return
    # Qwen2.5: TRL's patch opens {% generation %} before the newline of "<|im_start|>assistant\n", so its mask also
    # holds that newline, one token per assistant turn; otherwise the two masks are equal
    full = chat.render(tokenizer, messages)
    offsets = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    heads = [len(chat.render(tokenizer, messages[:i], add_generation_prompt=True))
             for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(heads) == 2 and [tuple(offsets[i]) for i in differ] == [(h - 1, h) for h in heads]
    assert all(full[:h].endswith("<|im_start|>assistant\n") for h in heads)
    assert all(trl["assistant_masks"][i] == 1 and mask[i] == 0 for i in differ)
    # align's is the rule (assistant content plus end of turn): that newline ends the generation prompt,
    # which trees and eval give the model (chat.prompt_text), so the model never writes it; align sft therefore
    # masks Qwen2.5 itself rather than with TRL's patch
    assert chat.prompt_text(tokenizer, ROW[:2]).endswith("<|im_start|>assistant\n")
    assert chat.needs_own_masks(tokenizer)


def test_generation_markers_give_the_same_mask():
    """align's default Mixtral template carries {% generation %} markers: TRL masks it, and align's cut agrees."""
    from align.core.tiny_mixtral import build_mixtral_tokenizer

    tokenizer = build_mixtral_tokenizer()
    messages = chat.conversation(tokenizer, ROW)
    _, mask, _ = chat.assistant_mask(tokenizer, messages)
    marked = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert mask == list(marked["assistant_masks"]) and 1 in mask


def test_a_template_that_cannot_be_cut_is_one_line_naming_the_way_out():
    from datasets import Dataset

    tokenizer = family_tokenizer("mistral_v3")
    rows = Dataset.from_list([{"messages": ROW[1:]}, {"messages": ROW}])
    with pytest.raises(AlignError) as err:
        chat.sft_rows(rows, tokenizer, "model/tokenizer")
    text = str(err.value)
    assert "\n" not in text and text.startswith("model/tokenizer: ")
    assert "message 2 (user) of row 1" in text and "chat_template_path" in text
    # without a system message the same template renders turn by turn: its rows are cut and checked
    cut = chat.sft_rows(rows.select([0]), tokenizer, "model/tokenizer")
    _, texts = masked_texts(tokenizer, ROW[1:], cut[0]["assistant_masks"])
    assert [t.strip() for t in texts] == [ROW[2]["content"] + "</s>", ROW[4]["content"] + "</s>"]


def test_a_turn_the_template_changes_is_refused():
    """A template that writes the assistant's content otherwise than as given (here: upper-cased) is refused,
    naming the message, rather than trained on text the model never wrote."""
    tokenizer = family_tokenizer("chatml_smollm2")
    odd = tokenizer.chat_template.replace("message['content']", "(message['content'] | upper if message['role'] == "
                                          "'assistant' else message['content'])")
    copy = __import__("copy").copy(tokenizer)
    copy.chat_template = odd
    with pytest.raises(chat.Unsplittable) as err:
        chat.assistant_mask(copy, ROW)
    assert err.value.message == 2 and "content" in err.value.detail


def test_completion_only_rows_train_on_the_completion_turns():
    from datasets import Dataset

    tokenizer = family_tokenizer("chatml_smollm2")
    rows = Dataset.from_list([{"prompt": ROW[:3] + ROW[3:4], "completion": ROW[4:]}])
    cut = chat.sft_rows(rows, tokenizer, "data.jsonl")
    _, texts = masked_texts(tokenizer, ROW, cut[0]["assistant_masks"])
    assert texts == [ROW[4]["content"] + "<|im_end|>\n"]
    both = chat.sft_rows(rows, tokenizer, "data.jsonl", completion_only_loss=False)
    assert len(spans(both[0]["assistant_masks"])) == 2


@pytest.mark.parametrize("name", SPLITTABLE)
def test_generation_prompt_is_the_training_rendering(name):
    """Trees and eval prompt the model with the text SFT trained after: the prompt of a conversation is the
    start of its training rendering, system message included."""
    tokenizer = family_tokenizer(name)
    head = chat.prompt_text(tokenizer, ROW[:4])
    trained = chat.render(tokenizer, chat.conversation(tokenizer, ROW))
    assert trained.startswith(head) and SYSTEM in head


def test_preference_prompts_are_placed_and_checked():
    from datasets import Dataset

    gemma = family_tokenizer("gemma")
    rows = Dataset.from_list([{"prompt": ROW[:4], "chosen": ROW[4:], "rejected": [{"role": "assistant", "content": "20"}]}])
    placed = chat.preference_rows(rows, gemma, "pairs.jsonl", ("chosen", "rejected"))
    assert placed[0]["prompt"][0]["role"] == "user" and placed[0]["prompt"][0]["content"].startswith(SYSTEM)
    # the multi-turn prompt renders the same alone (with the generation prompt) and before its completions
    head = chat.render(gemma, placed[0]["prompt"], add_generation_prompt=True)
    assert chat.render(gemma, placed[0]["prompt"] + placed[0]["chosen"]).startswith(head)
    broken = __import__("copy").copy(gemma)
    broken.chat_template = gemma.chat_template.replace("{{'<start_of_turn>model\n'}}", "{{'<start_of_turn>assistant\n'}}")
    with pytest.raises(AlignError, match=r"^pairs.jsonl: row 0: .*chat_template_path"):
        chat.preference_rows(rows, broken, "pairs.jsonl", ("chosen", "rejected"))


def test_rows_trl_masks_get_their_system_message_placed_too():
    """Gemma's template (TRL patches it) refuses a system message: the SFT rows TRL renders get it folded into
    the first user turn, as generation does, instead of failing inside TRL."""
    from datasets import Dataset
    from trl import SFTConfig

    from align.train.training import render_stage_rows, trainer_args

    gemma = family_tokenizer("gemma")
    args = SFTConfig(output_dir="unused", assistant_only_loss=True, report_to=[], bf16=False)
    rows = render_stage_rows("sft", Dataset.from_list([{"messages": ROW}]), gemma, args, "gemma")
    assert trainer_args(args) is args  # TRL masks these itself
    assert [m["role"] for m in rows[0]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert chat.render(gemma, rows[0]["messages"]).startswith(chat.prompt_text(gemma, ROW[:4]))


# --- SFT of a dense SmolLM2-shaped model, its own ChatML template, attention LoRA ---------------------------

def write_smollm2_shaped(folder: Path, family: str = "chatml_smollm2") -> Path:
    """LlamaForCausalLM in SmolLM2-135M's shape shrunk to tiny sizes, random weights, with SmolLM2's ChatML
    template and special tokens (pad and eos <|im_end|>, as SmolLM2-Instruct), or another family's."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = family_tokenizer(family)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id or tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", SPLITTABLE)
def test_sft_loss_is_on_the_assistant_tokens_only(tmp_path, name):
    """Every family, its template unedited, through the path `align sft` takes (render_stage_rows, then TRL's
    SFTTrainer; align's masks for ChatML, [INST] and Qwen2.5, TRL's own for Llama 3, Gemma and Phi-3, with
    Gemma's system message folded in by align first): labels only on the assistant tokens (align's cut, which
    the other tests hold to be the contents plus end of turn), zero loss on every other one, and a training step
    whose loss is that assistant-only loss."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    from align.train.training import render_stage_rows, trainer_args
    from align.sft.trainer import MoESFTTrainer

    folder = write_smollm2_shaped(tmp_path / "smol", name)
    tokenizer = family_tokenizer(name)
    args = SFTConfig(output_dir=str(tmp_path / "out"), assistant_only_loss=True, report_to=[], max_length=512, bf16=False,
                     use_cpu=True, max_steps=1, logging_steps=1, save_strategy="no", per_device_train_batch_size=1)
    rows = render_stage_rows("sft", Dataset.from_list([{"messages": ROW}]), tokenizer, args, str(folder))
    model = AutoModelForCausalLM.from_pretrained(folder)
    trainer = MoESFTTrainer(model=model, args=trainer_args(args), train_dataset=rows, processing_class=tokenizer)
    assert args.assistant_only_loss and args._align_own_masks == chat.needs_own_masks(tokenizer)
    labels = trainer.train_dataset[0]["labels"]
    ids, mask, _ = chat.assistant_mask(tokenizer, chat.conversation(tokenizer, ROW))
    assert trainer.train_dataset[0]["input_ids"] == ids
    assert [label != -100 for label in labels] == [bool(m) for m in mask] and sum(mask) > 20
    ids = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
        per_token = torch.nn.functional.cross_entropy(logits, torch.tensor(labels[1:]), ignore_index=-100,
                                                      reduction="none")
        loss = model(input_ids=ids, labels=torch.tensor([labels])).loss
    trained = torch.tensor(mask[1:]).bool()
    assert torch.all(per_token[~trained] == 0) and torch.all(per_token[trained] > 0)
    assert torch.allclose(loss, per_token[trained].mean())
    everything = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
    assert not torch.allclose(loss, everything)
    # and SFT trains on it: the step's logged loss is that assistant-only loss
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(loss.item(), rel=1e-3)


def test_align_sft_on_a_dense_smollm2_shaped_model_writes_an_adapter(tmp_path):
    import yaml

    from align.cli import main

    folder = write_smollm2_shaped(tmp_path / "smol")
    data = tmp_path / "sft.jsonl"
    rows = [ROW, ROW[1:3], [ROW[1], {"role": "assistant", "content": "The answer is \\boxed{19}."}]]
    data.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(yaml.safe_dump({
        "model_name_or_path": str(folder), "dtype": "float32", "bf16": False, "lora_r": 4, "lora_alpha": 8,
        "datasets": [{"path": str(data)}], "output_dir": str(tmp_path / "out"), "assistant_only_loss": True,
        "max_length": 256, "per_device_train_batch_size": 2, "max_steps": 2, "logging_steps": 1,
        "save_steps": 1000, "report_to": "none", "seed": 0, "dataloader_num_workers": 0}))
    assert main(["sft", "--config", str(recipe), "--lora_experts", "false", "--lora_router", "false"]) == 0
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").is_file()
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) >= {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert yaml.safe_load((out / "align_config.yaml").read_text())["training"]["assistant_only_loss"] is True


def test_align_sft_names_a_template_it_cannot_cut_before_any_model_loads(tmp_path, capsys):
    """`align sft` on a model whose template moves the system message (here via chat_template_path): one line,
    exit 2, while the recipe and its rows are prepared (before load_model)."""
    import yaml

    from align.cli import main

    folder = write_smollm2_shaped(tmp_path / "smol")
    template = tmp_path / "mistral_v3.jinja"
    template.write_text(FIXTURES["mistral_v3"]["template"])
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"messages": ROW}) + "\n")
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(yaml.safe_dump({"model_name_or_path": str(folder), "datasets": [str(data)], "bf16": False,
                                      "output_dir": str(tmp_path / "out"), "assistant_only_loss": True,
                                      "report_to": "none", "lora_experts": False, "lora_router": False}))
    capsys.readouterr()  # what writing the model folder said
    with pytest.raises(SystemExit) as exit_:
        main(["sft", "--config", str(recipe), "--chat_template_path", str(template)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"align: error: {template}: ")
    assert "message 2 (user) of row 0" in err[0] and "set chat_template_path" in err[0]


def test_the_moe_upcycle_of_a_smollm2_shaped_model_trains_the_same_way(tmp_path):
    """`align upcycle` of the dense SmolLM2-shaped model keeps its ChatML template; `align sft` on the MoE masks
    with align's own cut (ChatML is not a template TRL patches) and trains LoRA on attention, the fused experts
    and the router, as on any Mixtral."""
    import yaml
    from safetensors import safe_open

    from align.cli import main

    write_smollm2_shaped(tmp_path / "smol")
    assert main(["upcycle", str(tmp_path / "smol"), str(tmp_path / "moe"), "--experts", "2", "--top-k", "1"]) == 0
    from align.train.models import load_tokenizer

    moe_tokenizer = load_tokenizer(str(tmp_path / "moe"))
    assert moe_tokenizer.chat_template == FIXTURES["chatml_smollm2"]["template"]  # unedited, as the dense model had it
    assert chat.needs_own_masks(moe_tokenizer)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"messages": r}) + "\n" for r in (ROW, ROW[1:3])))
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(yaml.safe_dump({
        "model_name_or_path": str(tmp_path / "moe"), "dtype": "float32", "bf16": False, "lora_r": 4, "lora_alpha": 8,
        "datasets": [{"path": str(data)}], "output_dir": str(tmp_path / "out"), "assistant_only_loss": True,
        "max_length": 256, "per_device_train_batch_size": 2, "max_steps": 1, "logging_steps": 1,
        "save_steps": 1000, "report_to": "none", "seed": 0, "dataloader_num_workers": 0}))
    assert main(["sft", "--config", str(recipe)]) == 0  # lora_attention, lora_experts and lora_router: the defaults
    out = tmp_path / "out"
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) >= {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(adapter["target_parameters"]) == {"gate_up_proj", "down_proj", "gate.weight"}
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as weights:
        trained = {name: weights.get_tensor(name) for name in weights.keys()}
    # PEFT's names: experts.base_layer is gate_up_proj's LoRA, experts down_proj's (wrapped around it), gate the router's
    for layer in (0, 1):
        for part in ("self_attn.q_proj", "mlp.experts.base_layer", "mlp.experts", "mlp.gate"):
            b = trained[f"base_model.model.model.layers.{layer}.{part}.lora_B.weight"]
            assert b.abs().sum() > 0, (layer, part)  # B starts at zero: the step trained it
    assert yaml.safe_load((out / "align_config.yaml").read_text())["training"]["assistant_only_loss"] is True


class _Recording:
    """A tokenizer that keeps the texts it is called on (the generation prompts a backend tokenizes)."""

    def __init__(self, inner):
        self.__dict__.update(inner=inner, texts=[])

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __setattr__(self, name, value):
        setattr(self.inner, name, value)

    def __call__(self, texts, **kwargs):
        self.texts.extend(texts)
        return self.inner(texts, **kwargs)


@pytest.mark.parametrize("name", SPLITTABLE)
def test_every_stage_renders_a_conversation_the_same_way(tmp_path, name):
    """One rendering of the model's own template for every stage, a multi-turn prompt with a system message (placed
    as the template places it, or folded into the first user turn): through the paths the stages take
    (render_stage_rows, then TRL's DPOTrainer for DPO and NCA (NCA is DPOTrainer with loss_type nca_pair), KTOTrainer for KTO; LocalBackend for trees and eval),
    the context DPO / NCA / KTO train after is token for token the prompt trees and eval generate from, and that
    prompt plus the chosen completion is the SFT rendering of the whole conversation, whose last assistant turn
    (all SFT trains on after that prompt) is exactly the completion."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, KTOConfig

    from align.evaluation.backends import LocalBackend, ModelSpec
    from align.dpo.trainer import MoEDPOTrainer
    from align.kto_nca.trainer import MoEKTOTrainer
    from align.train.training import render_stage_rows

    tokenizer = family_tokenizer(name)
    folder = write_smollm2_shaped(tmp_path / "model", name)
    prompt_text = chat.prompt_text(tokenizer, ROW[:4])
    assert SYSTEM in prompt_text and prompt_text.index(SYSTEM) < prompt_text.index("Solve: what is 12 + 7?")
    assert "Critique: 12 + 7 is 19" in prompt_text
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    sft_ids, sft_mask, _ = chat.assistant_mask(tokenizer, chat.conversation(tokenizer, ROW))
    assert sft_ids[:len(prompt)] == prompt and sft_mask[len(prompt):] == [1] * (len(sft_ids) - len(prompt))

    # trees and eval with a local model: the generation prompt is that text
    backend = LocalBackend(ModelSpec(model=str(folder), temperature=0.0, max_new_tokens=2))
    backend.tokenizer = _Recording(backend.tokenizer)
    backend.generate_batch([(ROW[:4], 1, 0)])
    assert backend.tokenizer.texts == [prompt_text]

    model = AutoModelForCausalLM.from_pretrained(folder)
    rejected = [{"role": "assistant", "content": "The answer is \\boxed{20}."}]
    settings = dict(bf16=False, use_cpu=True, report_to="none", max_length=None)
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), **settings)  # NCA: the same trainer, loss_type nca_pair
    pairs = Dataset.from_list([{"prompt": ROW[:4], "chosen": ROW[4:], "rejected": rejected}])
    rows = render_stage_rows("dpo", pairs, tokenizer, args, str(folder))
    row = MoEDPOTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer).train_dataset[0]
    assert row["prompt_ids"] == prompt and row["prompt_ids"] + row["chosen_ids"] == sft_ids
    args = KTOConfig(output_dir=str(tmp_path / "kto"), **settings)
    labelled = Dataset.from_list([{"prompt": ROW[:4], "completion": ROW[4:], "label": True},
                                  {"prompt": ROW[:4], "completion": rejected, "label": False}])
    rows = render_stage_rows("kto", labelled, tokenizer, args, str(folder))
    row = MoEKTOTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer).train_dataset[0]
    assert row["prompt_ids"] == prompt and row["prompt_ids"] + row["completion_ids"] == sft_ids


def test_a_recipes_system_prompt_reaches_trees_exports_and_eval(tmp_path, monkeypatch):
    """`system_prompt` in a trees recipe opens every tree's conversation, so the exported SFT, pair and KTO
    rows carry it (the released UltraInteract columns keep user and assistant turns only); the same key in
    an eval opens every first and later turn; unset, neither has a system message."""
    from align.evaluation.evaluate import run_eval
    from align.trees.builder import build_trees, parse_trees_config
    from align.trees.export import export_trees
    from test_trees import OracleBackend

    system = "You are a careful tutor. End with the number."
    seen = []

    class Tutored(OracleBackend):
        def texts(self, messages, n, seed):
            seen.append(list(messages))
            assert [m["role"] for m in messages[:2]] == ["system", "user"] and messages[0]["content"] == system
            return super().texts(messages[1:], n, seed)

    def trees_with(prompt, out):
        values = {"problems": "arithmetic:6:3", "output_dir": str(out), "max_turns": 3, "progress": False,
                  "actor": {"backend": "local"}, **({"system_prompt": prompt} if prompt else {})}
        config, actor, critic, limits = parse_trees_config(values, "test")
        return build_trees(config, actor, critic, limits, actor=Tutored(0.4) if prompt else OracleBackend(0.4))

    assert trees_with(system, tmp_path / "trees")["pairs"] > 0
    assert any(len(chat) > 2 for chat in seen)  # later turns too, the critique after the first answer
    export_trees(tmp_path / "trees" / "trees.jsonl", tmp_path / "export")
    from datasets import load_dataset

    for name in ("sft", "pairs", "kto"):
        rows = load_dataset(str(tmp_path / "export"), name=name, split="train")
        assert len(rows) and all(r["prompt"][0] == {"role": "system", "content": system} for r in rows), name
    ultra = load_dataset(str(tmp_path / "export"), name="pairs_ultrainteract", split="train")
    assert all(t["from"] != "system" for r in ultra for t in r["trajectory"])
    trees_with(None, tmp_path / "plain")
    plain = [json.loads(line) for line in (tmp_path / "plain" / "trees.jsonl").read_text().splitlines()]
    assert all(t["history"][0]["role"] == "user" for tree in plain for t in tree["turns"])
    info = json.loads((tmp_path / "plain" / "build_info.json").read_text())["settings"]
    assert "system_prompt" not in info  # unset: the settings trees built before the key existed recorded

    chats = []

    class Scripted:
        def generate_batch(self, requests):
            chats.extend(list(chat) for chat, _, _ in requests)
            return [["\\boxed{0}"] * n for _, n, _ in requests]

    monkeypatch.setattr("align.evaluation.evaluate.make_eval_backend", lambda m, max_new_tokens: Scripted())
    monkeypatch.setattr("align.evaluation.evaluate.check_eval_models", lambda *a, **k: None)
    run_eval({"problems": ["arithmetic:3:5"], "models": {"m": {"model": "scripted"}}, "turns": 2,
              "system_prompt": system}, tmp_path / "eval")
    assert len(chats) == 6 and all(c[0] == {"role": "system", "content": system} and c[1]["role"] == "user"
                                   for c in chats)
    chats.clear()
    run_eval({"problems": ["arithmetic:3:5"], "models": {"m": {"model": "scripted"}}, "turns": 2}, tmp_path / "eval")
    assert len(chats) == 6 and all(c[0]["role"] == "user" for c in chats)  # (a changed setting: evaluated again)
