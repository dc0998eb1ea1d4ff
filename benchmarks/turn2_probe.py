"""Why the quickstart's model cannot use a second turn: greedy pass@1 on held-out additions with the
problem where its training put it (first in the text), after one earlier solved turn, and behind a few
words ("Solve again: 57+68"). A model that reads the operands by their distance from the start of the text
is right in the first case only.

    python benchmarks/turn2_probe.py MODEL_DIR [--adapter ADAPTER_DIR] [--problems 200]
"""

from __future__ import annotations

import argparse
import json

import torch

PLACEMENTS = {
    "first": lambda problem: [{"role": "user", "content": problem}],
    "after_a_turn": lambda problem: [{"role": "user", "content": "1+1"},
                                     {"role": "assistant", "content": "1+1=2\nAnswer: 2"},
                                     {"role": "user", "content": problem}],
    "after_words": lambda problem: [{"role": "user", "content": f"Solve again: {problem}"}],
}


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.trees.problems import addition_problems

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--adapter")
    parser.add_argument("--problems", type=int, default=200)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.adapter or args.model)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).eval()
    problems = addition_problems(args.problems, seed=999, digits=2, split="heldout")
    result = {}
    for name, place in PLACEMENTS.items():
        texts = [tokenizer.apply_chat_template(place(p.prompt), tokenize=False, add_generation_prompt=True)
                 for p in problems]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answers = [tokenizer.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True) for row in out]
        result[name] = sum(a.rsplit("Answer: ", 1)[-1].strip() == p.answer for a, p in zip(answers, problems)) / len(problems)
    print(json.dumps({"model": args.model, "adapter": args.adapter, "problems": len(problems), "pass@1": result}))


if __name__ == "__main__":
    main()
