"""Literal asserts judged in the verifier's process (align/tasks/literal_tests.py): what is planned, what is
left to the two-process path, and verdicts equal to the tests' own process on HumanEval."""

from __future__ import annotations

import re
import textwrap
import time

import pytest

from align.tasks import literal_tests, sandbox
from align.tasks.literal_tests import Judge, plan
from align.tasks.problems import humaneval_problems
from align.tasks.sandbox import SandboxLimits


def _check(*lines: str) -> str:
    return "def check(candidate):\n" + "".join(f"    {line}\n" for line in lines)


@pytest.mark.parametrize("tests", [
    _check("assert candidate([1, 2], 3) == True"),
    _check("assert candidate(3 * 5 * 7) == True", "assert not candidate(-1)"),
    _check("assert abs(candidate(1.33) - 0.33) < 1e-6, 'close enough'"),
    _check("assert candidate('a') is None", "assert True", "candidate({1, 2})"),
    _check("assert sorted(candidate([3, 1])) == [1, 3]", "assert len(candidate('xy')) in (1, 2)"),
    "METADATA = {'author': 'jt'}\n\n" + _check('"""docstring"""', "assert candidate(k=1) == {'k': 1}"),
])
def test_literal_asserts_are_planned(tests):
    literal = plan(tests, "f")
    assert literal is not None and literal.calls


@pytest.mark.parametrize("tests, prompt", [
    (_check("for x in range(3):", "    assert candidate(x) == x"), ""),  # a loop
    (_check("import math", "assert candidate(1) == 1"), ""),  # an import
    (_check("xs = [1]", "candidate(xs)", "assert xs == [1, 2]"), ""),  # state between statements
    (_check("assert candidate(1) == 1, f'{candidate(1)}'"), ""),  # a message that is code
    (_check("assert candidate(1) or candidate(2)"), ""),  # a call that may not happen
    (_check("assert 0 < candidate(1) < candidate(2)"), ""),  # the same, in a chain
    (_check("assert candidate(1).lower() == 'a'"), ""),  # a method of a result
    (_check("assert candidate(lambda x: x) == 1"), ""),  # a function as an argument
    (_check("assert candidate(*[1, 2]) == 3"), ""),  # unpacking
    (_check("assert helper(candidate(1)) == 1"), ""),  # a helper of the tests
    (_check("assert abs(candidate(1)) == 1"), "def abs(x):\n    return 0\n"),  # the prompt shadows a built-in
    ("def check(len):\n    assert len(1) == 1\n", ""),  # the candidate's name shadows one
    ("def helper():\n    pass\n\n" + _check("assert candidate(1) == 1"), ""),  # more than check()
    (_check("assert candidate(f) == 1"), ""),  # a name that is not a literal
    (_check("assert '%s!' % candidate(1) == 'a!'"), ""),  # formatting, which the judge does not do
    (_check("assert candidate(1) is 'a'"), ""),  # `is` on a string: interning differs by interpreter
    (_check("assert candidate(set('the lazy dog' * 500)) == 9"), ""),  # an argument too costly to build here
    (_check("assert candidate([[0] * 2000] * 2000) == 1"), ""),  # 4M values to encode
    (_check("assert candidate(1)" + " + 0" * 200 + " == 1"), ""),  # nested deeper than the evaluator goes
    (_check("assert round(candidate(2.5)) == 3"), "if True:\n    def round(x):\n        return 3\n"),
    (_check("assert abs(candidate(1)) == 1"), "from math import *\n"),  # a star import may bind anything
    (_check("assert len(candidate(1)) == 1"), "def g():\n    global len\n    len = 0\n"),
])
def test_anything_more_goes_to_the_two_process_path(tests, prompt):
    assert plan(tests, "f", prompt) is None


def _judge(tests: str, replies: list) -> dict:
    judge = Judge(plan(tests, "f"))
    for reply in replies:
        if judge.add(reply):
            break
    return judge.finish(gone=True)


def test_the_judge_decides_at_the_first_failure_and_names_the_line():
    tests = _check("assert candidate(1) == 2, 'one'", "assert candidate(2) == 3")
    verdict = _judge(tests, [["ok", ["i", hex(5)], [None]]])
    assert verdict["passed"] is False and verdict["calls"] == 1
    assert verdict["observation"] == ('Traceback (most recent call last):\n  File "tests.py", line 2, in check\n'
                                      "    assert candidate(1) == 2, 'one'\nAssertionError: one")
    assert _judge(tests, [["ok", ["i", "0x2"], [None]], ["ok", ["i", "0x3"], [None]]])["passed"] is True


