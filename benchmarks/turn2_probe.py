"""Why the quickstart's model cannot use a second turn: greedy pass@1 on held-out additions with the
problem where its training put it (first in the text), after one earlier solved turn, and behind a few
words ("Solve again: 57+68"). A model that reads the operands by their distance from the start of the text
is right in the first case only.

    python benchmarks/turn2_probe.py MODEL_DIR [--adapter ADAPTER_DIR] [--problems 200]
"""

from __future__ import annotations

import argparse
import json

PLACEMENTS = {
    "first": lambda problem: [{"role": "user", "content": problem}],
    "after_a_turn": lambda problem: [{"role": "user", "content": "1+1"},
                                     {"role": "assistant", "content": "1+1=2\nAnswer: 2"},
                                     {"role": "user", "content": problem}],
    "after_words": lambda problem: [{"role": "user", "content": f"Solve again: {problem}"}],
}


def main() -> None:
    from align.evaluation.evaluate import generate_greedy, make_eval_backend, score
    from align.tasks.problems import addition_problems

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--adapter")
    parser.add_argument("--problems", type=int, default=200)
    args = parser.parse_args()
    backend = make_eval_backend({"model": args.model, "adapter": args.adapter}, max_new_tokens=40)
    problems = addition_problems(args.problems, seed=999, digits=2, split="heldout")
    result = {name: score(problems, generate_greedy(backend, [place(p.prompt) for p in problems], 100))["pass@1"]
              for name, place in PLACEMENTS.items()}
    print(json.dumps({"model": args.model, "adapter": args.adapter, "problems": len(problems), "pass@1": result}))


if __name__ == "__main__":
    main()
