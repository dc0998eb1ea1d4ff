"""Optional dependencies a recipe asks for, checked before any model loads.

A recipe that names `report_to: tensorboard` or a DeepSpeed accelerate config would otherwise fail only
once the trainer is built, after the model has loaded (minutes to hours on a real model). Each missing
piece gets one line naming the extra that installs it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from align.core.errors import AlignError

# report_to backend -> (modules any one of which makes it available, what to install)
TRACKERS = {
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install 'moe-align[tracking]'"),
    "wandb": (("wandb",), "pip install 'moe-align[tracking]'"),
    "trackio": (("trackio",), "pip install 'moe-align[tracking]'"),
    "mlflow": (("mlflow",), "pip install mlflow"),
    "comet_ml": (("comet_ml",), "pip install comet_ml"),
    "neptune": (("neptune",), "pip install neptune"),
    "clearml": (("clearml",), "pip install clearml"),
    "dagshub": (("dagshub",), "pip install dagshub"),
    "dvclive": (("dvclive",), "pip install dvclive"),
    "swanlab": (("swanlab",), "pip install swanlab"),
    "codecarbon": (("codecarbon",), "pip install codecarbon"),
    "azure_ml": (("azureml",), "pip install azureml-core"),
    "flyte": (("flytekit",), "pip install flytekit flytekitplugins-deck-standard"),
    "kubeflow": (("kubeflow",), "pip install kubeflow"),
}
DEEPSPEED_HINT = "pip install 'moe-align[deepspeed]'"


def importable(*modules: str) -> bool:
    """True when one of `modules` can be imported (found on the path; nothing is imported)."""
    for name in modules:
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except (ImportError, ValueError):
            continue
    return False


def check_report_to(report_to, source: str) -> None:
    """Every tracker named in `report_to` (a list after TRL's parsing, or a string) can be imported."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        if name in ("none", "all", None, ""):
            continue  # "all" means whatever is installed
        if name not in TRACKERS:
            raise AlignError(f"{source}: key 'report_to': unknown tracker {name!r} (known: {', '.join(sorted(TRACKERS))})")
        modules, hint = TRACKERS[name]
        if not importable(*modules):
            raise AlignError(f"{source}: key 'report_to' names {name}, which is not installed ({hint})")


def check_deepspeed(source: str, why: str) -> None:
    if not importable("deepspeed"):
        raise AlignError(f"{source}: {why} needs DeepSpeed, which is not installed ({DEEPSPEED_HINT})")


def check_training_extras(args, source: str) -> None:
    """The trackers and DeepSpeed that a stage's parsed TRL config asks for."""
    check_report_to(getattr(args, "report_to", None), source)
    if getattr(args, "deepspeed", None):
        check_deepspeed(source, "key 'deepspeed'")


def check_accelerate_config(path: str | Path, source: str | None = None) -> dict:
    """An accelerate config file: readable YAML with a known distributed_type, and DeepSpeed installed if it
    asks for DeepSpeed. Returns the config."""
    from align.train.config import load_recipe_file

    path = Path(path)
    where = source or str(path)
    if not path.is_file():
        raise AlignError(f"{where}: accelerate config {path} not found")
    config = load_recipe_file(path)
    if str(config.get("distributed_type", "NO")) == "DEEPSPEED":
        check_deepspeed(str(path), "distributed_type: DEEPSPEED")
    return config
