"""The embedded `tiny-mixtral`: a small seeded Mixtral with the real Mixtral tokenizer.

It is written once to an ordinary model folder and then loaded through `from_pretrained` like any
other model, so tests exercise the same loading path as a real Mixtral-8x7B run.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

TINY_MODEL_NAME = "tiny-mixtral"
TINY_CHAR_MODEL_NAME = "tiny-mixtral-char"

# Mixtral-Instruct's format: `<s>[INST] user [/INST] answer</s>[INST] ...`. The {% generation %}
# markers let TRL compute an assistant-only loss mask; a system message is folded into the first user turn.
MIXTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\n\n' %}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}"
    "{% set ns.system = '' %}"
    "{% elif message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% endif %}"
    "{% endfor %}"
)

TINY_CONFIG = dict(
    vocab_size=32000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=2048,
    router_aux_loss_coef=0.02,
    tie_word_embeddings=False,
)


def mixtral_tokenizer_file() -> Path:
    """The SentencePiece model of Mixtral-8x7B, shipped inside mistral-common (no hub download)."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise FileNotFoundError(f"mistral-common does not ship {path}; reinstall mistral-common")
    return path


def build_mixtral_tokenizer():
    """A transformers tokenizer from the real Mixtral SentencePiece file, with the Mixtral chat template."""
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(mixtral_tokenizer_file(), Path(tmp) / "tokenizer.model")
        # legacy=True: a "▁" before the first piece of every text segment, as Mixtral's own tokenizer does, so
        # "<s>[INST]" is [1, 733, 16289, 28793]; without it transformers 5 gives "[" (28792) after <s>.
        tokenizer = LlamaTokenizer.from_pretrained(tmp, legacy=True)
    tokenizer.chat_template = MIXTRAL_CHAT_TEMPLATE
    tokenizer.pad_token = tokenizer.unk_token  # Mixtral has no pad token; <unk> never appears in text
    tokenizer.padding_side = "right"
    return tokenizer


# The character-level variant: 3 layers, 4 experts, ~100-symbol vocabulary. With Mixtral's 32000-token
# vocabulary the output projection dominates a model this small, and it learns arithmetic ~10x slower on
# a CPU (see the quickstart notes); the quickstart bootstraps this one.
TINY_CHAR_CONFIG = {**TINY_CONFIG, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3,
                    "max_position_embeddings": 1024}
CHAR_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def build_char_tokenizer():
    """A character-level tokenizer (printable ASCII and newline) with the Mixtral chat template."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
    vocab = {tok: i for i, tok in enumerate(CHAR_SPECIALS + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = MIXTRAL_CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def default_home() -> Path:
    return Path(os.environ.get("ALIGN_HOME", Path.home() / ".cache" / "align"))


def tiny_mixtral_path(seed: int = 0, name: str = TINY_MODEL_NAME) -> Path:
    """Folder of an embedded tiny model, written on first use (safe when several processes race)."""
    folder = default_home() / "models" / f"{name}-s{seed}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "config.json").is_file():
            if name == TINY_CHAR_MODEL_NAME:
                write_tiny_mixtral(folder, seed=seed, tokenizer=build_char_tokenizer(), **TINY_CHAR_CONFIG)
            else:
                write_tiny_mixtral(folder, seed=seed)
    return folder


def write_tiny_mixtral(folder: Path, seed: int = 0, tokenizer=None, **overrides) -> Path:
    """Build a tiny model with a seeded init and save it (model + tokenizer) atomically to `folder`."""
    import torch
    from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM

    tokenizer = tokenizer or build_mixtral_tokenizer()
    config = MixtralConfig(
        **{**TINY_CONFIG, **overrides, "vocab_size": len(tokenizer)},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MixtralForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder
