"""Run untrusted, model-written Python with time, memory, process, output and network limits.

Runs are forked from a small zygote process (align/trees/_zygote.py) started once, so a run costs a
fork rather than an interpreter start. Every run gets: its own process session/group, a private temporary directory (deleted afterwards), a
wall-clock timeout enforced by the parent, RLIMIT_CPU / RLIMIT_AS / RLIMIT_FSIZE / RLIMIT_NOFILE, a cap
on captured output, a fresh network namespace (no interfaces but a down loopback) and, afterwards, the
death of every process it started.

How processes are contained depends on privilege:
- as root (CI, containers): the child switches to a uid of its own from a private range, so
  RLIMIT_NPROC bounds fork bombs and `kill(-1)` as that uid reaches every descendant, even ones that
  called setsid() to leave the process group. It cannot write files outside its directory that it
  doesn't own.
- everywhere Landlock exists (Linux 5.13+): file-system writes only beneath its own directory.
- as a normal user: a user+network namespace where the kernel allows it, RLIMIT_NPROC on the user, and
  the process group plus a /proc walk for cleanup. If no network namespace can be made, the socket
  module is disabled inside the child instead (`network` in the verdict says which).
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
UID_RANGE = (200_000, 260_000)  # far from any real account

_libc = ctypes.CDLL(None, use_errno=True)
_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()

# Prepended to the program when no network namespace is available: sockets raise instead of connecting.
_NO_SOCKET_PRELUDE = """
import socket as _s
def _no_net(*a, **k):
    raise OSError(101, "network disabled in the sandbox")
