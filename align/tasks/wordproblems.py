"""Seeded generators of problems for a small real model: math word problems of one step to several, with
varied templates and distractors, and ordering puzzles (logic). Held out by construction: each problem's
canonical key (its templates and numbers) is hashed, and an eighth of all keys is the held-out split, which
no `train` draw can produce, whatever the seed.

    wordproblems[:N[:SEED[:STEPS[:SPLIT]]]]   STEPS: 1, 2, 1-3 ... (operations per problem); SPLIT: all | train | heldout
    ordering[:N[:SEED[:PEOPLE[:SPLIT]]]]      PEOPLE: 3 to 5 people in a chain of comparisons

Difficulty (docs/real-models.md has the base model's measured pass rates): SmolLM2-135M-Instruct solves
about a third of one-step problems with numbers up to 20 and almost no two-step ones, so `STEPS 1` is where
its trees have correct and wrong answers to pair, and `1-2` keeps some headroom.
"""

from __future__ import annotations

import hashlib
import random

from align.core.errors import AlignError

NAMES = ["Tom", "Anna", "Ben", "Maria", "Sam", "Lucy", "Omar", "Mia", "Leo", "Zoe", "Ravi", "Ella"]
ITEMS = ["apples", "pencils", "marbles", "stickers", "books", "cookies", "stamps", "shells", "cards", "coins"]

# (template, operation): the first step states the start and one change; {n} a name, {i} the items
FIRST = [
    ("{n} has {a} {i}. {n} gets {b} more.", "+"),
    ("{n} has {a} {i} and buys {b} more.", "+"),
    ("There are {a} {i} in a box. {n} puts {b} more {i} in the box.", "+"),
    ("{n} had {a} {i}. A friend gave {n} {b} more.", "+"),
    ("{n} has {a} {i} and gives away {b}.", "-"),
    ("{n} had {a} {i}, then lost {b} of them.", "-"),
    ("There are {a} {i} on the table. {n} takes {b} of them away.", "-"),
    ("{n} picked {a} {i} and ate {b} of them.", "-"),
]
LATER = [
    ("Then {n} buys {b} more.", "+"),
    ("After that, {n} finds {b} more {i}.", "+"),
    ("Later a friend gives {n} {b} {i}.", "+"),
    ("Then {n} gives {b} {i} to a friend.", "-"),
    ("After that, {n} loses {b} of the {i}.", "-"),
    ("Later {n} uses {b} of them.", "-"),
]
QUESTIONS = ["How many {i} does {n} have now?", "How many {i} are there now?", "How many {i} does {n} have left?",
             "What is the number of {i} {n} has at the end?"]
DISTRACTORS = ["{o} has {d} {j}.", "{n}'s friend {o} owns {d} {j}.", "It is {d} degrees outside.",
               "{n} is {d} years old."]
# The instruction before each problem: for a 135 M model the UltraInteract wrappers ("Present your final
# answer as \boxed{}") cost more than they help (the smollm2 notes), so math asks the question alone (the
# verifier takes the last number) and logic asks for the name after "Answer:".
MATH_PREFIX = ""
LOGIC_PREFIX = "Answer with the name after 'Answer:'.\n"
HELDOUT_EIGHTHS = 1
SPLITS = ("all", "train", "heldout")


def _split_of(key: str) -> str:
    return "heldout" if int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 8 < HELDOUT_EIGHTHS else "train"


def _steps_range(steps) -> tuple[int, int]:
    if isinstance(steps, tuple):
        return steps
    text = str(steps)
    low, _, high = text.partition("-")
    try:
        lo, hi = int(low), int(high or low)
    except ValueError:
        raise AlignError(f"problems: STEPS must be a number or a range such as 1-3, got {steps!r}") from None
    if not 1 <= lo <= hi <= 5:
        raise AlignError(f"problems: STEPS must be from 1 to 5, got {steps!r}")
    return lo, hi


def hint_of(start: int, moves: list[str]) -> str:
    """The step critic's critique of a wrong answer: the operations in order, without their results (the
    smollm2 notes: a bare "wrong" fixes none of this model's answers; answer-free steps fix some)."""
    return f"Start from {start}, then " + ", then ".join(moves) + ". Do each step and give the number you get."


