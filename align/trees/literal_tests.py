"""Tests made only of literal asserts, judged in this process: the candidate runs alone in the sandbox.

Most unit tests of code problems (HumanEval's among them) are a `check(candidate)` of lines such as
`assert candidate([1, 2], 3) == True, "message"`. For those, the verifier needs no second sandboxed
process: it reads the tests with `ast`, sends only the calls' arguments into the sandbox (the expected
values never enter it), gets the results back as exact built-in values (`_harness.encode` / `decode`), and
evaluates each assert here with a small evaluator that knows literals, the candidate's results, operators
and a few pure built-in functions, nothing else. Any test that does more (loops, imports, helpers, names of
the prompt's, short-circuits around a call) is not planned here and goes to the two-process path.

The evaluator never runs code of the candidate's or of the tests' and only ever meets built-in values;
the operations that could be made to take unbounded time or memory (`*`, `**`, `%`) are bounded.
"""

from __future__ import annotations

import ast
import functools
import json
import struct
import threading
import warnings
from dataclasses import dataclass, field

from align.trees import _harness

# Pure functions of built-in values that asserts commonly wrap results in.
_FUNCTIONS = {"abs": abs, "len": len, "round": round, "sorted": sorted, "set": set, "tuple": tuple,
              "list": list, "sum": sum, "min": min, "max": max, "all": all, "any": any, "bool": bool,
              "int": int, "float": float, "str": str, "frozenset": frozenset}
_MAX_ELEMENTS = 1 << 20  # a sequence an operator may build
_MAX_BITS = 1 << 14  # an integer an operator may build
_MAX_CALLS = 10_000
# Elements of sets and dicts the judge builds from one reply. Hashes of ints, floats and tuples can be made to
# collide, which makes building a set quadratic: past this, the verdict is left to the tests' own process.
MAX_HASHED = 2_000


class NotLiteral(Exception):
    """The tests do something this evaluator does not do: use the two-process path."""


class Undecided(Exception):
    """A reply too costly to judge here (see MAX_HASHED): the two-process path decides instead."""


class _Result:
    """Placeholder for the value of the candidate's call number `index`."""

    def __init__(self, index: int):
        self.index = index


@dataclass
class _Assert:
    test: ast.expr
    lineno: int
    line: str
    message: object
    bare: bool = False  # a call as a statement, not an assert: it passes unless it raises
    calls: list[int] = field(default_factory=list)  # indices of the calls it needs, in order


@dataclass
class LiteralPlan:
    calls: list[tuple[list, dict]]  # (args, kwargs) of each call of the candidate, in the tests' order
    asserts: list[_Assert]


_parse_lock = threading.Lock()  # (catch_warnings swaps process-wide state)


@functools.lru_cache(maxsize=4096)
def plan(tests: str, entry_point: str, prompt: str = "") -> LiteralPlan | None:
    """The calls and asserts of `tests`, or None when they are not only literal asserts. (Cached: a
    plan is never changed after it is made; each verification judges with a `Judge` of its own.)"""
    try:
        with _parse_lock, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tests' own SyntaxWarnings are not ours to print
            return _Planner(tests, entry_point, prompt).build()
    except (NotLiteral, SyntaxError, ValueError, TypeError, RecursionError, MemoryError, OverflowError,
            ArithmeticError, _harness.Unencodable):
        return None


class _Planner:
    def __init__(self, tests: str, entry_point: str, prompt: str):
        self.tests, self.entry_point = tests, entry_point
        self.lines = tests.splitlines()
        self.shadowed = _top_level_names(prompt) if prompt else set()
        self.calls: list[tuple[list, dict]] = []

    def build(self) -> LiteralPlan:
        module = ast.parse(self.tests)
        checks = []
        for node in module.body:
            if isinstance(node, ast.FunctionDef) and node.name == "check":
                checks.append(node)
            elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                continue  # a docstring
            elif isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
                ast.literal_eval(node.value)  # METADATA = {...}
                self.shadowed.update(t.id for t in node.targets)
            else:
                raise NotLiteral(type(node).__name__)
        if len(checks) != 1:
            raise NotLiteral("not one check()")
        check = checks[0]
        a = check.args
        if (a.posonlyargs or a.kwonlyargs or a.vararg or a.kwarg or a.defaults or len(a.args) != 1
                or check.decorator_list):
            raise NotLiteral("check's signature")
        self.names = {a.args[0].arg, self.entry_point}
        if self.names & set(_FUNCTIONS):
            raise NotLiteral("a name shadows another")
        asserts = []
        for stmt in check.body:
            if isinstance(stmt, ast.Pass) or (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)):
                continue
            if isinstance(stmt, ast.Assert):
                message = self._constant(stmt.msg) if stmt.msg is not None else None
                test, bare = stmt.test, False
            elif isinstance(stmt, ast.Expr) and self._is_call(stmt.value):
                message, test, bare = None, stmt.value, True
            else:
                raise NotLiteral(type(stmt).__name__)
            entry = _Assert(test, stmt.lineno, self._line(stmt), message, bare)
            self._collect(test, entry, lazy=False)
            if len(self.calls) > _MAX_CALLS:
                raise NotLiteral("too many calls")
            asserts.append(entry)
        return LiteralPlan(self.calls, asserts)

    def _line(self, stmt) -> str:
        return self.lines[stmt.lineno - 1].strip() if 0 < stmt.lineno <= len(self.lines) else ""

    def _constant(self, node):
        if isinstance(node, ast.Constant):
            return node.value
        raise NotLiteral("a message that is not a constant")

    def _is_call(self, node) -> bool:
        return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in self.names

    def _collect(self, node, entry: _Assert, lazy: bool) -> None:
        """Check every node is one the evaluator knows; plan the candidate's calls in evaluation order.
        `lazy`: the node may not be evaluated (a short-circuit): no call may be inside it."""
        if self._is_call(node):
            if lazy:
                raise NotLiteral("a call that may not happen")
            if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
                raise NotLiteral("unpacked arguments")
            args = [evaluate(a, [], self._allowed) for a in node.args]
            kwargs = {k.arg: evaluate(k.value, [], self._allowed) for k in node.keywords}
            _harness.encode([args, kwargs])  # must cross as built-in values
            entry.calls.append(len(self.calls))
            node._align_call = len(self.calls)
            self.calls.append((args, kwargs))
            return
        if isinstance(node, ast.Constant):
            return
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            for e in node.elts:
                if isinstance(e, ast.Starred):
                    raise NotLiteral("starred")
                self._collect(e, entry, lazy)
            return
        if isinstance(node, ast.Dict):
            if any(k is None for k in node.keys):
                raise NotLiteral("dict unpacking")
            for k, v in zip(node.keys, node.values):
                self._collect(k, entry, lazy)
                self._collect(v, entry, lazy)
            return
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub, ast.UAdd)):
            self._collect(node.operand, entry, lazy)
            return
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            if isinstance(node.op, ast.Mod) and not all(isinstance(side, ast.Constant) and type(side.value) in
                                                        (int, float) for side in (node.left, node.right)):
                raise NotLiteral("% on what may be a string (formatting)")
            self._collect(node.left, entry, lazy)
            self._collect(node.right, entry, lazy)
            return
        if isinstance(node, ast.BoolOp):
            self._collect(node.values[0], entry, lazy)
            for value in node.values[1:]:
                self._collect(value, entry, True)
            return
        if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
            self._collect(node.left, entry, lazy)
            self._collect(node.comparators[0], entry, lazy)
            for value in node.comparators[1:]:  # a chain stops at its first false link
                self._collect(value, entry, True)
            return
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
                and node.func.id not in self.shadowed and not node.keywords):
            for a in node.args:
                if isinstance(a, ast.Starred):
                    raise NotLiteral("starred")
                self._collect(a, entry, lazy)
            return
        raise NotLiteral(type(node).__name__)

    def _allowed(self, name: str) -> bool:
        return name not in self.shadowed


def _top_level_names(source: str) -> set[str]:
    try:
        module = ast.parse(source)
    except (SyntaxError, ValueError):
        return set(_FUNCTIONS)  # unreadable: assume it shadows everything
    names = set()
    for node in module.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        else:
            names.update(n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store))
    return names


def _hashed_elements(tree) -> int:
    """How many set / frozenset / dict elements an encoded value holds (a walk of the JSON, not decoded)."""
    count, stack = 0, [tree]
    while stack:
        node = stack.pop()
        if type(node) is list and len(node) == 2 and type(node[0]) is str and type(node[1]) is list:
            if node[0] in ("S", "F", "d"):
                count += len(node[1])
                if count > MAX_HASHED:
                    return count
            if node[0] == "d":
                stack.extend(x for pair in node[1] if type(pair) is list for x in pair)
            elif node[0] in ("l", "t", "S", "F"):
                stack.extend(node[1])
    return count


def _bounded_hashing(function):
    def apply(*args):
        if args and type(args[0]) in (list, tuple, set, frozenset, dict, str, bytes) and len(args[0]) > MAX_HASHED:
            raise Undecided("too many elements to hash")
        return function(*args)
    return apply


