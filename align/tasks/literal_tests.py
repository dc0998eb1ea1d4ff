"""Tests made only of literal asserts, judged in this process: the candidate runs alone in the sandbox.

Most unit tests of code problems (HumanEval's among them) are a `check(candidate)` of lines such as
`assert candidate([1, 2], 3) == True, "message"`. For those, the verifier needs no second sandboxed
process: it reads the tests with `ast`, sends the candidate one call at a time (arguments only: the
expected values never enter the sandbox; the next call only once the asserts before it have held, as the
tests themselves would), gets each result back as exact built-in values (`_harness.encode` / `decode`),
and evaluates each assert here with a small evaluator that knows literals, the candidate's results,
operators and a few pure built-in functions, nothing else. Tests that do more (loops, imports, helpers,
names of the prompt's, short-circuits around a call) are not planned here and go to the two-process path.

The evaluator never runs code of the candidate's or of the tests' and only ever meets built-in values.
What could make this process spend unbounded time or memory on a reply is bounded, and a reply past a
bound is not judged here (`Undecided`): the two-process path, where the sandbox's limits hold, decides.
"""

from __future__ import annotations

import ast
import functools
import threading
import warnings
from dataclasses import dataclass, field

from align.tasks import _harness

# Pure functions of built-in values that asserts commonly wrap results in.
_FUNCTIONS = {"abs": abs, "len": len, "round": round, "sorted": sorted, "set": set, "tuple": tuple,
              "list": list, "sum": sum, "min": min, "max": max, "all": all, "any": any, "bool": bool,
              "int": int, "float": float, "str": str, "frozenset": frozenset}
_EXPANDING = {"list", "tuple", "set", "frozenset", "sorted"}  # functions that build one object per element
_MAX_ELEMENTS = 1 << 20  # a sequence an operator may build
_MAX_BITS = 1 << 14  # an integer an operator may build
_MAX_CALLS = 10_000
_MAX_DEPTH = 60  # of an assert's expression (the evaluator recurses over it)
_MAX_PLAN_VALUES = 200_000  # values in all the calls' arguments together
_MAX_CALL_BYTES = 1 << 20  # one encoded call
_CACHED_PLAN_BYTES = 64 << 10  # plans whose calls encode to more are made again, not kept
# What one run's replies may cost this process; past any of these the reply is left to the two-process path.
MAX_REPLIES_BYTES = 4 << 20  # all the replies together
MAX_REPLY_VALUES = 200_000  # values in all the replies together
# Elements of sets and dicts built from the replies, all together. Hashes of ints and floats can be made to
# collide, which makes building a set quadratic; a set or dict key that is not a scalar (a tuple of a
# thousand items, each compared in full on a collision) is not judged here at all.
MAX_HASHED = 2_000
_SCALARS = ("N", "b", "i", "f", "s", "y", "c")


class NotLiteral(Exception):
    """The tests do something this evaluator does not do: use the two-process path."""


class Undecided(Exception):
    """A reply or an operation too costly to judge here: the two-process path decides instead."""


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
    frames: list[bytes] = field(default_factory=list)  # each call as `_harness.receive` reads it


_parse_lock = threading.Lock()  # (catch_warnings swaps process-wide state)
_PLANNING_ERRORS = (NotLiteral, Undecided, SyntaxError, ValueError, TypeError, RecursionError, MemoryError,
                    OverflowError, ArithmeticError, _harness.Unencodable)


def plan(tests: str, entry_point: str, prompt: str = "") -> LiteralPlan | None:
    """The calls and asserts of `tests`, or None when they are not only literal asserts. Plans are kept
    (never changed after they are made; each verification judges with a `Judge` of its own) unless big.
    The sandbox uses a plan only where its interpreter is the same Python version as align's
    (`sandbox.sandbox_interpreter_matches`)."""
    cached = _cached_plan(tests, entry_point, prompt)
    return _plan(tests, entry_point, prompt) if cached is False else cached


