"""Secrets (issue 29): a credential given to a stage reaches no file align writes or publishes, and a push (or
a publish dry run) refuses a folder that holds one however it got there."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import yaml

from align.core.errors import AlignError
from conftest import REPO, stage_args

HUB_TOKEN = "hf_" + "Zq7Lw2Xc9Vb4Nm1Ks8Jd3Hf6Gt5Ry0Ue"  # the shape of a Hub token (not a real one)
PLAIN_TOKEN = "my-own-write-token-4711"  # a token that no pattern knows: only its key says what it is
TRACKER_KEY = "tracker-key-value-0815"  # in a recipe's env:
PLANTED = "planted-by-hand-9731"  # a token no stage of this process was given (so only its key gives it away)


def _files_holding(folder: Path, *values: str) -> list[str]:
    """Every file under `folder` (recursively, checkpoints and pickles included) whose bytes hold one of
    `values`."""
    needles = [v.encode() for v in values]
    return sorted(str(p) for p in folder.rglob("*") if p.is_file() and any(n in p.read_bytes() for n in needles))


class _FakeHub:
    """huggingface_hub.HfApi as push_folder uses it: records the token and the files it was given."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        _FakeHub.calls.append(("create", repo_id, self.token))

    def upload_folder(self, folder_path, repo_id, ignore_patterns=(), **kwargs):
        import fnmatch

        root = Path(folder_path)
        files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
        files = [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in ignore_patterns)]
        _FakeHub.calls.append(("upload", repo_id, self.token, sorted(files)))


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    _FakeHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeHub)
    return _FakeHub.calls


# ------------------------------------------------------------------ the rule


@pytest.mark.parametrize("name, secret", [
    ("hub_token", True), ("token", True), ("push_to_hub_token", True), ("HF_TOKEN", True), ("api_key", True),
    ("WANDB_API_KEY", True), ("openaiApiKey", True), ("client_secret", True), ("db_password", True),
    ("credentials", True),
    ("max_new_tokens", False), ("pad_token", False), ("eos_token", False), ("bos_token", False),
    ("pad_token_id", False), ("dataset_text_field", False), ("keys", False), ("api_key_env", False),
    ("hub_model_id", False), ("tokenizer_name_or_path", False), ("num_key_value_heads", False),
    ("include_num_input_tokens_seen", False), ("average_tokens_across_devices", False),
    ("TOKENIZERS_PARALLELISM", False), ("secret_env", False),
])
def test_which_keys_hold_credentials(name, secret):
    from align.core.leaks import secret_key

    assert secret_key(name) is secret


def test_every_recipe_key_of_the_stages_that_holds_a_credential_is_hub_token():
    """The rule against the real option names: of every key a training stage takes, only hub_token."""
    import dataclasses

    from align.train.config import DataArguments, ModelArguments
    from align.core.leaks import secret_key
    from align.stages import TRAINING_STAGES

    names = {f.name for spec in TRAINING_STAGES.values() for cls in (spec.config_class(), ModelArguments, DataArguments)
             for f in dataclasses.fields(cls)}
    assert {n for n in names if secret_key(n)} == {"hub_token"}


@pytest.mark.parametrize("text, found", [
    (HUB_TOKEN, "Hugging Face"), (f"token={HUB_TOKEN}.", "Hugging Face"), ("sk-proj-" + "a1B2c3" * 5, "sk-"),
    ("ghp_" + "x9" * 18, "GitHub"), ("AKIA" + "ABCDEFGH23456789", "AWS"), ("https://me:s3cret@host/v1", "URL"),
    ("postgres://:pw@db:5432/x", "URL"),
    ("hf_hub_download", None), ("risk-averse-approach-of-the-team-2024", None), ("git@github.com:org/repo.git", None),
    ("https://host/a:b@c", None), ("https://me:<masked>@host/v1", None), ("see hf_... for a token", None),
])
def test_credential_values_are_told_by_their_shape(text, found):
    from align.core.leaks import credential_in

    result = credential_in(text)
    assert (result is None) if found is None else (found in result)