def _bounded_mult(a, b):
    for x, y in ((a, b), (b, a)):
        if type(x) in (str, bytes, list, tuple) and type(y) in (int, bool):
            if len(x) * max(y, 0) > _MAX_ELEMENTS:
                raise NotLiteral("a sequence too long")
            return x * y
    if type(a) in (int, bool) and type(b) in (int, bool):
        if abs(a).bit_length() + abs(b).bit_length() > _MAX_BITS:
            raise OverflowError("an integer too large")
        return a * b
    if type(a) in (int, float, bool, complex) and type(b) in (int, float, bool, complex):
        return a * b
    raise TypeError(f"unsupported operand type(s) for *: '{type(a).__name__}' and '{type(b).__name__}'")


def _bounded_pow(a, b):
    if type(a) in (int, bool) and type(b) in (int, bool) and b > 0:
        if abs(a).bit_length() * b > _MAX_BITS:
            raise OverflowError("an integer too large")
    elif not (type(a) in (int, float, bool) and type(b) in (int, float, bool)):
        raise TypeError("unsupported operand type(s) for **")
    return a ** b


def _numbers_only(op):
    def apply(a, b):
        if type(a) not in (int, float, bool) or type(b) not in (int, float, bool):
            raise TypeError("unsupported operand types")
        return op(a, b)
    return apply


_FUNCTIONS.update(set=_bounded_hashing(set), frozenset=_bounded_hashing(frozenset))

_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: _bounded_mult,
           ast.Div: _numbers_only(lambda a, b: a / b), ast.FloorDiv: _numbers_only(lambda a, b: a // b),
           ast.Mod: _numbers_only(lambda a, b: a % b), ast.Pow: _bounded_pow}
_COMPARE = {ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b, ast.Lt: lambda a, b: a < b,
            ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b,
            ast.Is: lambda a, b: a is b, ast.IsNot: lambda a, b: a is not b, ast.In: lambda a, b: a in b,
            ast.NotIn: lambda a, b: a not in b}


def evaluate(node, results: list, allowed=lambda name: True):
    """The value of `node`, with the candidate's calls taken from `results` (decoded built-in values)."""
    call = getattr(node, "_align_call", None)
    if call is not None:
        value = results[call]
        if isinstance(value, BaseException):
            raise value
        return value
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.List):
        return [evaluate(e, results, allowed) for e in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(evaluate(e, results, allowed) for e in node.elts)
    if isinstance(node, ast.Set):
        return {evaluate(e, results, allowed) for e in node.elts}
    if isinstance(node, ast.Dict):
        return {evaluate(k, results, allowed): evaluate(v, results, allowed) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.UnaryOp):
        value = evaluate(node.operand, results, allowed)
        if isinstance(node.op, ast.Not):
            return not value
        if type(value) not in (int, float, bool, complex):
            raise TypeError(f"bad operand type for unary operator: '{type(value).__name__}'")
        return -value if isinstance(node.op, ast.USub) else +value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](evaluate(node.left, results, allowed), evaluate(node.right, results, allowed))
    if isinstance(node, ast.BoolOp):
        value = None
        for operand in node.values:
            value = evaluate(operand, results, allowed)
            if (not value) if isinstance(node.op, ast.And) else value:
                return value
        return value
    if isinstance(node, ast.Compare):
        left = evaluate(node.left, results, allowed)
        for op, right_node in zip(node.ops, node.comparators):
            right = evaluate(right_node, results, allowed)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
            and allowed(node.func.id) and not node.keywords):
        args = [evaluate(a, results, allowed) for a in node.args]
        if node.func.id in ("list", "tuple", "set", "frozenset", "sorted", "sum", "min", "max", "all", "any") \
                and args and type(args[0]) not in (list, tuple, set, frozenset, dict, str, bytes):
            raise TypeError(f"'{type(args[0]).__name__}' object is not iterable")
        return _FUNCTIONS[node.func.id](*args)
    raise NotLiteral(type(node).__name__)


MAX_REPLIES_BYTES = 64 << 20  # all the replies of one run together


def calls_file(literal: LiteralPlan) -> bytes:
    """The candidate side's input: one `call` message per call, framed as `_harness.send` frames them."""
    frames = []
    for args, kwargs in literal.calls:
        data = json.dumps(["call", _harness.encode(list(args)), _harness.encode(dict(kwargs))],
                          separators=(",", ":")).encode("utf-8", "surrogatepass")
        frames.append(struct.pack(">I", len(data)) + data)
    return b"".join(frames)


