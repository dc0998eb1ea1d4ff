"""The environment: decide whether an action is correct and say what it observed.

math: the final answer against the ground truth (exact numbers first, then Math-Verify with the gold
answer first, under our own timeout in a worker process, since Math-Verify's signal-based timeouts only
work on the main thread). logic: normalised exact match (a choice letter or its text). code: the code
block is tested in the sandbox, its tests in a process of their own (see verify_code); passing means
the tests' check() ran to the end on the candidate's answers, so an early exit fails.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import multiprocessing
import re
import threading
from dataclasses import dataclass
from fractions import Fraction

from align.tasks.problems import Problem
from align.tasks.sandbox import SandboxLimits, run_tests_isolated


@dataclass
class Verdict:
    correct: bool
    observation: str  # fed back to the actor on a wrong answer: stdout / traceback / the wrong answer
    extracted: str | None = None
    status: str = "checked"
    isolation: str = "none"  # code: process (tests apart from the candidate) or in-process (the tests could not be split)


# ---------------------------------------------------------------- answers
def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


def final_answer(text: str) -> str | None:
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    match = re.search(r"Answer:\s*(.+)", text, flags=re.S)
    if match:
        lines = [ln.strip() for ln in match.group(1).strip().splitlines() if ln.strip()]
        if lines:
            return lines[0]
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?", text)
    return numbers[-1] if numbers else None


_GROUPED = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")


_EXPONENT = re.compile(r"[eE]([-+]?\d+)")
MAX_DIGITS = 400  # an answer longer than this is not compared as a number (Fraction("1e999999999") never ends)


def _as_number(text: str) -> Fraction | None:
    t = text.strip().strip("$").replace("\\!", "").replace(" ", "")
    if len(t) > MAX_DIGITS or any(abs(int(e)) > MAX_DIGITS for e in _EXPONENT.findall(t[:MAX_DIGITS])):
        return None
    if "," in t:
        if not _GROUPED.fullmatch(t):
            return None  # "1,2" is a pair (or a typo), never twelve: commas only as thousands separators
        t = t.replace(",", "")
    t = re.sub(r"^\\(?:d?frac)\{(-?\d+)\}\{(\d+)\}$", r"\1/\2", t)
    try:
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def _math_verify_worker(gold: str, pred: str) -> bool:
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    from math_verify import parse, verify

    wrap = lambda s: s if "$" in s or "\\boxed" in s else f"${s}$"  # noqa: E731
    return bool(verify(parse(wrap(gold), parsing_timeout=None), parse(wrap(pred), parsing_timeout=None),
                       timeout_seconds=None))


class _MathVerifyPool:
    """One worker process for Math-Verify, replaced when a call overruns its timeout."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pool: cf.ProcessPoolExecutor | None = None

    def equal(self, gold: str, pred: str, timeout_s: float) -> bool | None:
        with self._lock:
            if self._pool is None:
                self._pool = cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            future = self._pool.submit(_math_verify_worker, gold, pred)
            try:
                return future.result(timeout=timeout_s)
            except cf.TimeoutError:
                self._stop(wait=False)
                return None
            except Exception:  # a parse failure inside Math-Verify: not equal
                return False

    def _stop(self, wait: bool) -> None:
        """The worker killed (a call still running is not waited for) and the pool dropped; under the lock."""
        for proc in list((getattr(self._pool, "_processes", None) or {}).values()):
            proc.kill()
        self._pool.shutdown(wait=wait, cancel_futures=True)
        self._pool = None

    def close(self) -> None:
        """The worker stopped before the interpreter tears its modules down: an executor collected during that
        teardown prints an `Exception ignored in ... weakref_cb` traceback at exit."""
        with self._lock:
            if self._pool is not None:
                self._stop(wait=True)


_MATH_VERIFY = _MathVerifyPool()
atexit.register(_MATH_VERIFY.close)


def verify_math(problem: Problem, response: str, timeout_s: float = 5.0) -> Verdict:
    pred = final_answer(response)
    if pred is None:
        return Verdict(False, "No final answer found.", None)
    gold = problem.answer or ""
    a, b = _as_number(gold), _as_number(pred)
    if a is not None and b is not None:
        return Verdict(a == b, pred, pred)
    if pred.strip() == gold.strip():
        return Verdict(True, pred, pred)
    same = _MATH_VERIFY.equal(gold, pred, timeout_s)
    if same is None:
        return Verdict(False, pred, pred, status="verifier-timeout")
    return Verdict(same, pred, pred)


def _normalise(text: str) -> str:
    text = text.lower().strip()
    text = re.sub(r"^(the answer is|answer:)\s*", "", text)
    return re.sub(r"[^a-z0-9]+", " ", text).strip()


def verify_logic(problem: Problem, response: str) -> Verdict:
    pred = final_answer(response)
    if pred is None:
        return Verdict(False, "No final answer found.", None)
    gold = _normalise(problem.answer or "")
    got = _normalise(pred)
    if problem.choices:
        letters = [chr(ord("a") + i) for i in range(len(problem.choices))]
        texts = [_normalise(c) for c in problem.choices]

        def choice_index(s: str) -> int | None:
            if s in texts:
                return texts.index(s)
            first = s.split(" ")[0] if s else ""
            return letters.index(first) if first in letters else None

        gold_i, got_i = choice_index(gold), choice_index(got)
        return Verdict(gold_i is not None and gold_i == got_i, pred, pred)
    return Verdict(got == gold, pred, pred)


# ---------------------------------------------------------------- code
_FENCE = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)```", re.S)


def extract_code(response: str) -> str | None:
    blocks = _FENCE.findall(response)
    if blocks:
        return max(blocks[-3:], key=len) if len(blocks) > 1 and "def " not in blocks[-1] else blocks[-1]
    if re.search(r"^[ \t]*(def|import|from|class)\s", response, re.M):  # (no newline in [ \t]*: linear time)
        return response
    return None


def verify_code(problem: Problem, response: str, limits: SandboxLimits | None = None) -> Verdict:
    """The problem's tests against the response's code. The tests run in a sandboxed process of their own
    and call the candidate, in a second one, through a channel that carries built-in values only, so the
    verdict is decided where the candidate's code cannot reach (align/tasks/_harness.py)."""
    code = extract_code(response)
    if code is None:
        return Verdict(False, "No code block found.", None)
    prompt = problem.extra.get("function_prompt", "") if problem.extra else ""
    if prompt and f"def {problem.entry_point}" not in code:
        code = prompt + code  # the answer is a function body continuing the prompt (HumanEval style)
    outcome = run_tests_isolated(code, problem.tests, problem.entry_point, prompt=prompt, limits=limits)
    return Verdict(outcome.passed, outcome.observation, code, status=outcome.status, isolation=outcome.isolation)


def verify(problem: Problem, response: str, limits: SandboxLimits | None = None) -> Verdict:
    if problem.task == "math":
        return verify_math(problem, response)
    if problem.task == "logic":
        return verify_logic(problem, response)
    return verify_code(problem, response, limits)
