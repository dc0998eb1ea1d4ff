"""A model or adapter that is not what it says: one line, exit 2, before any work, in every command that
takes one (align/train/model_check.py). Each command case runs `python -m align` in a fresh process, offline."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

RECIPES = REPO / "recipes" / "tiny-mixtral"


def _fake_safetensors(path: Path, tensors: dict[str, list[int]]) -> None:
    """A safetensors file of float32 zeros with these names and shapes (written by hand: no torch needed)."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 4
        for d in shape:
            size *= d
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Folders of each kind of wrong model and adapter, next to a tiny Mixtral's."""
    from align.train.models import resolve_model_path

    root = tmp_path_factory.mktemp("models")
    tiny = Path(resolve_model_path("tiny-mixtral"))
    resolve_model_path("tiny-mixtral-char")
    tokenizer = [p for p in tiny.iterdir() if p.name.startswith("tokenizer") or p.name == "chat_template.jinja"]

    def folder(name, *files):
        out = root / name
        out.mkdir()
        for f in files:
            shutil.copy2(f, out / f.name)
        return out

    folder("tokenizer_only", *tokenizer)
    folder("config_only", tiny / "config.json", *tokenizer)
    cut = folder("cut_short", tiny / "config.json", *tokenizer)
    whole = (tiny / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(whole[: len(whole) // 2])
    shards = folder("missing_shard", tiny / "config.json", *tokenizer)
    (shards / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    shutil.copy2(tiny / "model.safetensors", shards / "model-00001-of-00002.safetensors")
    unknown = folder("unknown_type", *tokenizer)
    (unknown / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    shutil.copy2(tiny / "model.safetensors", unknown / "model.safetensors")
    dense = folder("dense", *tokenizer)
    (dense / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32000}))
    _fake_safetensors(dense / "model.safetensors", {"model.norm.weight": [64]})
    # A LoRA of the tiny Mixtral (hidden 64), as PEFT saves one, offered to the char model (hidden 128).
    lora = {}
    for layer in range(2):
        for proj, out in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32), ("o_proj", 64)):
            stem = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            lora[f"{stem}.lora_A.weight"], lora[f"{stem}.lora_B.weight"] = [8, 64], [out, 8]
    for name, base in (("other_base", str(tiny)), ("other_base_elsewhere", "/nowhere/tiny-mixtral")):
        adapter = folder(name, *tokenizer)
        (adapter / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "base_model_name_or_path": base, "r": 8, "lora_alpha": 16,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "task_type": "CAUSAL_LM"}))
        _fake_safetensors(adapter / "adapter_model.safetensors", lora)
    folder("not_adapter", *tokenizer)
    return root


def _align(tmp_path, *argv, env=None):
    """`python -m align ARGV` in a fresh process, offline, with its own empty HF_HOME: (exit code, stderr lines,
    that HF_HOME), after checking the one-line contract."""
    hf_home = tmp_path / "hf_home"
    run_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(hf_home),
               "PYTHONPATH": str(REPO), **(env or {})}
    run_env.pop("HF_DATASETS_CACHE", None)
    proc = subprocess.run([sys.executable, "-m", "align", *map(str, argv)], cwd=REPO, env=run_env,
                          capture_output=True, text=True, timeout=600)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(err) == 1, err
    assert err[0].startswith("align: error: ") and "Traceback" not in proc.stderr
    datasets_cache = hf_home / "datasets"
    assert not datasets_cache.exists() or not any(datasets_cache.rglob("*.arrow")), "data was prepared"
    return err[0]


STAGE_CASES = {  # the cases, in a fresh process; the other kinds of broken folder are checked in-process
    "tokenizer only": ("tokenizer_only", "no config.json"),
    "config only": ("config_only", "no weights"),
}


@pytest.mark.parametrize("case", sorted(STAGE_CASES))
def test_sft_refuses_a_model_that_is_not_one(tmp_path, cases, case):
    name, words = STAGE_CASES[case]
    out = tmp_path / "out"
    line = _align(tmp_path, "sft", "--config", RECIPES / "sft.yaml", "--model_name_or_path", cases / name,
                  "--output_dir", out)
    assert "sft.yaml" in line and "model_name_or_path" in line and str(cases / name) in line and words in line
    assert not out.exists()


