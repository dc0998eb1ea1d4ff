"""The training stages, in one place: what each trains, with which TRL config and trainer, on which columns.

The CLI, data loading, the pipeline runner, `--help` and the tests all read this registry, so a stage is
added or changed here once. Classes are named as "module:attribute" strings and imported on use: the CLI
must answer `align --help` without importing TRL.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


def _load(target: str):
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class TrainingStage:
    name: str
    summary: str
    entry: str  # "module:function" the CLI calls with argv
    config: str  # the TRL config dataclass every recipe key of the stage maps onto
    trainer: str  # our trainer class (TRL's, plus router statistics)
    columns: tuple[tuple[str, ...], ...]  # TRL conversational column groups, any one of which will do
    released: tuple[str, ...]  # UltraInteract release columns converted on load
    check: str | None = None  # "module:function(model_args, data_args, args)": recipe checks of this stage

    def config_class(self):
        return _load(self.config)

    def trainer_class(self):
        return _load(self.trainer)

    def check_function(self):
        return _load(self.check) if self.check else None


_PAIRS = ("prompt", "chosen", "rejected")
_UI_PAIR = ("trajectory", "chosen", "rejected")

TRAINING_STAGES: dict[str, TrainingStage] = {s.name: s for s in (
    TrainingStage("sft", "supervised fine-tuning (assistant turns only)", "align.sft.train:main", "trl:SFTConfig",
                  "align.sft.trainer:MoESFTTrainer", (("messages",), ("prompt", "completion")),
                  ("instruction", "response"), "align.sft.train:check"),
    TrainingStage("dpo", "DPO from an SFT adapter", "align.dpo.train:main", "trl:DPOConfig",
                  "align.dpo.trainer:MoEDPOTrainer", (_PAIRS,), _UI_PAIR),
    TrainingStage("kto", "KTO from an SFT adapter", "align.kto_nca.kto:main", "trl:KTOConfig",
                  "align.kto_nca.trainer:MoEKTOTrainer", (("prompt", "completion", "label"),), _UI_PAIR),
    TrainingStage("nca", "NCA (pairwise) from an SFT adapter", "align.kto_nca.nca:main", "trl:DPOConfig",
                  "align.dpo.trainer:MoEDPOTrainer", (_PAIRS,), _UI_PAIR, "align.kto_nca.nca:check"),
)}


def training_stage(name: str) -> TrainingStage:
    return TRAINING_STAGES[name]
