"""The critic: what the actor is told after a wrong answer.

The feedback turn follows the released data: `Out: <observation>\nYour answer is wrong.\n<critique>`.
The observation critic (the offline default) adds no critique; the step critic (offline, for problems
with a step-by-step reference such as the built-in addition) names the first wrong step and why, and for
the word problems gives their steps without results ("Start from 20, then subtract 6. ..."); the LLM
critic asks a model, given the reference answer, to locate the error and suggest a fix without revealing
the answer.
"""

from __future__ import annotations

import re
from pathlib import Path

from align.core.errors import AlignError, read_user_text
from align.tasks.problems import Problem

DEFAULT_TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "critic.txt"


SLOTS = ("problem", "trajectory", "observation", "reference")
_SLOT = re.compile(r"\{(" + "|".join(SLOTS) + r")\}")


def fill_template(template: str, **values: str) -> str:
    """Each {slot} replaced once, in one pass: other braces (code, JSON, LaTeX) stay as written, and a value
    that itself contains "{reference}" is never filled in again."""
    return _SLOT.sub(lambda m: values[m.group(1)], template)


def opening(instruction: str, system_prompt: str | None = None) -> list[dict]:
    """A problem's first messages: the recipe's system prompt, if it sets one, then the problem. The model's
    chat template places the system message as it does (docs/chat-templates.md)."""
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": instruction}]


def feedback_turn(observation: str, critique: str = "") -> str:
    text = f"Out: {observation.strip()}\nYour answer is wrong."
    return f"{text}\n{critique.strip()}" if critique.strip() else text


class ObservationCritic:
    name = "observation"

    async def critique(self, problem: Problem, history: list[dict], action: str, observation: str, seed: int) -> str:
        return ""

    async def aclose(self):
        pass


_STEP = re.compile(r"^\s*(\d)\+(\d)(?:\+(\d))?=(\d+)\s*$")


def step_critique(problem: Problem, action: str) -> str:
    """For a problem with a step-by-step reference solution (the built-in addition): what the paper's
    critic gives, the first wrong step and why, without the final answer. Rule-based: the action's steps are
    held to the reference's, line by line."""
    reference = (problem.extra or {}).get("solution")
    if not reference:
        return (problem.extra or {}).get("hint", "")
    ref_steps = [_STEP.match(line) for line in reference.splitlines() if _STEP.match(line)]
    got_lines = [line for line in action.splitlines() if line.strip() and not line.startswith("Answer")]
    for k, ref in enumerate(ref_steps, 1):
        place = ("units", "tens", "hundreds", "thousands")[k - 1] if k <= 4 else f"column {k}"
        if k > len(got_lines):
            return f"Step {k} is missing: add the {place} digits too."
        got = _STEP.match(got_lines[k - 1])
        if got is None:
            return f"Step {k} is not a column sum like 7+8=15: add the {place} digits and write the sum."
        x, y, c = ref.group(1), ref.group(2), ref.group(3) or "0"
        gx, gy, gc = got.group(1), got.group(2), got.group(3) or "0"
        if {gx, gy} != {x, y}:
            return f"Step {k} adds the wrong digits: the {place} digits are {x} and {y}."
        if gc != c:
            return (f"Step {k} carries {gc}, but the step before it carries {c}." if k > 1
                    else "Step 1 adds a carry, but no step comes before it.")
        if got.group(4) != ref.group(4):
            return f"Step {k} is wrong: {got_lines[k - 1].split('=')[0].strip()} is not {got.group(4)}."
    if len(got_lines) > len(ref_steps):
        return f"There are more steps than columns: after step {len(ref_steps)} only the last carry remains."
    return "The steps are right, but the answer does not follow from them: read the digits off the steps."


class StepCritic:
    """The offline critic for the built-in tasks: the observation and the first wrong step (see
    step_critique). Problems without a step-by-step reference get the observation alone."""

    name = "steps"

    async def critique(self, problem: Problem, history: list[dict], action: str, observation: str, seed: int) -> str:
        return step_critique(problem, action)

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
        turns = [m for m in history if m["role"] != "system"][1:] + [{"role": "assistant", "content": action}]
        trajectory = "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in turns)
        prompt = fill_template(self.template, problem=problem.instruction, trajectory=trajectory,
                               observation=observation, reference=reference_of(problem))
        (text,) = await self.backend.generate([{"role": "user", "content": prompt}], 1, seed)
        return text

    async def aclose(self):
        await self.backend.aclose()
