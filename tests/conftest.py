"""Shared fixtures: a fresh ALIGN_HOME and HF_HOME for the session (so the tiny models, tokenizers and
dataset caches are built from nothing, as on a machine that never saw the project), and tiny stage runs
that several tests read."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_REFERENCE = REPO.parent / "shared" / "reference"

# Set before any test module imports huggingface_hub / datasets (they read HF_HOME at import), and
# unconditionally: a cache left by an earlier run, or the developer's own, must not hide a missing step.
SESSION_HOME = Path(tempfile.mkdtemp(prefix="align-test-session-"))
os.environ["ALIGN_HOME"] = str(SESSION_HOME / "align")
os.environ["HF_HOME"] = str(SESSION_HOME / "hf")
for _variable in ("HF_DATASETS_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_TOKEN"):
    os.environ.pop(_variable, None)
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"


@pytest.fixture(scope="session", autouse=True)
def _fresh_homes():
    """The session's ALIGN_HOME and HF_HOME start empty and are removed at the end."""
    yield SESSION_HOME
    shutil.rmtree(SESSION_HOME, ignore_errors=True)


def stage_args(recipe: str, output_dir: Path, *extra: str) -> list[str]:
    """Run a tiny recipe in-process for a few steps into `output_dir`."""
    return ["--config", str(REPO / "recipes" / "tiny-mixtral" / recipe), "--output_dir", str(output_dir),
            "--save_steps", "1000", *extra]


@pytest.fixture(scope="session", autouse=True)
def _chdir_repo():
    old = os.getcwd()
    os.chdir(REPO)  # recipes name their data relative to the repo root
    yield
    os.chdir(old)


FIXED_INPUT = [[1, 733, 16289, 28793, 28705, 28740, 28750, 648, 28705, 28770, 327, 733, 28748, 16289, 28793]]


def logits_of(model):
    import torch

    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(FIXED_INPUT)).logits.float()


SFT_ARGS = ("--max_steps", "4", "--logging_steps", "2")


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory):
    """The tiny SFT recipe, 4 steps (SFT_ARGS): (output folder, the trained model's logits on FIXED_INPUT)."""
    from align.sft.train import main

    out = tmp_path_factory.mktemp("sft")
    trainer = main(stage_args("sft.yaml", out, *SFT_ARGS))
    return out, logits_of(trainer.model)


@pytest.fixture(scope="session")
def sft_output(sft_run):
    return sft_run[0]


SFT_4BIT_ARGS = ("--max_steps", "3", "--logging_steps", "1", "--experts_4bit", "true")


@pytest.fixture(scope="session")
def sft_4bit(tmp_path_factory):
    """The tiny SFT recipe on 4-bit (NF4) experts, 3 steps (SFT_4BIT_ARGS): (output folder, the trained model's
    logits on FIXED_INPUT). tests/test_nf4.py reads it; tests/test_stop_resume.py resumes a run equal to it."""
    from align.sft.train import main

    out = tmp_path_factory.mktemp("sft4")
    trainer = main(stage_args("sft.yaml", out, *SFT_4BIT_ARGS))
    return out, logits_of(trainer.model)