class Judge:
    """Takes the candidate's replies in order and decides the verdict as soon as it can."""

    def __init__(self, literal: LiteralPlan):
        self.plan = literal
        self.results: list = []
        self.next_assert = 0
        self.verdict: dict | None = None
        self.undecided = False  # a reply this process should not judge: ask the tests' own process
        self._buffer = bytearray()
        self._received = 0
        if not literal.calls:
            self._advance()

    def feed(self, data: bytes) -> bool:
        """Bytes of the candidate's reply stream; True once the verdict is decided."""
        if self.verdict is not None or self.undecided:
            return True
        self._received += len(data)
        if self._received > MAX_REPLIES_BYTES:
            return self._fail("The program broke the test protocol (more than %d MiB of replies)."
                              % (MAX_REPLIES_BYTES >> 20))
        self._buffer += data
        while len(self._buffer) >= 4:
            (size,) = struct.unpack(">I", self._buffer[:4])
            if size > _harness.MAX_MESSAGE:
                return self._fail("The program broke the test protocol (a message of %d bytes)." % size)
            if len(self._buffer) < 4 + size:
                break
            raw = bytes(self._buffer[4:4 + size])
            del self._buffer[:4 + size]
            try:
                reply = json.loads(raw.decode("utf-8", "surrogatepass"))
            except (ValueError, RecursionError):
                return self._fail("The program broke the test protocol (not JSON).")
            if self.add(reply):
                return True
        return False

    def add(self, reply) -> bool:
        """One reply of the candidate's (as `_harness.serve` sends it); True once the verdict is decided."""
        if self.verdict is not None or self.undecided:
            return True
        if len(self.results) >= len(self.plan.calls):
            return self._fail("The program broke the test protocol (a reply to no call).")
        if type(reply) is not list or not reply or type(reply[0]) is not str:
            return self._fail("The program broke the test protocol (a malformed reply).")
        kind = reply[0]
        if kind == "ok" and len(reply) == 3:
            if _hashed_elements(reply[1]) > MAX_HASHED:
                self.undecided = True
                return True
            try:
                self.results.append(_harness.decode(reply[1]))
            except _harness.ProtocolError as err:
                return self._fail(f"The program broke the test protocol ({err}).")
        elif kind == "raise" and len(reply) == 4 and all(type(x) is str for x in reply[1:]):
            self.results.append(_Raised(reply[1], reply[2], reply[3]))
        elif kind == "unencodable" and len(reply) == 2 and type(reply[1]) is str:
            self.results.append(_Raised("CandidateFailure", f"the candidate returned {reply[1][:200]}, "
                                        "not a built-in value", ""))
        elif kind == "error" and len(reply) == 2:
            return self._fail("The program broke the test protocol (it could not read a call).")
        else:
            return self._fail("The program broke the test protocol (a malformed reply).")
        return self._advance()

    def _advance(self) -> bool:
        asserts = self.plan.asserts
        while self.next_assert < len(asserts):
            entry = asserts[self.next_assert]
            if entry.calls and entry.calls[-1] >= len(self.results):
                return False  # waits for more replies
            try:
                held = evaluate(entry.test, self.results)
            except Undecided:
                self.undecided = True
                return True
            except _Raised as raised:  # the candidate's call raised: its own traceback, as the tests show it
                return self._fail(raised.traceback or self._traceback(entry, f"{raised.name}: {raised.message}"))
            except (TypeError, ValueError, ArithmeticError, RecursionError, MemoryError, NotLiteral, KeyError,
                    IndexError) as err:
                return self._fail(self._traceback(entry, f"{type(err).__name__}: {err}"))
            if not held and not entry.bare:
                message = "AssertionError" + (f": {entry.message}" if entry.message is not None else "")
                return self._fail(self._traceback(entry, message))
            self.next_assert += 1
        self.verdict = {"passed": True, "split": True, "calls": len(self.plan.calls)}
        return True

    def _traceback(self, entry: _Assert, last: str) -> str:
        return (f'Traceback (most recent call last):\n  File "{_harness.TESTS_FILE}", line {entry.lineno}, in check\n'
                f"    {entry.line}\n{last}")

    def _fail(self, observation: str) -> bool:
        self.verdict = {"passed": False, "split": True, "calls": len(self.results),
                        "observation": observation[:_harness.MAX_OBSERVATION]}
        return True

    def finish(self, gone: bool) -> dict:
        """The verdict when the replies stopped (the program exited, or ran out of time)."""
        if self.verdict is None:
            self.verdict = {"passed": False, "split": True, "calls": len(self.results), "gone": gone,
                            "observation": "The program exited before the tests finished."}
        return self.verdict


class _Raised(Exception):
    """The candidate's call raised: name, message and its own traceback text."""

    def __init__(self, name: str, message: str, traceback: str):
        super().__init__(message)
        self.name, self.message, self.traceback = name, message, traceback

