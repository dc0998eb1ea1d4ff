"""`align eval`: pass@1 with greedy decoding on held-out problems, with the trees' verifiers; with
`turns: K` (2..5) also pass@k-turns, the observation critic in the loop as in the trees: a wrong answer
gets its observation and "Your answer is wrong." as the next user turn, and the model tries again.

Writes results.json (per model: pass@1 overall and per task, pass@k-turns, number of problems),
results.md (the table, also printed), the answers of every model, and the plots of the runs it is told about.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from align.errors import AlignError
from align.trees.backends import BackendError
from align.trees.problems import Problem, load_problems
from align.trees.sandbox import SandboxLimits
from align.trees.verifiers import verify


@dataclass
class EvalConfig:
    """`align eval --config`: what to evaluate, on which problems, how."""

    problems: str = field(metadata={"help": "Problems: a dataset path / hub id, or a built-in (addition:..., humaneval)."})
    models: dict = field(metadata={"help": "name: {model: hub id or folder, adapter: optional PEFT folder}."})
    turns: int = field(default=1, metadata={"help": "pass@k-turns up to k (the observation critic in the loop).",
                                            "range": (1, 5)})
    batch_size: int = field(default=32, metadata={"help": "Problems decoded together.", "range": (1, 65536)})
    max_new_tokens: int = field(default=256, metadata={"help": "Tokens per answer at most.", "range": (1, 1 << 20)})
    limit: int | None = field(default=None, metadata={"help": "Only the first N problems.", "range": (1, None)})
    critic: str = field(default="observation", metadata={"help": "The critic of the later turns: observation or steps "
                                                         "(the first wrong step, for the built-in addition)."})
    runs: dict = field(default_factory=dict, metadata={"help": "name: stage output folder, for the plots."})
    trees: str | None = field(default=None, metadata={"help": "A trees folder, for the tree statistics plot."})


MODEL_KEYS = {"model", "adapter", "backend", "base_urls", "api_key_env", "concurrency", "request_timeout_s", "max_retries"}


class _ServerBatches:
    """A served model (OpenAI-compatible) in the eval's batch interface: each batch is one burst of
    concurrent requests on one event loop kept for the whole eval."""

    def __init__(self, spec):
        import asyncio

        from align.trees.backends import ServerBackend

        self.loop = asyncio.new_event_loop()
        self.backend = ServerBackend(spec)

    def generate_batch(self, requests):
        import asyncio

        async def burst():
            return await asyncio.gather(*(self.backend.generate(m, n, seed) for m, n, seed in requests))

        return self.loop.run_until_complete(burst())

    def close(self):
        self.loop.run_until_complete(self.backend.aclose())
        self.loop.close()


def make_eval_backend(m: dict, max_new_tokens: int):
    """Greedy decoding of one eval model: local (transformers, optional adapter) or served."""
    from align.trees.backends import LocalBackend, ModelSpec

    if m.get("backend", "local") == "server":
        spec = ModelSpec(backend="server", model=m["model"], base_urls=list(m.get("base_urls") or []), temperature=0.0,
                         max_new_tokens=max_new_tokens, api_key_env=m.get("api_key_env"),
                         **{k: m[k] for k in ("concurrency", "request_timeout_s", "max_retries") if k in m})
        return _ServerBatches(spec)
    return LocalBackend(ModelSpec(model=m["model"], adapter=m.get("adapter"), temperature=0.0,
                                  max_new_tokens=max_new_tokens))


def parse_eval_config(spec: dict, where: str) -> EvalConfig:
    """The eval settings checked (keys, types, ranges, each model's entry) before any model loads."""
    from align.config import validate_keys

    for key in ("problems", "models"):
        if key not in spec:
            raise AlignError(f"{where}: key '{key}' is required")
    config = EvalConfig(**validate_keys(spec, [EvalConfig], where))
    if not config.models:
        raise AlignError(f"{where}: key 'models' is empty")
    if config.critic not in ("observation", "steps"):
        raise AlignError(f"{where}: key 'critic' must be observation or steps, got {config.critic!r}")
    for name, m in config.models.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
            raise AlignError(f"{where}: models: {name!r} is not a usable name (letters, digits, '_', '-', '.'; "
                             "it names the answers file)")
        if not isinstance(m, dict) or not isinstance(m.get("model"), str) or not m["model"].strip():
            raise AlignError(f"{where}: models.{name} needs 'model' (and optionally 'adapter')")
        bad = set(m) - MODEL_KEYS
        if bad:
            raise AlignError(f"{where}: models.{name}: unknown key(s) {', '.join(sorted(map(str, bad)))} "
                             f"(allowed: {', '.join(sorted(MODEL_KEYS))})")
        if m.get("adapter") is not None and not isinstance(m["adapter"], str):
            raise AlignError(f"{where}: models.{name}.adapter must be a folder")
        if m.get("backend", "local") not in ("local", "server"):
            raise AlignError(f"{where}: models.{name}.backend must be local or server, got {m['backend']!r}")
        if m.get("backend") == "server":
            urls = m.get("base_urls")
            if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
                raise AlignError(f"{where}: models.{name}: base_urls (a list of URLs) is required for the server backend")
            if m.get("adapter"):
                raise AlignError(f"{where}: models.{name}: a served model takes no adapter (serve a merged checkpoint)")
    if not isinstance(config.runs, dict) or not all(isinstance(v, str) for v in config.runs.values()):
        raise AlignError(f"{where}: key 'runs' must map names to stage output folders")
    return config


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


def generate_greedy(backend, chats: list[list[dict]], batch_size: int) -> list[str]:
    out = []
    for i in range(0, len(chats), batch_size):
        out += [texts[0] for texts in backend.generate_batch([(chat, 1, 0) for chat in chats[i:i + batch_size]])]
    return out


def multi_turn(backend, problems: list[Problem], first: list[str], first_correct: list[bool], turns: int,
               batch_size: int, critic: str = "observation") -> tuple[dict, list[list[dict]]]:
    """pass@k-turns for k = 1..turns (solved within k turns) and each problem's later attempts; `critic`
    steps adds the first wrong step to each feedback turn, as in the trees."""
    from align.trees.critic import feedback_turn, step_critique

    chats = [[{"role": "user", "content": p.instruction}, {"role": "assistant", "content": r}] for p, r in zip(problems, first)]
    solved = list(first_correct)
    observation = {i: verify(problems[i], first[i]).observation for i, ok in enumerate(solved) if not ok}
    later: list[list[dict]] = [[] for _ in problems]
    rates = {"1": round(sum(solved) / len(problems), 4)}
    for k in range(2, turns + 1):
        todo = [i for i, ok in enumerate(solved) if not ok]
        for i in todo:
            critique = step_critique(problems[i], chats[i][-1]["content"]) if critic == "steps" else ""
            chats[i].append({"role": "user", "content": feedback_turn(observation[i], critique)})
        answers = generate_greedy(backend, [chats[i] for i in todo], batch_size)
        for i, answer in zip(todo, answers):
            chats[i].append({"role": "assistant", "content": answer})
            verdict = verify(problems[i], answer)  # once per answer: for code it is a sandbox run
            solved[i], observation[i] = verdict.correct, verdict.observation
            later[i].append({"turn": k, "response": answer, "correct": solved[i]})
        rates[str(k)] = round(sum(solved) / len(problems), 4)
    return rates, later


def markdown_table(results: dict) -> str:
    tasks = sorted({t for r in results["models"].values() for t in r["per_task"]})
    turns = sorted({int(k) for r in results["models"].values() for k in r.get("pass@turns", {}) if k != "1"})
    lines = ["| model | pass@1 | " + "".join(f"{t} pass@1 | " for t in tasks) + "".join(f"pass@{k} turns | " for k in turns)
             + "problems |", "|---|---|" + "---|" * (len(tasks) + len(turns)) + "---|"]
    for name, r in results["models"].items():
        cells = "".join((f"{r['per_task'][t]['pass@1']:.1%}" if t in r["per_task"] else "") + " | " for t in tasks)
        cells += "".join((f"{r['pass@turns'][str(k)]:.1%}" if str(k) in r.get("pass@turns", {}) else "") + " | "
                         for k in turns)
        lines.append(f"| {name} | {r['pass@1']:.1%} | {cells}{r['n']} |")
    return "\n".join(lines)


def run_eval(spec: dict, output: Path, where: str = "eval") -> dict:
    config = parse_eval_config(spec, where)
    problems, _ = load_problems(config.problems, limit=config.limit)
    turns, batch_size = config.turns, config.batch_size
    output.mkdir(parents=True, exist_ok=True)
    results = {"problems": config.problems, "models": {}}
    for name, m in config.models.items():
        if m.get("adapter") and not Path(m["adapter"]).exists():
            print(f"[align] eval: {name} skipped ({m['adapter']} does not exist: a stage not run)", flush=True)
            continue
        backend = make_eval_backend(m, config.max_new_tokens)
        try:
            responses = generate_greedy(backend, [[{"role": "user", "content": p.instruction}] for p in problems],
                                        batch_size)
            scored = score(problems, responses)
            correct = scored.pop("correct")
            later = [[] for _ in problems]
            if turns > 1:
                scored["pass@turns"], later = multi_turn(backend, problems, responses, correct, turns, batch_size,
                                                         config.critic)
        except BackendError as err:
            raise AlignError(f"{where}: models.{name}: {err}") from None
        finally:
            getattr(backend, "close", lambda: None)()
        with open(output / f"answers_{name}.jsonl", "w") as f:
            for p, r, ok, more in zip(problems, responses, correct, later):
                f.write(json.dumps({"problem_id": p.id, "response": r, "correct": ok, **({"later_turns": more} if more else {})}) + "\n")
        results["models"][name] = {**scored, "model": m["model"], "adapter": m.get("adapter")}
    (output / "results.json").write_text(json.dumps(results, indent=2))
    (output / "results.md").write_text(markdown_table(results) + "\n")
    from align.plots import make_plots

    make_plots(config.runs, config.trees, output / "plots")
    return results


def main(argv: list[str]):
    from align.config import load_recipe_file
    from align.errors import ArgumentParser

    parser = ArgumentParser(prog="align eval")
    parser.add_argument("--config", required=True, help="problems, models {name: {model, adapter}}, runs, trees")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    spec = load_recipe_file(args.config)
    results = run_eval(spec, Path(args.output), args.config)
    print(markdown_table(results))
    return 0
