"""The problem record every problem source makes (`Problem`), the tasks and their UltraInteract prefixes,
and `collect_problems`, which turns rows into problems for a file (`problems.py`) and a Hub set
(`hub_sets.py`) alike. Below both; `align.tasks.problems` re-exports every name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from align.core.errors import AlignError

TASKS = ("math", "code", "logic")

# Instruction prefixes of the released UltraInteract data, per task.
TASK_PREFIX = {
    "math": "Solve the following math problem step-by-step.\nSimplify your answer as much as possible.\n"
            "Present your final answer as \\boxed{Your Answer}.\n",
    "code": "Write Python code to solve the task.\n",
    "logic": "Solve the following problem step-by-step.\nGive your final answer after 'Answer:'.\n",
}
# Task labels of the released columns.
RELEASED_TASK = {"math": "Math_CoT", "code": "Coding", "logic": "Logic"}


@dataclass
class Problem:
    id: str
    task: str
    prompt: str
    source: str = "user"
    answer: str | None = None  # math, logic
    tests: str | None = None  # code: defines check(candidate)
    entry_point: str | None = None  # code: the function the tests call
    choices: list[str] | None = None  # logic, multiple choice
    prefix: str | None = None  # instruction prefix; None: the task's UltraInteract prefix
    extra: dict = field(default_factory=dict)

    @property
    def instruction(self) -> str:
        """The first user turn: the prefix (by default the task's UltraInteract prefix), then the problem."""
        return (TASK_PREFIX[self.task] if self.prefix is None else self.prefix) + self.prompt

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, {}, [])}


def collect_problems(rows, convert, skip_bad_rows: bool, limit: int | None) -> tuple[list[Problem], list[str]]:
    """Problems from (where, row) pairs, `convert(where, row)` making each: ids unique, a bad row (or a row
    that is an AlignError already) the error, or with `skip_bad_rows` left out and listed; rows past the
    first `limit` problems are not read."""
    problems, skipped, seen = [], [], set()
    for where, row in rows:
        if limit and len(problems) >= limit:
            break
        try:
            if isinstance(row, AlignError):
                raise row
            problem = convert(where, row)
            if problem.id in seen:
                raise AlignError(f"{where}: its id {problem.id!r} repeats an earlier row's")
            seen.add(problem.id)
            problems.append(problem)
        except AlignError as err:
            if not skip_bad_rows:
                raise
            skipped.append(str(err))
    return problems, skipped