def test_training_stage_hub_id_offline_not_cached(tmp_path):
    out = tmp_path / "out"
    line = _align(tmp_path, "sft", "--config", RECIPES / "sft.yaml", "--model_name_or_path", "someone/typo-model",
                  "--output_dir", out)
    assert "someone/typo-model" in line and "hf download someone/typo-model" in line and "HF_HUB_OFFLINE" in line
    assert not out.exists()


def test_dense_model_with_expert_lora_points_at_upcycle(tmp_path, cases):
    out = tmp_path / "out"
    line = _align(tmp_path, "sft", "--config", RECIPES / "sft.yaml", "--model_name_or_path", cases / "dense",
                  "--output_dir", out)
    assert "LlamaForCausalLM" in line and "align upcycle" in line and "lora_experts" in line
    assert not out.exists()


@pytest.mark.parametrize("adapter,words", [("other_base", "hidden_size 64 there, 128 here"),
                                           ("not_adapter", "no adapter_config.json")])
def test_dpo_adapter_of_another_base(tmp_path, cases, adapter, words):
    out = tmp_path / "out"
    line = _align(tmp_path, "dpo", "--config", RECIPES / "dpo.yaml", "--model_name_or_path", "tiny-mixtral-char",
                  "--adapter_name_or_path", cases / adapter, "--output_dir", out)
    assert "adapter_name_or_path" in line and str(cases / adapter) in line and words in line
    if adapter != "not_adapter":
        assert "tiny-mixtral-char" in line and "trained on" in line  # both named
    assert not out.exists()


def _eval_config(tmp_path, **model):
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump({"problems": ["addition:8:0"], "models": {"base": {"model": "tiny-mixtral"},
                                                                              "m": model}}))
    return path


@pytest.mark.parametrize("model,words", [
    ({"model": "TOKENIZER_ONLY"}, "no config.json"),
    ({"model": "someone/typo-model"}, "hf download someone/typo-model"),
    ({"model": "tiny-mixtral-char", "adapter": "OTHER_BASE"}, "trained on"),
    ({"model": "tiny-mixtral", "adapter": "NOT_ADAPTER"}, "no adapter_config.json"),
])
def test_eval_refuses_before_any_problem(tmp_path, cases, model, words):
    model = {k: str(cases / v.lower()) if v.isupper() else v for k, v in model.items()}
    out = tmp_path / "eval_out"
    line = _align(tmp_path, "eval", "--config", _eval_config(tmp_path, **model), "--output", out)
    assert "eval.yaml" in line and "models.m." in line and words in line
    assert not out.exists()


def test_trees_local_actor(tmp_path, cases):
    out = tmp_path / "trees"
    recipe = yaml.safe_load((RECIPES / "trees.yaml").read_text())
    recipe["output_dir"], recipe["actor"]["model"] = str(out), str(cases / "tokenizer_only")
    (tmp_path / "trees.yaml").write_text(yaml.safe_dump(recipe))
    line = _align(tmp_path, "trees", "build", "--config", tmp_path / "trees.yaml")
    assert "trees.yaml" in line and "actor.model" in line and "no config.json" in line
    assert not out.exists()


def test_quantize(tmp_path, cases):
    out = tmp_path / "q"
    line = _align(tmp_path, "quantize", cases / "config_only", out)
    assert "model" in line and "no weights" in line and not out.exists()


def test_publish_merge_base_not_there(tmp_path, cases):
    stage = tmp_path / "stage"
    shutil.copytree(cases / "other_base_elsewhere", stage)
    (stage / "align_config.yaml").write_text(yaml.safe_dump({"model": {"model_name_or_path": "/nowhere/tiny-mixtral"}}))
    out = tmp_path / "hub"
    line = _align(tmp_path, "publish", stage, "--repo-id", "me/x", "--merge", "--dry-run", "--output", out)
    assert "base_model_name_or_path" in line and "/nowhere/tiny-mixtral" in line and "not found" in line
    assert not out.exists()