@functools.lru_cache(maxsize=1024)
def _cached_plan(tests: str, entry_point: str, prompt: str) -> LiteralPlan | bool | None:
    made = _plan(tests, entry_point, prompt)
    if made is not None and sum(map(len, made.frames)) > _CACHED_PLAN_BYTES:
        return False  # (not kept: made again for each verification)
    return made


def _plan(tests: str, entry_point: str, prompt: str) -> LiteralPlan | None:
    try:
        with _parse_lock, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tests' own SyntaxWarnings are not ours to print
            return _Planner(tests, entry_point, prompt).build()
    except _PLANNING_ERRORS:
        return None


class _Planner:
    def __init__(self, tests: str, entry_point: str, prompt: str):
        self.tests, self.entry_point = tests, entry_point
        self.lines = tests.splitlines()
        self.shadowed = _bound_names(prompt) if prompt else set()
        self.calls: list[tuple[list, dict]] = []
        self.values = 0

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
            if _depth(test) > _MAX_DEPTH:
                raise NotLiteral("an expression nested too deeply")
            entry = _Assert(test, stmt.lineno, self._line(stmt), message, bare)
            self._collect(test, entry, lazy=False)
            if len(self.calls) > _MAX_CALLS:
                raise NotLiteral("too many calls")
            asserts.append(entry)
        frames = [_harness.frame(["call", _harness.encode(list(args)), _harness.encode(dict(kwargs))])
                  for args, kwargs in self.calls]
        if any(len(f) > _MAX_CALL_BYTES for f in frames):
            raise NotLiteral("a call too big")
        return LiteralPlan(self.calls, asserts, frames)

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
            self.values += _count_values([args, kwargs], _MAX_PLAN_VALUES - self.values)
            if self.values > _MAX_PLAN_VALUES:
                raise NotLiteral("arguments too big")
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
            if any(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops) and not all(
                    isinstance(side, ast.Constant) and side.value in (None, True, False) and type(side.value) in
                    (type(None), bool) for side in node.comparators):
                raise NotLiteral("`is` on what is not None, True or False")  # (interning differs by interpreter)
            self._collect(node.left, entry, lazy)
            self._collect(node.comparators[0], entry, lazy)
            for value in node.comparators[1:]:  # a chain stops at its first false link
                self._collect(value, entry, True)
            return
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
                and node.func.id not in self.shadowed and not node.keywords):
            if node.func.id == "sum" and len(node.args) > 1 and not (
                    isinstance(node.args[1], ast.Constant) and type(node.args[1].value) in (int, float)):
                raise NotLiteral("sum() with a start that may be a list (quadratic)")
            for a in node.args:
                if isinstance(a, ast.Starred):
                    raise NotLiteral("starred")
                self._collect(a, entry, lazy)
            return
        raise NotLiteral(type(node).__name__)

    def _allowed(self, name: str) -> bool:
        return name not in self.shadowed


def _depth(node, level: int = 0) -> int:
    children = list(ast.iter_child_nodes(node))
    if level > _MAX_DEPTH or not children:
        return level
    return max(_depth(child, level + 1) for child in children)


def _bound_names(source: str) -> set[str]:
    """Every name the prompt binds anywhere (defs, classes, assignments, imports, `global`), or all the
    judge's function names when it can't tell (a star import, `builtins` touched, unreadable)."""
    try:
        module = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError):
        return set(_FUNCTIONS)
    names = set()
    for node in ast.walk(module):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if any(a.name == "*" for a in node.names):
                return set(_FUNCTIONS)
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            names.update(node.names)
        elif isinstance(node, ast.Name):
            if node.id in ("builtins", "__builtins__", "globals", "setattr", "exec", "eval"):
                return set(_FUNCTIONS)
            if isinstance(node.ctx, (ast.Store, ast.Del)):
                names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


