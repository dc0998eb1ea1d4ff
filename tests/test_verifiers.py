"""The environment's verdicts: math answers, logic answers, and code run against unit tests."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from align.tasks.problems import Problem, humaneval_problems
from align.tasks.verifiers import final_answer, verify_code, verify_logic, verify_math

HUMANEVAL = humaneval_problems()


def _solution(p):
    return "Step 1: write it.\n```python\n" + p.extra["function_prompt"] + p.extra["canonical_solution"] + "```"


def test_all_humaneval_canonical_solutions_pass():
    assert len(HUMANEVAL) == 164
    with ThreadPoolExecutor(4) as pool:
        verdicts = list(pool.map(lambda p: verify_code(p, _solution(p)), HUMANEVAL))
    failing = [p.id for p, v in zip(HUMANEVAL, verdicts) if not v.correct]
    assert failing == []


@pytest.mark.parametrize("index", [0, 10, 50, 100, 163])
def test_broken_humaneval_variants_fail(index):
    p = HUMANEVAL[index]
    broken = [
        "```python\n" + p.extra["function_prompt"] + "    return None\n```",
        "```python\n" + p.extra["function_prompt"] + "    raise ValueError('no')\n```",
        "```python\nimport sys\nsys.exit(0)\n```",
        "```python\nimport os\nos._exit(0)\n```",
        "I think the answer is obvious.",
    ]
    for response in broken:
        v = verify_code(p, response)
        assert not v.correct, response
        assert v.observation


def test_code_observation_is_the_traceback():
    p = HUMANEVAL[0]
    v = verify_code(p, "```python\n" + p.extra["function_prompt"] + "    return 1 / 0\n```")
    assert not v.correct and "ZeroDivisionError" in v.observation


def test_math_answers():
    p = Problem(id="m", task="math", prompt="?", answer="84")
    assert verify_math(p, "Step 1: 7 * 12 = 84.\nAnswer:\n\\boxed{84}").correct
    assert verify_math(p, "so \\boxed{84.0}").correct
    wrong = verify_math(p, "Step 2: 7 + 12 = 19\n\\boxed{19}")
    assert not wrong.correct and wrong.observation == "19"
    assert not verify_math(p, "I don't know").correct
    half = Problem(id="h", task="math", prompt="?", answer="\\frac{1}{2}")
    assert verify_math(half, "\\boxed{0.5}").correct
    assert verify_math(half, "\\boxed{\\dfrac{1}{2}}").correct
    sym = Problem(id="s", task="math", prompt="?", answer="2\\sqrt{2}")
    assert verify_math(sym, "\\boxed{\\sqrt{8}}").correct  # Math-Verify, in its worker process
    assert not verify_math(sym, "\\boxed{\\sqrt{7}}").correct


def test_math_verify_is_safe_from_threads():
    sym = Problem(id="s", task="math", prompt="?", answer="2\\sqrt{2}")
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda r: verify_math(sym, r).correct, ["\\boxed{\\sqrt{8}}", "\\boxed{3}"] * 4))
    assert results == [True, False] * 4


def test_logic_answers():
    p = Problem(id="l", task="logic", prompt="Is a whale a fish?", answer="no")
    assert verify_logic(p, "Step 1: mammal.\nAnswer:\nNo.").correct
    assert not verify_logic(p, "Answer: yes").correct
    mc = Problem(id="c", task="logic", prompt="?", answer="B", choices=["red", "blue", "green"])
    assert verify_logic(mc, "Answer: B").correct
    assert verify_logic(mc, "Answer: blue").correct
    assert not verify_logic(mc, "Answer: A").correct


def test_final_answer_extraction():
    assert final_answer("x \\boxed{\\frac{a}{b}} y") == "\\frac{a}{b}"
    assert final_answer("Answer:\n 42\nmore") == "42"
    assert final_answer("it is 1,234 apples") == "1,234"


def test_verify_cli_prints_verdicts_and_tally(tmp_path):
    problems = tmp_path / "problems.jsonl"
    rows = [{"id": "a", "task": "math", "prompt": "2+2?", "answer": "4", "source": "t"},
            {"id": "b", "task": "logic", "prompt": "Sky blue?", "answer": "yes", "source": "t"},
            {"id": "c", "task": "code", "prompt": "add", "entry_point": "add", "source": "t",
             "tests": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}]
    problems.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    responses = tmp_path / "responses.jsonl"
    answers = [("a", "\\boxed{4}"), ("b", "Answer: no"), ("c", "```python\ndef add(a, b):\n    return a + b\n```"),
               ("c", "```python\ndef add(a, b):\n    return a - b\n```")]
    responses.write_text("\n".join(json.dumps({"problem_id": i, "response": r}) for i, r in answers) + "\n")
    proc = subprocess.run([sys.executable, "-m", "align", "verify", "--problems", str(problems), "--responses",
                           str(responses)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    verdicts = [json.loads(line) for line in lines[:-1]]
    assert [v["correct"] for v in verdicts] == [True, False, True, False]
    assert lines[-1] == "2 passed, 2 failed"


def test_bad_problem_rows_are_named(tmp_path):
    from align.core.errors import AlignError
    from align.tasks.problems import load_problems

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "a", "task": "math", "prompt": "1+1", "answer": "2"}) + "\n"
                    + json.dumps({"id": "b", "task": "code", "prompt": "f"}) + "\n")
    with pytest.raises(AlignError, match=r"p.jsonl:2: field 'tests' is missing"):  # file:line of a jsonl
        load_problems(str(path))
    problems, skipped = load_problems(str(path), skip_bad_rows=True)
    assert [p.id for p in problems] == ["a"] and len(skipped) == 1 and "p.jsonl:2" in skipped[0]
