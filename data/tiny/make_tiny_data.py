"""Regenerate the tiny recipe datasets: `python data/tiny/make_tiny_data.py` (seeded, byte-identical).

Two-digit arithmetic with step-by-step answers, written in the released UltraInteract columns
(`instruction`/`response` for SFT, `trajectory`/`chosen`/`rejected` for pairs) so the tiny recipes
also exercise the released-schema readers.
"""

import hashlib
import json
import random
from pathlib import Path

PREFIX = "Solve the following math problem step-by-step.\nPresent your final answer as \\boxed{Your Answer}.\n"


def answer(a, b, c):
    return f"Step 1: {a} + {b} = {c}.\nAnswer:\n\\boxed{{{c}}}"


def main(n=48, seed=0):
    rng = random.Random(seed)
    out = Path(__file__).parent
    sft, pairs = [], []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        question = f"{PREFIX}What is {a} + {b}?"
        pid = hashlib.sha1(question.encode()).hexdigest()[:8]
        wrong = a + b + rng.choice([-10, -1, 1, 10])
        sft.append({"id": f"{pid}_1_1", "parent_id": pid, "task": "Math_CoT", "dataset": "tiny-arith",
                    "instruction": question, "response": answer(a, b, a + b)})
        traj = [{"from": "user", "value": question}]
        pairs.append({"id": f"{pid}_1_1", "parent_id": pid, "task": "Math_CoT", "dataset": "tiny-arith",
                      "trajectory": traj, "chosen": answer(a, b, a + b), "rejected": answer(a, b, wrong)})
        if rng.random() < 0.3:  # a second turn after feedback, as in a tree of depth 2
            traj2 = traj + [{"from": "assistant", "value": answer(a, b, wrong)},
                            {"from": "user", "value": f"Out: {wrong}\nYour answer is wrong."}]
            wrong2 = a + b + rng.choice([-2, 2])
            pairs.append({"id": f"{pid}_2_2", "parent_id": pid, "task": "Math_CoT", "dataset": "tiny-arith",
                          "trajectory": traj2, "chosen": answer(a, b, a + b), "rejected": answer(a, b, wrong2)})
    for name, rows in (("sft.jsonl", sft), ("pairs.jsonl", pairs)):
        with open(out / name, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