@pytest.mark.parametrize("replies, says", [
    ([["ok", ["zz", 1], [None]]], "broke the test protocol"),
    ([["nonsense"]], "broke the test protocol"),
    ([["raise", "ValueError", "no", "Traceback ...\nValueError: no"]], "ValueError: no"),
    ([["unencodable", "an object of type X"]], "CandidateFailure: the candidate returned an object of type X"),
    ([], "exited before the tests finished"),
])
def test_bad_replies_are_failures(replies, says):
    verdict = _judge(_check("assert candidate(1) == 1"), replies)
    assert verdict["passed"] is False and says in verdict["observation"], verdict


def test_the_reply_stream_is_framed_and_bounded():
    tests = _check("assert candidate(1) == 1")
    judge = Judge(plan(tests, "f"))
    assert judge.feed(b"\xff\xff\xff\xff") is True  # a 4 GiB message is refused before it is read
    assert "a message of" in judge.finish(True)["observation"]
    judge = Judge(plan(tests, "f"))
    assert judge.feed(b"\x00\x00\x00\x05[1,") is False  # half a frame: waits
    assert judge.feed(b"2]") is True and "malformed" in judge.finish(True)["observation"]
    assert plan(tests, "f").frames[0].startswith(b"\x00\x00\x00")


@pytest.mark.parametrize("expression, result", [
    ("candidate(1) * 10 ** 9 == 'x'", ["s", "abc"]),  # a string of 3 GB
    ("2 ** candidate(1) == 0", ["i", hex(10 ** 9)]),  # an integer of a billion bits
    ("sorted(candidate(1)) == []", ["s", "\u4e00" * 100_000]),  # an object per character
    ("candidate(1) == {(1,): 1}", ["d", [[["t", [["N"]] * 1000], ["i", "0x1"]]]]),  # a key compared in full
])
def test_what_would_cost_this_process_too_much_is_left_to_the_tests_own_process(expression, result):
    start = time.monotonic()
    judge = Judge(plan(_check(f"assert {expression}"), "f"))
    assert judge.add(["ok", result, [None]]) and judge.undecided and judge.verdict is None
    assert time.monotonic() - start < 1


@pytest.mark.parametrize("tests, code", [
    (_check("assert candidate(1) == 'a' * 2_000_000"), "def f(x):\n    return 'a' * 2_000_000\n"),
    (_check("assert candidate(1) == 2 ** 9000"), "def f(x):\n    return 2 ** 9000\n"),
    (_check("assert candidate(1j) / 2 == 0.5j"), "def f(x):\n    return x\n"),
    # 6 replies echoing 100,000-element arguments: 600,000 values, past the judge's bounds on a plan's and on the
    # replies' values (200,000 each), so the tests' own process decides. (60 such calls took 42-48 s on 2 busy
    # cores, at 4d4b458 as after it: the time is the two processes' own work, not a regression of the judge.)
    (_check(*[f"assert len(candidate([{i}] * 100_000)) == 100_000" for i in range(6)]), "def f(xs):\n    return xs\n"),
])
def test_honest_solutions_pass_past_the_judges_bounds(tests, code):
    assert sandbox.run_tests_isolated(code, tests, "f", limits=SandboxLimits(timeout_s=30, memory_mb=512)).passed


def test_the_candidate_gets_one_call_at_a_time():
    # A round trip: the second call's argument is the first call's expected value. With every call in hand
    # at once, a candidate that cannot reverse a string could answer each call with the other's argument.
    tests = _check("assert candidate('hello world') == 'dlrow olleh'", "assert candidate('dlrow olleh') == 'hello world'")
    code = textwrap.dedent("""
        import os, select, time
        time.sleep(0.2)
        seen = b""
        while select.select([3], [], [], 0)[0]:
            chunk = os.read(3, 1 << 16)
            if not chunk:
                break
            seen += chunk
        os.write(2, repr(seen.count(b"call")).encode())
        raise SystemExit(0)
    """)
    outcome = sandbox.run_tests_isolated(code, tests, "f", limits=SandboxLimits(timeout_s=2))
    assert not outcome.passed and outcome.candidate.stderr == "1"  # only the first call was there to read
    honest = "def f(s):\n    return s[::-1]\n"
    assert sandbox.run_tests_isolated(honest, tests, "f").passed