def test_mask_keeps_what_is_not_a_credential_and_says_where_the_credentials_were():
    from align.core.leaks import MASK, mask, mask_argv, mask_text

    config = {"hub_token": PLAIN_TOKEN, "pad_token": "<pad>", "max_new_tokens": 64, "use_auth_token": True,
              "env": {"WANDB_API_KEY": TRACKER_KEY, "HF_HOME": "/tmp/hf"},
              "actor": {"base_urls": ["http://me:pw123@127.0.0.1:8000/v1"], "api_key_env": "ACTOR_KEY"},
              "run_name": HUB_TOKEN, "eos_token": None}
    masked, found = mask(config)
    assert masked == {**config, "hub_token": MASK, "env": {"WANDB_API_KEY": MASK, "HF_HOME": "/tmp/hf"},
                      "actor": {"base_urls": [f"http://me:{MASK}@127.0.0.1:8000/v1"], "api_key_env": "ACTOR_KEY"},
                      "run_name": MASK}
    assert [path for path, _, _ in found] == [["hub_token"], ["env", "WANDB_API_KEY"], ["actor", "base_urls", 0], ["run_name"]]
    assert mask_argv(["--config", "r.yaml", "--hub_token", PLAIN_TOKEN, "--api-key=x", "--run_name", HUB_TOKEN]) == \
        ["--config", "r.yaml", "--hub_token", MASK, f"--api-key={MASK}", "--run_name", MASK]
    assert mask_text(f"bad value {HUB_TOKEN}") == f"bad value {MASK}"


def test_an_error_line_does_not_quote_a_credential(capsys):
    from align.core.errors import exit_on_user_error

    @exit_on_user_error
    def fails():
        raise AlignError(f"recipe.yaml: key 'report_to' must be one of ..., got '{HUB_TOKEN}'")

    with pytest.raises(SystemExit):
        fails()
    err = capsys.readouterr().err
    assert HUB_TOKEN not in err and err.startswith("align: error: recipe.yaml: key 'report_to'")


# ------------------------------------------------------------------ a stage: command line and recipe


@pytest.mark.parametrize("given", ["command line", "recipe"])
def test_a_token_given_to_a_stage_reaches_no_file_but_its_push(given, tmp_path, fake_hub, monkeypatch):
    import torch

    from align.cli import main
    from align.core.leaks import MASK

    out = tmp_path / "sft"
    monkeypatch.delenv("ALIGN_TEST_TRACKER_API_KEY", raising=False)  # (the recipe's env: sets it; undone after)
    if given == "command line":
        argv = stage_args("sft.yaml", out, "--hub_token", PLAIN_TOKEN, "--run_name", HUB_TOKEN)
    else:
        recipe = yaml.safe_load((REPO / "recipes" / "tiny-mixtral" / "sft.yaml").read_text())
        recipe.update(hub_token=PLAIN_TOKEN, run_name=HUB_TOKEN, env={"ALIGN_TEST_TRACKER_API_KEY": TRACKER_KEY})
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        argv = ["--config", str(path), "--output_dir", str(out)]
    assert main(["sft", *argv, "--max_steps", "1", "--save_steps", "1", "--push_to_hub", "true",
                 "--hub_model_id", "me/tiny-sft"]) == 0

    # the push used the token, and uploaded no file holding it
    (create, upload) = fake_hub
    assert create == ("create", "me/tiny-sft", PLAIN_TOKEN) and upload[:3] == ("upload", "me/tiny-sft", PLAIN_TOKEN)
    assert "training_args.bin" in upload[3] and "align_config.yaml" in upload[3]
    # no file of the stage (checkpoints and pickles included) holds it
    assert (out / "checkpoint-1" / "training_args.bin").is_file()
    assert _files_holding(out, PLAIN_TOKEN, HUB_TOKEN, TRACKER_KEY) == []
    config = yaml.safe_load((out / "align_config.yaml").read_text())
    assert config["training"]["hub_token"] == MASK and config["training"]["run_name"] == MASK
    saved = torch.load(out / "checkpoint-1" / "training_args.bin", weights_only=False)
    assert saved.hub_token is None and saved.output_dir == str(out)
    # and a publish of it holds it nowhere either (the stage's own files pass the pattern check: no false alarm)
    from align.core.leaks import check_folder

    check_folder(out, patterns=True)
    assert main(["publish", str(out), "--repo-id", "me/tiny", "--dry-run", "--output", str(tmp_path / "hub")]) == 0
    assert _files_holding(tmp_path / "hub", PLAIN_TOKEN, HUB_TOKEN, TRACKER_KEY) == []


# ------------------------------------------------------------------ a pipeline's set:


