"""Code verification inside the sandbox, in two processes the candidate cannot both reach.

The *test side* runs the problem's own code (its prompt's helpers and its `check(candidate)`) with a
stand-in for the candidate: each call is sent to the *candidate side*, a second sandboxed process (another
uid as root) that runs the model-written code and returns the result. Values cross only through `encode`
/ `decode`, which accept exact built-in types and nothing else, so every comparison the tests make runs on
values the test side built itself: no object of the candidate's can override `==`, no marker of the
verdict exists in the candidate's memory, and an early exit of the candidate only ends its own process.
The test side writes the verdict to a pipe only the sandbox's zygote holds.

When the tests cannot be split that way (they pass the candidate something that is not a built-in value,
such as a function, or use a name only the candidate's code defines), the test side says so and the
verifier runs candidate and tests in one process instead, reporting `isolation: in-process`.

This file is the standard library only: its source is prepended to the programs the sandbox runs.
"""

import base64
import builtins
import json
import linecache
import os
import struct
import sys
import traceback

MAX_MESSAGE = 16 * 1024 * 1024  # a reply the tests' side will parse at most
MAX_DEPTH = 100
REQUEST_FD, REPLY_FD, VERDICT_FD = 3, 4, 5
SOLUTION_FILE, TESTS_FILE, PROMPT_FILE = "solution.py", "tests.py", "prompt.py"


class Unencodable(TypeError):
    """A value that is not made of exact built-in types."""


class ProtocolError(Exception):
    """A message that is not what the other side must send."""


class CandidateGone(Exception):
    """The candidate's process ended (or closed its pipe) before answering."""


class CannotSplit(Exception):
    """The tests can't run apart from the candidate (the verifier falls back to one process)."""


def encode(value, depth=0):
    """A JSON-able tree of [tag, payload] for exact built-in types only (subclasses are refused too)."""
    t = type(value)
    if value is None:
        return ["N"]
    if t is bool:
        return ["b", value]
    if t is int:
        return ["i", hex(value)]  # hex: no digit limit, exact
    if t is float:
        return ["f", value.hex()]
    if t is str:
        return ["s", value]
    if t is bytes:
        return ["y", base64.b64encode(value).decode("ascii")]
    if t is complex:
        return ["c", [value.real.hex(), value.imag.hex()]]
    if depth >= MAX_DEPTH:
        raise Unencodable("a value nested more than %d deep" % MAX_DEPTH)
    if t is list:
        return ["l", [encode(v, depth + 1) for v in value]]
    if t is tuple:
        return ["t", [encode(v, depth + 1) for v in value]]
    if t is dict:
        return ["d", [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]]
    if t is set:
        return ["S", [encode(v, depth + 1) for v in value]]
    if t is frozenset:
        return ["F", [encode(v, depth + 1) for v in value]]
    raise Unencodable("an object of type %s.%s" % (t.__module__, t.__qualname__))


def _items(payload):
    if type(payload) is not list:
        raise ProtocolError("a container payload must be a list")
    return payload


def decode(tree, depth=0):
    """The inverse of `encode`, building only built-in values; anything malformed is a ProtocolError."""
    if type(tree) is not list or not tree or type(tree[0]) is not str or depth > MAX_DEPTH + 1:
        raise ProtocolError("not an encoded value")
    tag = tree[0]
    if tag == "N" and len(tree) == 1:
        return None
    if len(tree) != 2:
        raise ProtocolError("not an encoded value")
    payload = tree[1]
    try:
        if tag == "b" and type(payload) is bool:
            return payload
        if tag == "i" and type(payload) is str:
            return int(payload, 16)
        if tag == "f" and type(payload) is str:
            return float.fromhex(payload)
        if tag == "s" and type(payload) is str:
            return payload
        if tag == "y" and type(payload) is str:
            return base64.b64decode(payload.encode("ascii"), validate=True)
        if tag == "c" and type(payload) is list and len(payload) == 2 and all(type(p) is str for p in payload):
            return complex(float.fromhex(payload[0]), float.fromhex(payload[1]))
        if tag == "l":
            return [decode(v, depth + 1) for v in _items(payload)]
        if tag == "t":
            return tuple(decode(v, depth + 1) for v in _items(payload))
        if tag == "d":
            out = {}
            for pair in _items(payload):
                if type(pair) is not list or len(pair) != 2:
                    raise ProtocolError("a mapping entry must be a pair")
                out[decode(pair[0], depth + 1)] = decode(pair[1], depth + 1)
            return out
        if tag == "S":
            return {decode(v, depth + 1) for v in _items(payload)}
        if tag == "F":
            return frozenset(decode(v, depth + 1) for v in _items(payload))
    except ProtocolError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError) as err:
        raise ProtocolError("bad %s value (%s)" % (tag, err)) from None
    raise ProtocolError("unknown tag %r" % (tag,))


