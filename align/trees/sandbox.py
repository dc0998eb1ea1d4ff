"""Run untrusted, model-written Python with time, memory, process, output and network limits.

Every run gets: its own process session/group, a private temporary directory (deleted afterwards), a
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
import json
import os
import random
import resource
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


# Landlock (Linux 5.13+): confine file-system writes to the sandbox directory, without privileges.
_SYS_LANDLOCK_CREATE, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT = 444, 445, 446
_PR_SET_NO_NEW_PRIVS = 38
_LL_WRITE_RIGHTS_V1 = sum(1 << b for b in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # write, remove, make-*
_LL_REFER, _LL_TRUNCATE = 1 << 13, 1 << 14


def landlock_abi() -> int:
    abi = _libc.syscall(_SYS_LANDLOCK_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return abi if abi > 0 else 0


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _landlock_writes_only_under(paths: list[str], abi: int) -> bool:
    rights = _LL_WRITE_RIGHTS_V1 | (_LL_REFER if abi >= 2 else 0) | (_LL_TRUNCATE if abi >= 3 else 0)
    handled = ctypes.c_uint64(rights)
    fd = _libc.syscall(_SYS_LANDLOCK_CREATE, ctypes.byref(handled), ctypes.c_size_t(8), ctypes.c_uint32(0))
    if fd < 0:
        return False
    for path in paths:
        file_only = not os.path.isdir(path)
        allowed = ((1 << 1) | (_LL_TRUNCATE if abi >= 3 else 0)) if file_only else rights
        pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = _PathBeneath(allowed, pfd)
        _libc.syscall(_SYS_LANDLOCK_ADD_RULE, ctypes.c_int(fd), ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0))
        os.close(pfd)
    _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    ok = _libc.syscall(_SYS_LANDLOCK_RESTRICT, ctypes.c_int(fd), ctypes.c_uint32(0)) == 0
    os.close(fd)
    return ok


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


def run_python(code: str, limits: SandboxLimits | None = None, stdin: str | None = None) -> SandboxResult:
    """Run `code` as a Python program under the sandbox's limits and return what happened."""
    limits = limits or SandboxLimits()
    caps = capabilities()
    root = caps["root"]
    netns = caps["netns"]
    landlock = caps["landlock_abi"]
    workdir = tempfile.mkdtemp(prefix="align-sandbox-")
    os.chmod(workdir, 0o700)
    uid = _claim_uid() if root else None
    if uid is not None:
        os.chown(workdir, uid, uid)
    program = os.path.join(workdir, "main.py")
    with open(program, "w") as f:
        f.write(code if netns else _NO_SOCKET_PRELUDE + code)
    out_dir = tempfile.mkdtemp(prefix="align-sandbox-out-")  # outside the child's reach: parent-owned, 0700
    os.chmod(out_dir, 0o700)
    stdout_path, stderr_path = os.path.join(out_dir, "stdout"), os.path.join(out_dir, "stderr")
    stdin_path = os.path.join(out_dir, "stdin")
    with open(stdin_path, "w") as f:
        f.write(stdin or "")
    cpu_s = int(limits.timeout_s) + 1
    file_cap = max(limits.max_output_bytes * 2, limits.max_file_bytes)

    def preexec():  # runs in the child, between fork and exec
        os.setsid()
        if netns:
            if _libc.unshare(CLONE_NEWNET if root else (CLONE_NEWUSER | CLONE_NEWNET)) != 0:
                os._exit(126)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
        mem = limits.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_cap, file_cap))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.max_open_files, limits.max_open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if uid is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        else:
            running = len(_pids_of_uid(os.getuid()))
            cap = running + limits.max_processes
            resource.setrlimit(resource.RLIMIT_NPROC, (cap, cap))
        if landlock and not _landlock_writes_only_under([workdir, "/dev/null"], landlock):
            os._exit(125)

    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "OPENBLAS_NUM_THREADS": "1"}
    start = time.monotonic()
    status = "ok"
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err, open(stdin_path, "rb") as inp:
        proc = subprocess.Popen([sandbox_python(uid is not None), "-I", "-B", program], cwd=workdir, env=env, stdin=inp, stdout=out,
                                stderr=err, preexec_fn=preexec, close_fds=True)
        try:
            proc.wait(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            status = "timeout"
    duration = time.monotonic() - start
    # Whatever happened, nothing the program started survives it.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if uid is not None:
        _kill_uid(uid)
    else:
        for pid in _descendants(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    exit_code = proc.wait()
    if status == "ok":
        if exit_code == 126 and netns and duration < 0.5:
            status = "error"
        elif exit_code < 0:
            status = "killed"  # a signal: CPU limit, file-size limit, memory (often SIGKILL/SIGSEGV)
        elif exit_code != 0:
            status = "error"
    stdout, out_trunc = _read_capped(stdout_path, limits.max_output_bytes)
    stderr, err_trunc = _read_capped(stderr_path, limits.max_output_bytes)
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    if uid is not None:
        with _uid_lock:
            _uids_in_use.discard(uid)
    return SandboxResult(
        status=status, exit_code=exit_code, duration_s=round(duration, 3), stdout=stdout, stderr=stderr,
        stdout_truncated=out_trunc, stderr_truncated=err_trunc, network="namespace" if netns else "sockets-disabled",
    )
