"""Built-in data generators for pipelines (the quickstart bootstraps its base model with one)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from align.core.errors import AlignError
from align.tasks.critic import feedback_turn, opening, step_critique
from align.tasks.problems import addition_problems

GENERATORS = ("addition-sft",)


def wrong_addition_steps(a: int, b: int, rng: random.Random) -> str:
    """Column addition with one column's sum off by one and every later step consistent with it: the
    slips the bootstrapped model makes, so a feedback example looks like a real failed first attempt."""
    da, db = str(a)[::-1], str(b)[::-1]
    columns = max(len(da), len(db))
    slip = rng.randrange(columns)
    carry, lines, digits = 0, [], []
    for i in range(columns):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        total = x + y + carry
        if i == slip:
            total += 1 if total == 0 or rng.random() < 0.5 else -1
        lines.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={total}")
        digits.append(total % 10)
        carry = total // 10
    answer = int("".join(map(str, [carry] * bool(carry) + digits[::-1])))
    return "\n".join(lines + [f"Answer: {answer}"])


def addition_sft_rows(n: int, seed: int, digits: list[int], split: str = "train", feedback: float = 0.0,
                      critic: str = "observation") -> list[dict]:
    """`a+b` prompt-completion rows answered by step-by-step column addition, digit counts mixed evenly;
    by default never a held-out pair, so evaluation on the `heldout` split stays unseen. A `feedback`
    fraction of rows first shows a wrong attempt and the observation critic's feedback turn, so the
    model learns to try again after "Your answer is wrong." (only the final, correct answer is trained);
    with critic "steps" the feedback turn also names the first wrong step, as the step critic does."""
    problems = []
    for i, d in enumerate(digits):
        problems += addition_problems(n // len(digits), seed=seed + 1000 * i, digits=d, split=split)
    rng = random.Random(seed)
    rng.shuffle(problems)
    rows = []
    for p in problems:
        prompt = opening(p.instruction)
        if rng.random() < feedback:
            a, b = map(int, p.prompt.split("+"))
            wrong = wrong_addition_steps(a, b, rng)
            critique = step_critique(p, wrong) if critic == "steps" else ""
            prompt += [{"role": "assistant", "content": wrong},
                       {"role": "user", "content": feedback_turn(wrong.rsplit("Answer: ", 1)[1], critique)}]
        rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": p.extra["solution"]}]})
    return rows


def check_feedback(feedback, where: str) -> float:
    if not isinstance(feedback, (int, float)) or isinstance(feedback, bool) or not 0 <= feedback <= 1:
        raise AlignError(f"{where}: key 'feedback' must be a fraction between 0 and 1, got {feedback!r}")
    return float(feedback)


def write_generated_data(spec: dict, folder: Path) -> str:
    generator = spec.get("generator", GENERATORS[0])
    if generator not in GENERATORS:
        raise AlignError(f"stage {spec.get('name')}: generator must be one of {', '.join(GENERATORS)}, got {generator!r}")
    feedback = check_feedback(spec.get("feedback", 0.0), f"stage {spec.get('name')}")
    digits = spec.get("digits", [2, 3])
    rows = addition_sft_rows(int(spec.get("n", 20000)), int(spec.get("seed", 0)), list(digits), spec.get("split", "train"),
                             feedback, spec.get("critic", "observation"))
    path = folder / "train.jsonl"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return str(path)