def frame(message):
    """A message as it crosses: its JSON's length (4 bytes, big-endian), then the JSON."""
    data = json.dumps(message, separators=(",", ":")).encode("utf-8", "surrogatepass")
    return struct.pack(">I", len(data)) + data


def send(fd, message):
    data = frame(message)
    while data:
        data = data[os.write(fd, data):]


def _reply(fd, message):
    """The candidate side's answer to a call; what the call printed is flushed first, so a verdict that
    comes with this reply (and the kill of the run after it) finds the output written."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    send(fd, message)


def _read_exactly(fd, n):
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise CandidateGone("the other side closed the channel")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def frame_size(header):
    """The length a frame's 4-byte header announces; a ProtocolError past MAX_MESSAGE."""
    (size,) = struct.unpack(">I", header)
    if size > MAX_MESSAGE:
        raise ProtocolError("a message of %d bytes" % size)
    return size


def parse_frame(body):
    """The message of a frame's body; a ProtocolError when it is not JSON."""
    try:
        return json.loads(body.decode("utf-8", "surrogatepass"))
    except (ValueError, RecursionError) as err:
        raise ProtocolError("not JSON (%s)" % err) from None


def receive(fd):
    return parse_frame(_read_exactly(fd, frame_size(_read_exactly(fd, 4))))


def _register_source(filename, source):
    lines = source.splitlines(True)
    linecache.cache[filename] = (len(source), None, lines, filename)


def format_exception(err, keep):
    """A traceback of only the frames whose file is in `keep` (the candidate's, or the tests'), so an
    observation never shows the harness or the machine's paths."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename in keep]
    lines = ["Traceback (most recent call last):\n"] + traceback.format_list(frames) if frames else []
    return "".join(lines + traceback.format_exception_only(type(err), err)).rstrip()


# ------------------------------------------------------------------ candidate side
def serve(code, entry_point):
    """Run the candidate's code, then answer the test side's calls until it says done."""
    request_fd, reply_fd = REQUEST_FD, REPLY_FD
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    _register_source(SOLUTION_FILE, code)
    failure = None
    try:
        exec(compile(code, SOLUTION_FILE, "exec"), namespace)
    except BaseException as err:  # SystemExit included: the calls then report it
        failure = err
        print(format_exception(err, {SOLUTION_FILE}), file=sys.stderr)
    function = namespace.get(entry_point)
    while True:
        try:
            message = receive(request_fd)
        except (CandidateGone, ProtocolError):
            break
        if type(message) is not list or not message or message[0] != "call":
            break
        try:
            args = decode(message[1])
            kwargs = decode(message[2])
        except ProtocolError as err:
            _reply(reply_fd, ["error", str(err)])
            continue
        if failure is not None:
            err = failure
        elif not callable(function):
            err = NameError("name %r is not defined" % entry_point)
        else:
            try:
                result = function(*args, **kwargs)
            except BaseException as raised:
                err = raised
            else:
                err = None
        if err is not None:
            _reply(reply_fd, ["raise", type(err).__name__, str(err)[:2000], format_exception(err, {SOLUTION_FILE})[-4000:]])
            continue
        try:
            reply = ["ok", encode(result), [encode(a) if type(a) in (list, dict, set) else None for a in args]]
        except (Unencodable, RecursionError) as bad:
            _reply(reply_fd, ["unencodable", str(bad)])
            continue
        _reply(reply_fd, reply)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(0)


# ------------------------------------------------------------------ test side
class _FromCandidate:
    """Mixed into the exceptions re-raised for the candidate, to tell them from the tests' own."""


def _candidate_exception(name, message, text):
    base = getattr(builtins, name, None) if name.isidentifier() else None
    if not (isinstance(base, type) and issubclass(base, Exception)) or base in (SystemExit, KeyboardInterrupt):
        base = RuntimeError
    try:
        cls = type(name if name.isidentifier() else "CandidateError", (base, _FromCandidate), {})
        err = cls(message)
    except Exception:
        err = type("CandidateError", (RuntimeError, _FromCandidate), {})(message)
    err.candidate_traceback = text
    return err


def _write_back(arg, after):
    """The candidate mutated a list / dict / set argument: the test side sees the mutation too."""
    if type(arg) is list:
        arg[:] = after
    elif type(arg) is dict:
        arg.clear()
        arg.update(after)
    elif type(arg) is set:
        arg.clear()
        arg.update(after)