def _secret_pipeline(tmp_path) -> Path:
    spec = {"output_dir": str(tmp_path / "out"),
            "accelerate_config": str(REPO / "recipes" / "accelerate" / "cpu.yaml"),
            "stages": [
                {"name": "sft", "kind": "sft", "recipe": str(REPO / "recipes" / "tiny-mixtral" / "sft.yaml"),
                 "set": {"hub_token": PLAIN_TOKEN, "run_name": HUB_TOKEN, "max_steps": 1, "save_steps": 1,
                         "env": {"ALIGN_TEST_TRACKER_API_KEY": TRACKER_KEY}}},
                {"name": "publish", "kind": "publish", "source": "sft", "repo_id": "me/tiny"}]}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_the_pipeline_hands_a_stage_its_secrets_in_memory(tmp_path, monkeypatch):
    """What a stage's process reads from its masked recipe.yaml, given the environment the runner starts it
    with: the token itself (the real run below cannot show it: nothing it writes may hold it)."""
    import align.runner.pipeline
    from align.train.config import parse_stage_args
    from align.core.leaks import held, recipe_secrets_env

    started = []
    monkeypatch.setattr(align.runner.pipeline.Runner, "_run", lambda self, cmd, log, name, secrets=None, **_: started.append(secrets))
    runner = align.runner.pipeline.Runner(align.runner.pipeline.load_pipeline(str(_secret_pipeline(tmp_path))), "pipeline.yaml")
    stage = runner.spec["stages"][0]
    folder = tmp_path / "out" / "sft"
    folder.mkdir(parents=True)
    runner.execute(stage, runner.resolve(stage), folder)
    assert PLAIN_TOKEN not in (folder / "recipe.yaml").read_text()
    for name, value in recipe_secrets_env(started[0]).items():
        monkeypatch.setenv(name, value)
    import trl

    _, _, args = parse_stage_args(trl.SFTConfig, ["--config", str(folder / "recipe.yaml")])
    assert held(args, "hub_token") == PLAIN_TOKEN and args.hub_token is None


def test_a_token_in_a_pipelines_set_reaches_no_file(tmp_path):
    from align.core.leaks import MASK
    from align.runner.pipeline import main

    assert main([str(_secret_pipeline(tmp_path))]) == 0
    out = tmp_path / "out"
    assert (out / "sft" / "checkpoint-1" / "training_args.bin").is_file() and (out / "publish" / "hub" / "README.md").is_file()
    assert _files_holding(out, PLAIN_TOKEN, HUB_TOKEN, TRACKER_KEY) == []
    for name in ("recipe.yaml", "resolved.yaml"):
        text = (out / "sft" / name).read_text()
        assert f"hub_token: {MASK}" in text and f"ALIGN_TEST_TRACKER_API_KEY: {MASK}" in text, name


# ------------------------------------------------------------------ publish refuses what was planted


def _stage_copy(sft_output, tmp_path) -> Path:
    stage = tmp_path / "stage"
    shutil.copytree(sft_output, stage, ignore=shutil.ignore_patterns("checkpoint-*", "hub*"))
    return stage


def test_publish_refuses_a_token_planted_in_a_file_it_would_upload(sft_output, tmp_path, capsys, fake_hub):
    from align.cli import main

    stage = _stage_copy(sft_output, tmp_path)
    adapter_config = json.loads((stage / "adapter_config.json").read_text())
    (stage / "adapter_config.json").write_text(json.dumps({**adapter_config, "revision": HUB_TOKEN}))
    for flags in (["--dry-run"], ["--base-repo-id", "me/base"]):
        with pytest.raises(SystemExit) as exit_:
            main(["publish", str(stage), "--repo-id", "me/tiny", "--output", str(tmp_path / "hub"), *flags])
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
        assert err.startswith(f"align: error: {tmp_path / 'hub' / 'adapter_config.json'}: holds what looks like a "
                              "credential (a Hugging Face token") and HUB_TOKEN not in err
    assert fake_hub == []  # nothing pushed