def test_a_failure_ends_the_run_at_once_even_if_later_calls_would_hang():
    tests = _check("assert candidate(1) == 2", "assert candidate(2) == 3")
    code = "def f(x):\n    if x == 1:\n        return 0\n    while True:\n        pass\n"
    start = time.monotonic()
    outcome = sandbox.run_tests_isolated(code, tests, "f", limits=SandboxLimits(timeout_s=5))
    assert not outcome.passed and outcome.status == "ok" and "line 2" in outcome.observation
    assert time.monotonic() - start < 2


def _normal(observation: str) -> str:
    """Without the position markers (^^^) and module prefixes that only the tests' own traceback has."""
    return re.sub(r"\n *[\^~]+ *(?=\n|$)", "", observation).replace("_harness.", "")


def test_humaneval_verdicts_equal_the_tests_own_process(monkeypatch):
    problems = humaneval_problems()
    planned = [p for p in problems if plan(p.tests, p.entry_point, p.extra["function_prompt"])]
    assert len(planned) >= 150  # of 164: the rest use loops, imports or helpers
    for p in planned[::10]:
        prompt, entry = p.extra["function_prompt"], p.entry_point
        variants = [prompt + p.extra["canonical_solution"], prompt + "    return None\n",
                    prompt + "    raise ValueError('no')\n",
                    prompt + p.extra["canonical_solution"] + textwrap.dedent(f"""
                        _first, _real = [], {entry}
                        def {entry}(*args, **kwargs):  # right once, then the first answer again
                            _first.append(_real(*args, **kwargs))
                            return _first[0]
                    """)]
        for code in variants:
            literal = sandbox.run_tests_isolated(code, p.tests, entry, prompt=prompt)
            with monkeypatch.context() as m:
                m.setattr(literal_tests, "plan", lambda *args: None)
                split = sandbox.run_tests_isolated(code, p.tests, entry, prompt=prompt)
            assert (literal.passed, _normal(literal.observation)) == (split.passed, _normal(split.observation)), p.id
            assert literal.isolation == split.isolation == "process"


def test_a_reply_too_costly_to_judge_here_goes_to_the_tests_own_process(monkeypatch):
    # ints that all hash alike make a set quadratic to build: past MAX_HASHED the split path judges
    calls = []
    real = sandbox._run_tests_split
    monkeypatch.setattr(sandbox, "_run_tests_split", lambda *a, **k: calls.append(a) or real(*a, **k))
    tests = _check("assert candidate(1) == 1")
    many = "def f(x):\n    return x if x != 1 else set(range(5000)) and 1\n"  # honest: a plain 1
    assert sandbox.run_tests_isolated(many, tests, "f").passed and not calls
    colliding = f"def f(x):\n    return {{(2 ** 61 - 1) * i for i in range({literal_tests.MAX_HASHED + 1})}}\n"
    start = time.monotonic()
    outcome = sandbox.run_tests_isolated(colliding, tests, "f")
    assert not outcome.passed and len(calls) == 1 and time.monotonic() - start < 15
    assert "AssertionError" in outcome.observation
    judge = Judge(plan(_check("assert len(set(candidate(1))) == 1"), "f"))
    assert judge.add(["ok", ["l", [["i", hex(i)] for i in range(literal_tests.MAX_HASHED + 1)]], [None]])
    assert judge.undecided and judge.verdict is None


def test_what_a_passing_candidate_prints_is_its_observation_on_both_paths(monkeypatch):
    tests, code = _check("assert candidate(1) == 2"), "def f(x):\n    print('debug', x)\n    return x + 1\n"
    literal = sandbox.run_tests_isolated(code, tests, "f")
    monkeypatch.setattr(literal_tests, "plan", lambda *args: None)
    split = sandbox.run_tests_isolated(code, tests, "f")
    assert literal.passed and split.passed and literal.observation == split.observation == "debug 1"


def test_sum_with_a_list_start_and_sets_of_tuples_are_not_judged_here():
    assert plan(_check("assert sum(candidate(1), []) == []"), "f") is None  # quadratic list concatenation
    judge = Judge(plan(_check("assert len(set(candidate(1))) == 1"), "f"))
    assert judge.add(["ok", ["l", [["t", [["N"]] * 3]] * 10], [None]]) and judge.undecided