def run_tests(prompt, tests, entry_point):
    """Run `check(candidate)` of the tests against the candidate side; write the verdict to VERDICT_FD."""
    request_fd, reply_fd, verdict_fd = REQUEST_FD, REPLY_FD, VERDICT_FD
    calls = [0]

    def candidate(*args, **kwargs):
        try:
            message = ["call", encode(list(args)), encode(dict(kwargs))]
        except (Unencodable, RecursionError) as err:
            raise CannotSplit("the tests pass the candidate %s" % err) from None
        calls[0] += 1
        send(request_fd, message)
        reply = receive(reply_fd)
        if type(reply) is not list or not reply or type(reply[0]) is not str:
            raise ProtocolError("a malformed reply")
        kind = reply[0]
        if kind == "ok" and len(reply) == 3 and type(reply[2]) is list and len(reply[2]) == len(args):
            value = decode(reply[1])
            for arg, after in zip(args, reply[2]):
                if after is not None and type(arg) in (list, dict, set):
                    mutated = decode(after)
                    if type(mutated) is type(arg):
                        _write_back(arg, mutated)
            return value
        if kind == "raise" and len(reply) == 4 and all(type(x) is str for x in reply[1:]):
            raise _candidate_exception(reply[1], reply[2], reply[3])
        if kind == "unencodable" and len(reply) == 2 and type(reply[1]) is str:
            raise CandidateFailure(not_builtin(reply[1]))
        raise ProtocolError("a malformed reply")

    candidate.__name__ = entry_point
    namespace = {"__name__": "__tests__", "__builtins__": builtins}
    verdict = {"passed": False, "split": True, "calls": 0}
    try:
        for filename, source in ((PROMPT_FILE, prompt), (TESTS_FILE, tests)):
            if source:
                _register_source(filename, source)
                exec(compile(source, filename, "exec"), namespace)
            namespace[entry_point] = candidate  # tests may name the function itself, as the solution defines it
        check = namespace.get("check")
        if not callable(check):
            raise CannotSplit("the tests define no check(candidate)")
        check(candidate)
        verdict["passed"] = True
    except CannotSplit as err:
        _cannot_split(verdict, str(err), calls[0])
    except NameError as err:
        if isinstance(err, _FromCandidate):
            verdict["observation"] = _observation(err)
        else:  # the tests use a name that only the candidate's code defines
            _cannot_split(verdict, "the tests use %s" % err, calls[0])
    except CandidateGone:
        verdict.update(gone=True, observation=EXITED_EARLY)
    except ProtocolError as err:
        verdict["observation"] = protocol_broken(err)
    except BaseException as err:
        verdict["observation"] = _observation(err)
    verdict["calls"] = calls[0]
    try:
        send(request_fd, ["done"])
    except OSError:
        pass
    _write_verdict(verdict_fd, verdict)


def _cannot_split(verdict, reason, calls):
    """Fall back to one process only when the candidate cannot have caused it: before it answered any call
    (its answers, copied back into the tests' values, could otherwise make the next call unsplittable on
    purpose and so choose the forgeable fallback). After that it is a failure."""
    if calls == 0:
        verdict.update(split=False, reason=reason)
    else:
        verdict["observation"] = "The tests could not go on with what the program returned (%s)." % reason


MAX_OBSERVATION = 16 * 1024

# The observations of a failed run, the same words from either judge (here, or align's literal_tests).
EXITED_EARLY = "The program exited before the tests finished."


def protocol_broken(why):
    return "The program broke the test protocol (%s)." % why


def not_builtin(shown):
    return "the candidate returned %s, not a built-in value" % shown[:200]


def _write_verdict(fd, verdict):
    """Whole, and small enough for the pipe (whose reader waits for our exit): the observation is cut."""
    if len(str(verdict.get("observation", ""))) > MAX_OBSERVATION:
        verdict["observation"] = str(verdict["observation"])[:MAX_OBSERVATION] + "\n... (cut)"
    data = json.dumps(verdict).encode("utf-8", "surrogatepass")
    while data:
        data = data[os.write(fd, data):]
    os._exit(0)


class CandidateFailure(Exception):
    """The candidate answered with something the tests cannot use."""


def _observation(err):
    """The candidate's own traceback when it raised; else the failing line of the tests."""
    return getattr(err, "candidate_traceback", "") or format_exception(err, {TESTS_FILE, PROMPT_FILE})


# ------------------------------------------------------------------ one process (the fallback)
def run_in_process(code, prompt, tests, entry_point):
    """Candidate and tests in one process: what the test side cannot split. Its verdict is only as
    trustworthy as the candidate lets it be; the verifier labels it `isolation: in-process`."""
    verdict_fd = VERDICT_FD
    _register_source(SOLUTION_FILE, code)
    _register_source(TESTS_FILE, tests)
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    verdict = {"passed": False, "split": False}
    try:
        exec(compile(code, SOLUTION_FILE, "exec"), namespace)
        exec(compile(tests, TESTS_FILE, "exec"), namespace)
        namespace["check"](namespace[entry_point])
        verdict["passed"] = True
    except SystemExit:
        verdict["observation"] = EXITED_EARLY
    except BaseException as err:
        verdict["observation"] = format_exception(err, {SOLUTION_FILE, TESTS_FILE})
    _write_verdict(verdict_fd, verdict)