def _count_values(value, limit: int) -> int:
    """How many values `value` holds (itself included), counting no further than `limit` + 1."""
    count, stack = 0, [value]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if type(item) in (list, tuple, set, frozenset):
            stack.extend(item)
        elif type(item) is dict:
            stack.extend(item.keys())
            stack.extend(item.values())
    return count


def _bounded_mult(a, b):
    for x, y in ((a, b), (b, a)):
        if type(x) in (str, bytes, list, tuple) and type(y) in (int, bool):
            if len(x) * max(y, 0) > _MAX_ELEMENTS:
                raise Undecided("a sequence too long")
            return x * y
    if type(a) in (int, bool) and type(b) in (int, bool):
        if abs(a).bit_length() + abs(b).bit_length() > _MAX_BITS:
            raise Undecided("an integer too large")
        return a * b
    if type(a) in (int, float, bool, complex) and type(b) in (int, float, bool, complex):
        return a * b
    raise TypeError(f"unsupported operand type(s) for *: '{type(a).__name__}' and '{type(b).__name__}'")


def _bounded_pow(a, b):
    if type(a) in (int, bool) and type(b) in (int, bool) and b > 0:
        if abs(a) > 1 and abs(a).bit_length() * b > _MAX_BITS:
            raise Undecided("an integer too large")
        if abs(a) <= 1 and b > _MAX_BITS:
            raise Undecided("an exponent too large")
    elif not (type(a) in (int, float, bool, complex) and type(b) in (int, float, bool, complex)):
        raise TypeError("unsupported operand type(s) for **")
    return a ** b


def _numbers_only(op):
    def apply(a, b):
        if type(a) not in (int, float, bool, complex) or type(b) not in (int, float, bool, complex):
            raise TypeError("unsupported operand types")
        return op(a, b)
    return apply


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
        name = node.func.id
        if name in _EXPANDING | {"sum", "min", "max", "all", "any"} and args and \
                type(args[0]) not in (list, tuple, set, frozenset, dict, str, bytes):
            raise TypeError(f"'{type(args[0]).__name__}' object is not iterable")
        if name in _EXPANDING and args and len(args[0]) > MAX_HASHED and (
                name in ("set", "frozenset") or type(args[0]) in (str, bytes)):
            raise Undecided(f"{name}() of {len(args[0])} elements")  # hashing, or an object per character
        if name in ("set", "frozenset") and args and type(args[0]) is not str and any(
                type(e) not in (int, float, bool, str, bytes, complex, type(None)) for e in args[0]):
            raise Undecided(f"{name}() of elements that are not scalars")  # (colliding tuples, compared in full)
        return _FUNCTIONS[name](*args)
    raise NotLiteral(type(node).__name__)


def _reply_cost(tree) -> tuple[int, int, bool]:
    """(values, set / dict elements, whether a set element or dict key is not a scalar) of an encoded
    value, from its JSON, before anything is decoded."""
    values, hashed, composite, stack = 0, 0, False, [tree]
    while stack:
        node = stack.pop()
        values += 1
        if values > MAX_REPLY_VALUES:
            break
        if type(node) is list and len(node) == 2 and type(node[0]) is str and type(node[1]) is list:
            tag, payload = node
            if tag in ("S", "F"):
                hashed += len(payload)
                composite |= any(not (type(e) is list and e and e[0] in _SCALARS) for e in payload)
                stack.extend(payload)
            elif tag == "d":
                hashed += len(payload)
                for pair in payload:
                    if type(pair) is list and len(pair) == 2:
                        key = pair[0]
                        composite |= not (type(key) is list and key and key[0] in _SCALARS)
                        stack.extend(pair)
            elif tag in ("l", "t"):
                stack.extend(payload)
    return values, hashed, composite


