"""`align eval`: pass@1 with greedy decoding on held-out problems, with the trees' verifiers.

Writes results.json (per model: pass@1 overall and per task, number of problems), results.md (the
table, also printed), the answers of every model, and the plots of the runs it is told about.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from align.errors import AlignError
from align.trees.problems import Problem, load_problems
from align.trees.sandbox import SandboxLimits
from align.trees.verifiers import verify


def score(problems: list[Problem], responses: list[str], limits: SandboxLimits | None = None) -> dict:
    """pass@1 overall and per task for one model's answers (one answer per problem, same order)."""
    if len(problems) != len(responses):
        raise ValueError("one response per problem")
    per_task = defaultdict(lambda: [0, 0])
    verdicts = [verify(p, r, limits) for p, r in zip(problems, responses)]
    for p, v in zip(problems, verdicts):
        per_task[p.task][0] += v.correct
        per_task[p.task][1] += 1
    correct = sum(v.correct for v in verdicts)
    return {
        "pass@1": round(correct / len(problems), 4) if problems else 0.0,
        "n": len(problems),
        "per_task": {t: {"pass@1": round(c / n, 4), "n": n} for t, (c, n) in sorted(per_task.items())},
        "correct": [v.correct for v in verdicts],
    }


def generate_greedy(model_path: str, adapter: str | None, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    import torch

    from align.models import load_for_generation, load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(adapter or resolve_model_path(model_path))
    tokenizer.padding_side = "left"
    model = load_for_generation(model_path, adapter)
    out = []
    for i in range(0, len(prompts), batch_size):
        chats = [[{"role": "user", "content": p}] for p in prompts[i:i + batch_size]]
        enc = tokenizer.apply_chat_template(chats, add_generation_prompt=True, return_tensors="pt", padding=True,
                                            return_dict=True)
        with torch.no_grad():
            gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        out += [t.strip() for t in tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    return out


def markdown_table(results: dict) -> str:
    tasks = sorted({t for r in results["models"].values() for t in r["per_task"]})
    lines = ["| model | pass@1 | " + " | ".join(f"{t} pass@1" for t in tasks) + " | problems |",
             "|---|---|" + "---|" * len(tasks) + "---|"]
    for name, r in results["models"].items():
        cells = " | ".join(f"{r['per_task'][t]['pass@1']:.1%}" if t in r["per_task"] else "" for t in tasks)
        lines.append(f"| {name} | {r['pass@1']:.1%} | {cells} | {r['n']} |")
    return "\n".join(lines)


def run_eval(spec: dict, output: Path) -> dict:
    problems, _ = load_problems(spec["problems"], limit=spec.get("limit"))
    models = spec.get("models") or {}
    if not models:
        raise AlignError("eval: key 'models' is empty")
    output.mkdir(parents=True, exist_ok=True)
    results = {"problems": spec["problems"], "models": {}}
    for name, m in models.items():
        if not isinstance(m, dict) or "model" not in m:
            raise AlignError(f"eval: models.{name} needs 'model' (and optionally 'adapter')")
        if m.get("adapter") and not Path(m["adapter"]).exists():
            print(f"[align] eval: {name} skipped ({m['adapter']} does not exist: a stage not run)", flush=True)
            continue
        responses = generate_greedy(m["model"], m.get("adapter"), [p.instruction for p in problems],
                                    int(spec.get("max_new_tokens", 256)), int(spec.get("batch_size", 32)))
        scored = score(problems, responses)
        with open(output / f"answers_{name}.jsonl", "w") as f:
            for p, r, ok in zip(problems, responses, scored.pop("correct")):
                f.write(json.dumps({"problem_id": p.id, "response": r, "correct": ok}) + "\n")
        results["models"][name] = {**scored, "model": m["model"], "adapter": m.get("adapter")}
    (output / "results.json").write_text(json.dumps(results, indent=2))
    (output / "results.md").write_text(markdown_table(results) + "\n")
    from align.plots import make_plots

    make_plots(spec.get("runs") or {}, spec.get("trees"), output / "plots")
    return results


def main(argv: list[str]):
    from align.config import load_recipe_file
    from align.errors import ArgumentParser

    parser = ArgumentParser(prog="align eval")
    parser.add_argument("--config", required=True, help="problems, models {name: {model, adapter}}, runs, trees")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    spec = load_recipe_file(args.config)
    if "problems" not in spec:
        raise AlignError(f"{args.config}: key 'problems' is required")
    results = run_eval(spec, Path(args.output))
    print(markdown_table(results))
    return 0
