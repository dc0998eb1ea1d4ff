"""First-day breaks (issue 24): PEFT's LoRA target spellings, an export of a build that solved nothing,
user errors under a 2-process launch, and a build or eval whose server is down."""

from __future__ import annotations

import json

import pytest

from conftest import REPO


# ---------------------------------------------------------------- an export of a build with no correct answer
def test_an_export_of_a_build_that_solved_nothing_loads_config_by_config(tmp_path, capsys):
    from datasets import load_dataset
    from huggingface_hub import DatasetCard

    from align.cli import main
    from align.trees.builder import build_trees
    from test_trees import OracleBackend, _config

    config, actor, critic, limits = _config(tmp_path, problems="arithmetic:3:5", max_turns=2)
    build_trees(config, actor, critic, limits, actor=OracleBackend(0.0))  # every answer wrong
    capsys.readouterr()
    export = tmp_path / "export"
    assert main(["trees", "export", str(tmp_path / "trees"), "--output", str(export)]) == 0
    out, err = capsys.readouterr()
    counts = json.loads(out.strip().splitlines()[-1])
    assert counts["sft"] == counts["pairs"] == counts["pairs_ultrainteract"] == 0 and counts["kto"] > 0
    assert counts["empty_configs"] == ["sft", "pairs", "pairs_ultrainteract"]
    warning = [line for line in err.splitlines() if "no correct answer" in line]
    assert len(warning) == 1 and "sft, pairs, pairs_ultrainteract left out of the card" in warning[0]

    card = DatasetCard.load(export / "README.md")
    listed = [c["config_name"] for c in card.data.to_dict()["configs"]]
    assert listed == ["kto"]
    assert "`sft`, `pairs`, `pairs_ultrainteract` have no rows" in card.text and "no correct answer" in card.text
    cache = str(tmp_path / "cache")
    for name in listed:  # every config the card names loads, as it would from the Hub
        loaded = load_dataset(str(export), name=name, cache_dir=cache)
        assert len(loaded["train"]) == counts[name]
    import pyarrow.parquet as pq

    for name in counts["empty_configs"]:  # the empty ones keep their columns, in an empty parquet file
        empty = pq.read_table(str(export / name / "train-00000-of-00001.parquet"))
        assert empty.num_rows == 0 and {"id", "chosen" if "pairs" in name else "completion"} <= set(empty.column_names)
    from align.data import load_one
    from align.errors import AlignError

    with pytest.raises(AlignError, match="has no rows"):  # a stage given the empty folder says so in one line
        load_one(str(export / "sft"))

    assert main(["trees", "stats", str(tmp_path / "trees")]) == 0
    err = capsys.readouterr().err
    assert sum("no correct answer" in line for line in err.splitlines()) == 1
