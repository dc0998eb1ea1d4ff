"""Built-in data generators for pipelines (the quickstart bootstraps its base model with one)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from align.errors import AlignError
from align.trees.problems import addition_problems

GENERATORS = ("addition-sft",)


def addition_sft_rows(n: int, seed: int, digits: list[int], split: str = "train") -> list[dict]:
    """`a+b` conversations answered by step-by-step column addition, digit counts mixed evenly; by
    default never a held-out pair, so evaluation on the `heldout` split stays unseen."""
    problems = []
    for i, d in enumerate(digits):
        problems += addition_problems(n // len(digits), seed=seed + 1000 * i, digits=d, split=split)
    random.Random(seed).shuffle(problems)
    return [{"messages": [{"role": "user", "content": p.instruction}, {"role": "assistant", "content": p.extra["solution"]}]}
            for p in problems]


def write_generated_data(spec: dict, folder: Path) -> str:
    generator = spec.get("generator")
    if generator not in GENERATORS:
        raise AlignError(f"stage {spec.get('name')}: generator must be one of {', '.join(GENERATORS)}, got {generator!r}")
    digits = spec.get("digits", [2, 3])
    rows = addition_sft_rows(int(spec.get("n", 20000)), int(spec.get("seed", 0)), list(digits), spec.get("split", "train"))
    path = folder / "train.jsonl"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return str(path)