@pytest.mark.parametrize("check", [True, False])
def test_pipeline_bad_model_in_its_fifth_stage(tmp_path, cases, check):
    """The quickstart's fifth stage (nca) given a folder with only a tokenizer: `run --check` says so, and
    `run` says so before its first stage writes anything."""
    spec = yaml.safe_load((REPO / "recipes" / "quickstart" / "pipeline.yaml").read_text())
    spec["output_dir"] = str(tmp_path / "run")
    assert [s["name"] for s in spec["stages"]][4] == "nca"
    spec["stages"][4]["set"]["model_name_or_path"] = str(cases / "tokenizer_only")
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    line = _align(tmp_path, "run", path, *(["--check"] if check else []))
    assert "stages[4] (nca)" in line and "model_name_or_path" in line and "no config.json" in line
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ in-process: the pieces, the Hub mocked


@pytest.mark.parametrize("name,words", [
    ("cut_short", "model.safetensors is cut short"),
    ("missing_shard", "1 of the 2 weight shards its index names are missing (first: model-00002-of-00002.safetensors)"),
    ("unknown_type", "model_type 'no-such-architecture' is not one this transformers knows"),
    ("other_base", "is a LoRA adapter (adapter_config.json), not a model"),
    ("nowhere", "not found"),
])
def test_broken_folders(cases, name, words):
    from align.core.errors import AlignError
    from align.train.model_check import check_model

    with pytest.raises(AlignError) as err:
        check_model(str(cases / name), where="r.yaml")
    assert str(err.value).startswith(f"r.yaml: model_name_or_path: {cases / name}") and words in str(err.value)


def test_adapter_shapes_decide_when_its_base_is_elsewhere(cases):
    """A recorded base not on this machine: the tensor shapes against the model's skeleton decide."""
    from align.core.errors import AlignError
    from align.train.model_check import check_adapter, check_model

    with pytest.raises(AlignError) as err:
        check_adapter(str(cases / "other_base_elsewhere"), check_model("tiny-mixtral-char"))
    assert ("trained on /nowhere/tiny-mixtral and does not fit tiny-mixtral-char" in str(err.value)
            and "input width 128 in the model, 64 in the adapter" in str(err.value))


def test_tiny_names_and_seeds():
    from align.core.errors import AlignError
    from align.train.model_check import check_model

    assert check_model("tiny-mixtral").config["model_type"] == "mixtral"
    assert check_model("tiny-mixtral:0").path == check_model("tiny-mixtral").path
    with pytest.raises(AlignError, match="whole number"):
        check_model("tiny-mixtral:abc")


def test_gguf_file_and_gguf_folder(tmp_path):
    from align.core.errors import AlignError
    from align.train.model_check import check_model

    good = tmp_path / "m.gguf"
    good.write_bytes(b"GGUF" + bytes(28))
    assert check_model(str(good)).gguf == good
    assert check_model(str(tmp_path), gguf_file="m.gguf").gguf == good
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04")
    with pytest.raises(AlignError, match="not a GGUF file"):
        check_model(str(bad))
    with pytest.raises(AlignError, match="name the file itself"):
        check_model(str(tmp_path))


def test_adapter_of_the_same_base_passes(cases):
    """The adapter on the model it was trained on (its recorded base is that folder) is accepted."""
    from align.train.model_check import check_adapter, check_model

    assert check_adapter(str(cases / "other_base"), check_model("tiny-mixtral"))["r"] == 8
    assert check_adapter(str(cases / "other_base_elsewhere"), check_model("tiny-mixtral"))["r"] == 8


def _http_error(cls, status):
    from httpx2 import Request, Response

    return cls(f"{status} for url", response=Response(status, request=Request("GET", "https://huggingface.co/api/x")))


@pytest.fixture
def online(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    monkeypatch.setattr("align.train.model_check._hub_token", lambda: os.environ.get("HF_TOKEN"))

    def hub(model_info=None, download=None):
        import huggingface_hub

        def info(self, repo_id, revision=None, **kwargs):
            if isinstance(model_info, Exception):
                raise model_info
            return model_info

        monkeypatch.setattr(huggingface_hub.HfApi, "model_info", info)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                            lambda *a, **k: (_ for _ in ()).throw(download) if isinstance(download, Exception) else download)

    return hub


