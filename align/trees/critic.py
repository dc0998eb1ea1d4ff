"""The critic: what the actor is told after a wrong answer.

The feedback turn follows the released data: `Out: <observation>\nYour answer is wrong.\n<critique>`.
The observation critic (the offline default) adds no critique; the LLM critic asks a model, given the
reference answer, to locate the error and suggest a fix without revealing the answer.
"""

from __future__ import annotations

import re
from pathlib import Path

from align.errors import AlignError, read_user_text
from align.trees.problems import Problem

DEFAULT_TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "critic.txt"


SLOTS = ("problem", "trajectory", "observation", "reference")
_SLOT = re.compile(r"\{(" + "|".join(SLOTS) + r")\}")


def fill_template(template: str, **values: str) -> str:
    """Each {slot} replaced once, in one pass: other braces (code, JSON, LaTeX) stay as written, and a value
    that itself contains "{reference}" is never filled in again."""
    return _SLOT.sub(lambda m: values[m.group(1)], template)


def feedback_turn(observation: str, critique: str = "") -> str:
    text = f"Out: {observation.strip()}\nYour answer is wrong."
    return f"{text}\n{critique.strip()}" if critique.strip() else text


class ObservationCritic:
    name = "observation"

    async def critique(self, problem: Problem, history: list[dict], action: str, observation: str, seed: int) -> str:
        return ""

    async def aclose(self):
        pass


def reference_of(problem: Problem) -> str:
    if problem.task == "code":
        solution = (problem.extra or {}).get("canonical_solution")
        return solution or f"(tests)\n{problem.tests}"
    return problem.answer or ""


def load_template(template_path: str | None) -> str:
    """The critic's prompt template (ours by default), with the slots it must have."""
    path = Path(template_path) if template_path else DEFAULT_TEMPLATE
    template = read_user_text(path, "critic template")
    for slot in ("{problem}", "{trajectory}", "{observation}"):
        if slot not in template:
            raise AlignError(f"{path}: the critic template lacks the {slot} slot")
    return template


class LLMCritic:
    """A model (any backend) prompted with an editable template: {problem} {trajectory} {observation} {reference}."""

    def __init__(self, backend, template_path: str | None = None):
        self.template = load_template(template_path)
        self.backend = backend
        self.name = f"llm:{backend.name}"

    async def critique(self, problem: Problem, history: list[dict], action: str, observation: str, seed: int) -> str:
        turns = history[1:] + [{"role": "assistant", "content": action}]
        trajectory = "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in turns)
        prompt = fill_template(self.template, problem=problem.instruction, trajectory=trajectory,
                               observation=observation, reference=reference_of(problem))
        (text,) = await self.backend.generate([{"role": "user", "content": prompt}], 1, seed)
        return text

    async def aclose(self):
        await self.backend.aclose()