class Judge:
    """Sends the candidate its calls one at a time, takes its replies in order, and decides the verdict as
    soon as it can. `outgoing` holds the bytes still to be written to the candidate."""

    def __init__(self, literal: LiteralPlan):
        self.plan = literal
        self.results: list = []
        self.next_assert = 0
        self.verdict: dict | None = None
        self.undecided = False  # a reply this process should not judge: ask the tests' own process
        self.outgoing = bytearray()
        self._sent = 0
        self._buffer = bytearray()
        self._received = self._values = self._hashed = 0
        self._advance()

    def feed(self, data: bytes) -> bool:
        """Bytes of the candidate's reply stream; True once the verdict is decided (or left undecided)."""
        if self.verdict is not None or self.undecided:
            return True
        self._received += len(data)
        if self._received > MAX_REPLIES_BYTES:
            return self._undecided()
        self._buffer += data
        while len(self._buffer) >= 4:
            try:
                size = _harness.frame_size(bytes(self._buffer[:4]))
                if len(self._buffer) < 4 + size:
                    break
                reply = _harness.parse_frame(bytes(self._buffer[4:4 + size]))
            except _harness.ProtocolError as err:
                return self._fail(_harness.protocol_broken(str(err).split(' (')[0]))
            del self._buffer[:4 + size]
            if self.add(reply):
                return True
        return False

    def add(self, reply) -> bool:
        """One reply of the candidate's (as `_harness.serve` sends it); True once the verdict is decided."""
        if self.verdict is not None or self.undecided:
            return True
        if len(self.results) >= self._sent:
            return self._fail(_harness.protocol_broken("a reply to no call"))
        if type(reply) is not list or not reply or type(reply[0]) is not str:
            return self._fail(_harness.protocol_broken("a malformed reply"))
        kind = reply[0]
        if kind == "ok" and len(reply) == 3:
            values, hashed, composite = _reply_cost(reply[1])
            self._values += values
            self._hashed += hashed
            if composite or self._values > MAX_REPLY_VALUES or self._hashed > MAX_HASHED:
                return self._undecided()
            try:
                self.results.append(_harness.decode(reply[1]))
            except _harness.ProtocolError as err:
                return self._fail(_harness.protocol_broken(err))
        elif kind == "raise" and len(reply) == 4 and all(type(x) is str for x in reply[1:]):
            self.results.append(_Raised(reply[1], reply[2], reply[3]))
        elif kind == "unencodable" and len(reply) == 2 and type(reply[1]) is str:
            self.results.append(_Raised("CandidateFailure", _harness.not_builtin(reply[1]), ""))
        elif kind == "error" and len(reply) == 2:
            return self._fail(_harness.protocol_broken("it could not read a call"))
        else:
            return self._fail(_harness.protocol_broken("a malformed reply"))
        return self._advance()

    def _advance(self) -> bool:
        asserts = self.plan.asserts
        while self.next_assert < len(asserts):
            entry = asserts[self.next_assert]
            if entry.calls and entry.calls[-1] >= len(self.results):
                # It waits for a reply: the next call goes out once every earlier reply is in (as the tests
                # would make it: only after the asserts before it held).
                if self._sent == len(self.results):
                    self.outgoing += self.plan.frames[self._sent]
                    self._sent += 1
                return False
            try:
                held = evaluate(entry.test, self.results)
            except Undecided:
                return self._undecided()
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

    def _undecided(self) -> bool:
        self.undecided = True
        return True

    def finish(self, gone: bool) -> dict:
        """The verdict when the replies stopped (the program exited, or ran out of time)."""
        if self.verdict is None:
            self.verdict = {"passed": False, "split": True, "calls": len(self.results), "gone": gone,
                            "observation": _harness.EXITED_EARLY}
        return self.verdict


class _Raised(Exception):
    """The candidate's call raised: name, message and its own traceback text."""

    def __init__(self, name: str, message: str, traceback: str):
        super().__init__(message)
        self.name, self.message, self.traceback = name, message, traceback