@pytest.mark.parametrize("error,token,words", [
    ("RepositoryNotFoundError", None, "private and no token is set"),
    ("RepositoryNotFoundError", "hf_x", "token set has no access"),
    ("GatedRepoError", "hf_x", "gated model: accept its license on https://huggingface.co/org/model and set HF_TOKEN"),
    ("RevisionNotFoundError", None, "no revision"),
])
def test_hub_errors_one_line_each(online, monkeypatch, error, token, words):
    from huggingface_hub import errors

    from align.core.errors import AlignError
    from align.train.model_check import check_model

    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    online(model_info=_http_error(getattr(errors, error), 404 if "NotFound" in error else 403))
    with pytest.raises(AlignError) as err:
        check_model("org/model", where="r.yaml", revision="v2")
    assert str(err.value).startswith("r.yaml: model_name_or_path: org/model") and words in str(err.value)


def test_hub_model_checked_from_its_file_list(online, tmp_path):
    """Online: the file list and config.json decide; a repo without weights or tokenizer is refused, no
    weights downloaded."""
    from huggingface_hub.hf_api import RepoSibling

    from align.core.errors import AlignError
    from align.train.model_check import check_model

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "mixtral"}))

    def info(*names):
        return type("Info", (), {"siblings": [RepoSibling(rfilename=n) for n in names]})()

    online(model_info=info("config.json", "model.safetensors.index.json", "tokenizer.json"), download=str(config))
    assert check_model("org/model").config == {"model_type": "mixtral"}
    online(model_info=info("config.json", "tokenizer.json"), download=str(config))
    with pytest.raises(AlignError, match="no weights"):
        check_model("org/model")
    online(model_info=info("config.json", "model.safetensors"), download=str(config))
    with pytest.raises(AlignError, match="no tokenizer"):
        check_model("org/model")
    online(model_info=info("README.md"), download=str(config))
    with pytest.raises(AlignError, match="has no config.json"):
        check_model("org/model")


def test_offline_cached_but_incomplete(tmp_path, monkeypatch):
    """A hub id in the cache whose download stopped halfway (config there, weights not) is one line too."""
    import huggingface_hub

    from align.core.errors import AlignError
    from align.train.model_check import check_model

    snapshot = tmp_path / "snap"
    snapshot.mkdir()
    (snapshot / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: str(snapshot / "config.json"))
    with pytest.raises(AlignError, match=r"org/model \(in the Hub cache\) has config.json but no weights"):
        check_model("org/model")


def test_gradient_checkpointing_under_its_current_name(tmp_path):
    """transformers 5.25's activation_checkpointing: the old recipe key maps onto it, TRL's default too, and
    no FutureWarning about the old name is raised."""
    import dataclasses
    import warnings

    from trl import DPOConfig, SFTConfig

    from align.train.config import parse_stage_recipe

    if "activation_checkpointing" not in {f.name for f in dataclasses.fields(SFTConfig)}:
        pytest.skip("this transformers has no activation_checkpointing")
    base = {"model_name_or_path": "tiny-mixtral", "output_dir": str(tmp_path / "o"), "use_cpu": True}
    for recipe, want in (({}, True), ({"gradient_checkpointing": False}, False),
                         ({"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}, True),
                         ({"activation_checkpointing": False}, False)):
        for cls in (SFTConfig, DPOConfig):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _, _, args = parse_stage_recipe(cls, {**base, **recipe}, "r.yaml")
            assert args.activation_checkpointing is want and args.gradient_checkpointing is want
            assert not [w for w in caught if "gradient_checkpointing" in str(w.message)], [str(w.message) for w in caught]
            if "gradient_checkpointing_kwargs" in recipe:
                assert args.activation_checkpointing_kwargs == {"use_reentrant": False}
    from align.core.errors import AlignError

    with pytest.raises(AlignError, match="say the same thing"):
        parse_stage_recipe(SFTConfig, {**base, "gradient_checkpointing": True, "activation_checkpointing": False}, "r.yaml")


@pytest.mark.parametrize("dense, words", [("tokenizer_only", "no config.json"), ("someone/typo-model", "hf download")])
def test_upcycle_refuses_a_dense_model_that_is_not_one(tmp_path, cases, dense, words):
    source = cases / dense if (cases / dense).exists() else dense
    line = _align(tmp_path, "upcycle", source, tmp_path / "moe")
    assert "align upcycle: dense model" in line and words in line
    assert not (tmp_path / "moe").exists() and not list(tmp_path.glob("moe*"))