def word_problems(n: int = 200, seed: int = 0, steps=(1, 1), split: str = "all", max_number: int = 20) -> list[dict]:
    """`n` distinct word problems, each {id, task, prompt, answer, source, prefix, steps}."""
    if split not in SPLITS:
        raise AlignError(f"problems: SPLIT must be all, train or heldout, got {split!r}")
    lo, hi = _steps_range(steps)
    rng = random.Random(f"wordproblems:{seed}")
    out, seen = [], set()
    for _ in range(n * 200):
        if len(out) >= n:
            break
        k = rng.randint(lo, hi)
        name, other = rng.sample(NAMES, 2)
        items, other_items = rng.sample(ITEMS, 2)
        first = rng.randrange(len(FIRST))
        total = a = rng.randint(2, max_number)
        template, op = FIRST[first]
        b = rng.randint(1, min(max_number, a - 1)) if op == "-" else rng.randint(2, max_number)
        total = a + b if op == "+" else a - b
        parts, key = [template.format(n=name, i=items, a=a, b=b)], [f"F{first}:{a}:{b}"]
        moves = [f"{'add' if op == '+' else 'subtract'} {b}"]
        for _ in range(k - 1):
            later = rng.randrange(len(LATER))
            template, op = LATER[later]
            if op == "-" and total < 2:
                op, template = "+", LATER[0][0]
                later = 0
            c = rng.randint(1, min(max_number, total - 1)) if op == "-" else rng.randint(2, max_number)
            total = total + c if op == "+" else total - c
            parts.append(template.format(n=name, i=items, b=c))
            key.append(f"L{later}:{c}")
            moves.append(f"{'add' if op == '+' else 'subtract'} {c}")
        if "{n}" not in FIRST[first][0].split(".")[0]:  # a box or a table holds the items, not the person
            question = "How many {i} are there now?"
        else:
            question = rng.choice([q for q in QUESTIONS if "left" not in q or op == "-"])
        parts.append(question.format(n=name, i=items))
        if k > 1 or rng.random() < 0.5:  # a sentence with a number that does not count
            d = rng.randrange(len(DISTRACTORS))
            dnum = rng.randint(2, max_number)
            parts.insert(rng.randint(1, len(parts) - 1), DISTRACTORS[d].format(n=name, o=other, d=dnum, j=other_items))
            key.append(f"D{d}:{dnum}")
        canonical = "|".join(key)
        if canonical in seen or (split != "all" and _split_of(canonical) != split):
            continue
        seen.add(canonical)
        out.append({"id": f"wp-{seed}-{len(out)}", "task": "math", "prompt": " ".join(parts), "answer": str(total),
                    "source": f"wordproblems:{lo}-{hi}:{split}", "prefix": MATH_PREFIX, "steps": k,
                    "hint": hint_of(a, moves)})
    if len(out) < n:
        raise AlignError(f"problems: wordproblems could make only {len(out)} distinct {split} problems, not {n}")
    return out


ORDER_WORDS = [("taller", "tallest", "shortest"), ("older", "oldest", "youngest"), ("faster", "fastest", "slowest")]


def ordering_problems(n: int = 200, seed: int = 0, people: int = 3, split: str = "all") -> list[dict]:
    """`n` chains of comparisons ("A is taller than B. B is taller than C. Who is the shortest?"), the
    statements shuffled; answered by a name, one of the listed choices."""
    if split not in SPLITS:
        raise AlignError(f"problems: SPLIT must be all, train or heldout, got {split!r}")
    if not 3 <= people <= 5:
        raise AlignError(f"problems: PEOPLE must be from 3 to 5, got {people}")
    rng = random.Random(f"ordering:{seed}")
    out, seen = [], set()
    for _ in range(n * 200):
        if len(out) >= n:
            break
        chain = rng.sample(NAMES, people)  # chain[0] is the most (tallest ...)
        words = rng.randrange(len(ORDER_WORDS))
        comparative, most, least = ORDER_WORDS[words]
        facts = [f"{chain[i]} is {comparative} than {chain[i + 1]}." for i in range(people - 1)]
        rng.shuffle(facts)
        ask_most = rng.random() < 0.5
        answer = chain[0] if ask_most else chain[-1]
        canonical = f"{','.join(chain)}|{words}|{ask_most}|{'/'.join(facts)}"
        if canonical in seen or (split != "all" and _split_of(canonical) != split):
            continue
        seen.add(canonical)
        choices = sorted(chain)
        prompt = " ".join(facts) + f" Who is the {most if ask_most else least}? Choose from: {', '.join(choices)}."
        out.append({"id": f"ord-{seed}-{len(out)}", "task": "logic", "prompt": prompt, "answer": answer,
                    "choices": choices, "source": f"ordering:{people}:{split}", "prefix": LOGIC_PREFIX})
    if len(out) < n:
        raise AlignError(f"problems: ordering could make only {len(out)} distinct {split} problems, not {n}")
    return out