_s.socket = _no_net; _s.create_connection = _no_net; _s.socketpair = _no_net
del _s, _no_net
"""


@dataclass
class SandboxLimits:
    timeout_s: float = 10.0
    memory_mb: int = 1024
    max_processes: int = 32
    max_output_bytes: int = 64 * 1024
    max_file_bytes: int = 16 * 1024 * 1024
    max_open_files: int = 64


@dataclass
class SandboxResult:
    status: str  # ok | error | timeout | killed
    exit_code: int | None
    duration_s: float
    stdout: str
    stderr: str
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    network: str = "namespace"
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


_SYS_LANDLOCK_CREATE = 444


def landlock_abi() -> int:
    """Landlock ABI version (0: unavailable). Landlock confines the child's file-system writes."""
    abi = _libc.syscall(_SYS_LANDLOCK_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return abi if abi > 0 else 0


def _can_unshare(flags: int) -> bool:
    pid = os.fork()
    if pid == 0:
        os._exit(0 if _libc.unshare(flags) == 0 else 1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


_CAPS: dict[str, bool] = {}


def capabilities() -> dict[str, bool]:
    """What isolation this machine allows, probed once per process."""
    with _uid_lock:
        if not _CAPS:
            root = os.geteuid() == 0
            probed = {"root": root, "landlock_abi": landlock_abi(),
                      "netns": _can_unshare(CLONE_NEWNET) if root else _can_unshare(CLONE_NEWUSER | CLONE_NEWNET)}
            _CAPS.update(probed)
    return _CAPS


def _world_executable(path: str) -> bool:
    """True when a process of an unrelated uid can execute `path` (every parent directory o+x)."""
    real = os.path.realpath(path)
    parts = real.split(os.sep)
    for i in range(2, len(parts)):
        try:
            if not os.stat(os.sep.join(parts[:i])).st_mode & 0o001:
                return False
        except OSError:
            return False
    try:
        return bool(os.stat(real).st_mode & 0o001)
    except OSError:
        return False


def sandbox_python(as_other_uid: bool) -> str:
    """The interpreter that runs sandboxed code ($ALIGN_SANDBOX_PYTHON, else ours if the sandbox uid can
    reach it, else the system python3). Sandboxed code needs only the standard library."""
    chosen = os.environ.get("ALIGN_SANDBOX_PYTHON")
    if chosen:
        return chosen
    if not as_other_uid or _world_executable(sys.executable):
        return sys.executable
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"):
        if os.path.exists(candidate) and _world_executable(candidate):
            return candidate
    raise RuntimeError("no python3 that an unprivileged sandbox uid can execute; set ALIGN_SANDBOX_PYTHON")


def _claim_uid() -> int:
    with _uid_lock:
        while True:
            uid = random.randint(*UID_RANGE)
            if uid not in _uids_in_use:
                _uids_in_use.add(uid)
                return uid


def _kill_uid(uid: int) -> None:
    """Kill every process owned by `uid` (kill(-1) from a child that became that uid), repeatedly,
    until none is left: a fork bomb may be forking while we kill."""
    for _ in range(50):
        pid = os.fork()
        if pid == 0:
            try:
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
                os.kill(-1, signal.SIGKILL)
            except OSError:
                pass
            os._exit(0)
        os.waitpid(pid, 0)
        if not _pids_of_uid(uid):
            return
        time.sleep(0.01)


def _pids_of_uid(uid: int) -> list[int]:
    """Live processes of `uid` (zombies are dead already; only their parent, often init, can reap them)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid != uid:
                    continue
                with open(f"/proc/{entry}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                        pids.append(int(entry))
            except (OSError, IndexError):
                pass
    return pids


def _descendants(root_pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            out.append(child)
            todo.append(child)
    return out


def _read_capped(path: str, cap: int) -> tuple[str, bool]:
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            data = f.read(cap)
    except OSError:
        return "", False
    return data.decode("utf-8", errors="replace"), size > cap


class _Zygote:
    """Client of the zygote process (align/trees/_zygote.py) that forks one isolated child per run."""

    def __init__(self, python: str):
        self.proc = subprocess.Popen([python, "-I", "-S", "-B", _ZYGOTE_FILE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1, start_new_session=True)
        self._write_lock = threading.Lock()
        self._events: dict[int, threading.Event] = {}
        self._pids: dict[int, int] = {}
        self._status: dict[int, int] = {}
        self._ids = itertools.count()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            msg = json.loads(line)
            if "pid" in msg:
                self._pids[msg["id"]] = msg["pid"]
            else:
                self._status[msg["id"]] = msg["status"]
            event = self._events.get(msg["id"])
            if event:
                event.set()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def start(self, request: dict) -> tuple[int, threading.Event]:
        rid = next(self._ids)
        event = threading.Event()
        self._events[rid] = event
        with self._write_lock:
            self.proc.stdin.write(json.dumps({**request, "id": rid}) + "\n")
            self.proc.stdin.flush()
        return rid, event

    def wait(self, rid: int, event: threading.Event, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while rid not in self._status:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            event.wait(remaining if remaining is None else min(remaining, 0.5))
            event.clear()
            if not self.alive():
                raise RuntimeError("the sandbox zygote died")
        return True

    def finish(self, rid: int) -> int:
        self._events.pop(rid, None)
        self._pids.pop(rid, None)
        return self._status.pop(rid)


_ZYGOTE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_zygote.py")
_zygote: _Zygote | None = None
_zygote_lock = threading.Lock()


def _get_zygote(python: str) -> _Zygote:
    global _zygote
    with _zygote_lock:
        if _zygote is None or not _zygote.alive():
            _zygote = _Zygote(python)
        return _zygote


def run_python(code: str, limits: SandboxLimits | None = None, stdin: str | None = None) -> SandboxResult:
    """Run `code` as a Python program under the sandbox's limits and return what happened."""
    limits = limits or SandboxLimits()
    caps = capabilities()
    root, netns, landlock = caps["root"], caps["netns"], caps["landlock_abi"]
    workdir = tempfile.mkdtemp(prefix="align-sandbox-")
    os.chmod(workdir, 0o700)
    uid = _claim_uid() if root else None
    if uid is not None:
        os.chown(workdir, uid, uid)
    out_dir = tempfile.mkdtemp(prefix="align-sandbox-out-")  # parent-owned, 0700: out of the child's reach
    os.chmod(out_dir, 0o700)
    program = os.path.join(out_dir, "main.py")  # read before privileges drop; the code can't rewrite it
    with open(program, "w") as f:
        f.write(code if netns else _NO_SOCKET_PRELUDE + code)
    paths = {name: os.path.join(out_dir, name) for name in ("stdin", "stdout", "stderr")}
    with open(paths["stdin"], "w") as f:
        f.write(stdin or "")
    zygote = _get_zygote(sandbox_python(uid is not None))
    request = {"workdir": workdir, "program": program, **paths, "limits": asdict(limits), "uid": uid,
               "netns": netns, "root": root, "landlock_abi": landlock}
    start = time.monotonic()
    rid, event = zygote.start(request)
    finished = zygote.wait(rid, event, limits.timeout_s)
    duration = time.monotonic() - start
    status = "ok" if finished else "timeout"
    # Whatever happened, nothing the program started survives it.
    pid = zygote._pids.get(rid)
    if pid:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if uid is not None:
        if _pids_of_uid(uid):
            _kill_uid(uid)
    elif pid:
        for child in _descendants(pid):
            try:
                os.kill(child, signal.SIGKILL)
            except OSError:
                pass
    zygote.wait(rid, event, None)
    wait_status = zygote.finish(rid)
    exit_code = os.waitstatus_to_exitcode(wait_status)
    if status == "ok":
        if exit_code in (124, 125, 126) and duration < 0.5:
            status = "error"  # the sandbox itself could not be set up
        elif exit_code < 0:
            status = "killed"  # a signal: CPU limit, file-size limit, memory
        elif exit_code != 0:
            status = "error"
    stdout, out_trunc = _read_capped(paths["stdout"], limits.max_output_bytes)
    stderr, err_trunc = _read_capped(paths["stderr"], limits.max_output_bytes)
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    if uid is not None:
        with _uid_lock:
            _uids_in_use.discard(uid)
    return SandboxResult(
        status=status, exit_code=exit_code, duration_s=round(duration, 3), stdout=stdout, stderr=stderr,
        stdout_truncated=out_trunc, stderr_truncated=err_trunc, network="namespace" if netns else "sockets-disabled",
        extra={"filesystem": "landlock" if landlock else ("uid" if uid is not None else "none")},
    )