@pytest.mark.parametrize("kind", ["torch.save", "pickle"])
def test_a_push_refuses_a_token_planted_in_a_pickle(kind, sft_output, tmp_path, fake_hub):
    """A pickle holding a token no pattern knows, under a key that says what it is (TrainingArguments'
    hub_token, as torch.save writes training_args.bin; a plain pickled mapping): read with stubs, found."""
    import torch
    import trl

    from align.publishing.publish import push_folder

    stage = _stage_copy(sft_output, tmp_path)
    target = stage / "training_args.bin"
    if kind == "torch.save":
        torch.save(trl.SFTConfig(output_dir=str(stage), hub_token=PLANTED, report_to="none", use_cpu=True, bf16=False),
                   target)
    else:
        target.write_bytes(pickle.dumps({"settings": {"wandb_api_key": PLANTED}}))
    with pytest.raises(AlignError, match=rf"^{target}: holds what looks like a credential \(key '(hub_token|wandb_api_key)'"):
        push_folder(str(stage), "me/tiny")
    assert fake_hub == []


def test_publish_masks_a_config_written_before_secrets_were_masked(sft_output, tmp_path):
    """A stage folder from an older align (hub_token in plain text in align_config.yaml) publishes masked."""
    from align.core.leaks import MASK
    from align.publishing.publish import main

    stage = _stage_copy(sft_output, tmp_path)
    config = yaml.safe_load((stage / "align_config.yaml").read_text())
    config["training"]["hub_token"] = PLAIN_TOKEN
    (stage / "align_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert main([str(stage), "--repo-id", "me/tiny", "--dry-run", "--output", str(tmp_path / "hub")]) == 0
    assert _files_holding(tmp_path / "hub", PLAIN_TOKEN) == []
    assert yaml.safe_load((tmp_path / "hub" / "align_config.yaml").read_text())["training"]["hub_token"] == MASK


def test_a_trees_build_records_its_settings_masked_and_still_resumes(tmp_path):
    from align.trees.builder import _check_or_record_settings

    settings = {"actor": {"backend": "server", "base_urls": ["http://me:pw-4711-secret@127.0.0.1:8000/v1"]}, "seed": 1}
    _check_or_record_settings(tmp_path, settings, "align trees build --config r.yaml")
    assert _files_holding(tmp_path, "pw-4711-secret") == [] and "127.0.0.1:8000" in (tmp_path / "build_info.json").read_text()
    _check_or_record_settings(tmp_path, settings, "align trees build --config r.yaml")  # the same settings: resumes
    with pytest.raises(AlignError, match="changed: seed"):
        _check_or_record_settings(tmp_path, {**settings, "seed": 2}, "")


def test_a_safetensors_file_is_searched_in_its_header_not_its_weights(tmp_path):
    import torch
    from safetensors.torch import save_file

    from align.core.leaks import credential_in_file

    weights = {"w": torch.randn(64, 64)}
    save_file(weights, tmp_path / "clean.safetensors", metadata={"format": "pt"})
    save_file(weights, tmp_path / "planted.safetensors", metadata={"format": "pt", "note": f"pushed with {HUB_TOKEN}"})
    assert credential_in_file(tmp_path / "clean.safetensors") is None
    assert "Hugging Face" in credential_in_file(tmp_path / "planted.safetensors")


def test_a_server_urls_password_reaches_neither_failures_jsonl_nor_the_terminal(tmp_path, capsys):
    """A server that refuses every request: each problem's error names the URL it came from, and so the
    password in that URL, which failures.jsonl and the error line show masked."""
    import threading
    from http.server import ThreadingHTTPServer

    from align.cli import main
    from test_first_day import _BusyHandler

    password = "url-pass-" + "5521"
    server = ThreadingHTTPServer(("127.0.0.1", 0), _BusyHandler)
    server.handle_error = lambda *a: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://bob:{password}@127.0.0.1:{server.server_address[1]}/v1"
        recipe = tmp_path / "trees.yaml"
        recipe.write_text(yaml.safe_dump({"problems": "arithmetic:2:0", "output_dir": str(tmp_path / "trees"),
                                          "progress": False, "actor": {"backend": "server", "model": "m",
                                                                       "base_urls": [url], "max_retries": 0}}))
        assert main(["trees", "build", "--config", str(recipe)]) == 1
    finally:
        server.shutdown()
    out, err = capsys.readouterr()
    failures = (tmp_path / "trees" / "failures.jsonl").read_text().splitlines()
    assert len(failures) == 2 and all("HTTP 400 from http://bob:" in json.loads(f)["error"] for f in failures)
    assert password not in out + err and "HTTP 400 from http://bob:" in err
    assert _files_holding(tmp_path / "trees", password) == []
