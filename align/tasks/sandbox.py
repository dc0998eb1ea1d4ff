"""Run untrusted, model-written Python with time, memory, process, disk, output and network limits.

Runs are forked from a small zygote process (align/tasks/_zygote.py), started once with an environment
built from nothing, so a run costs a fork rather than an interpreter start and inherits no variable of
ours (no token, no key). Every child of a run gets: its own session, a private temporary directory (a
tmpfs of `max_disk_mb`, deleted afterwards, where mount namespaces work), a wall-clock timeout enforced
here, RLIMIT_CPU / RLIMIT_AS / RLIMIT_FSIZE / RLIMIT_NOFILE, a cap on captured output, a fresh network
namespace, a memory and a process-count cgroup holding all its processes together (memfd and shared
memory included), and afterwards the death of every process it started, before the result returns.

How processes are contained depends on what the machine allows (`capabilities()`):
- as root (CI, containers): each child switches to a uid of its own, so RLIMIT_NPROC bounds fork bombs,
  other processes' memory and files are out of reach, and `kill(-1)` as that uid reaches every
  descendant, even ones that called setsid().
- cgroups (v2, or v1 memory + pids, where this process may create child groups): `memory_mb` bounds the
  run's processes together, `max_processes` their number. Otherwise (the stated fallback) memory is
  bounded per process by RLIMIT_AS, which memfd and shared memory escape.
- Landlock (Linux 5.13+): writes only beneath the child's directory; the candidate side of a code
  verification may also read only system and interpreter folders (not /proc, /tmp or home folders).
- as a normal user: a user+network(+mount) namespace where the kernel allows it, RLIMIT_NPROC on the
  user, and the process group plus a /proc walk for cleanup. Without a network namespace the socket
  module is disabled inside the child instead (`network` in the result says which).

Code verification (`run_tests_isolated`) runs the tests and the candidate in two such children; see
align/tasks/_harness.py.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import json
import math
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace

from align.tasks import literal_tests

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
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

# (minimum, maximum) of every limit; anything else, and nan / inf, is refused.
LIMIT_BOUNDS = {
    "timeout_s": (0.05, 3600.0),
    "memory_mb": (64, 1 << 20),  # below ~64 MiB the interpreter itself cannot start
    "max_processes": (1, 4096),
    "max_output_bytes": (1, 1 << 30),
    "max_file_bytes": (1, 1 << 40),
    "max_open_files": (16, 65536),
    "max_disk_mb": (1, 1 << 20),
}


@dataclass
class SandboxLimits:
    timeout_s: float = field(default=10.0, metadata={"help": "Wall-clock seconds per run (CPU time: one more)."})
    memory_mb: int = field(default=1024, metadata={"help": "Memory of all a run's processes together, in MiB."})
    max_processes: int = field(default=32, metadata={"help": "Processes and threads a run may have at once."})
    max_output_bytes: int = field(default=64 * 1024, metadata={"help": "Captured stdout / stderr, each, in bytes."})
    max_file_bytes: int = field(default=16 * 1024 * 1024, metadata={"help": "Largest file a run may write."})
    max_open_files: int = field(default=64, metadata={"help": "Open file descriptors per process."})
    max_disk_mb: int = field(default=64, metadata={"help": "Disk of the run's directory (a tmpfs), in MiB."})

    def __post_init__(self):
        check_limits(self)


def check_limits(limits: SandboxLimits, where: str = "sandbox") -> SandboxLimits:
    """Every limit a finite number within its bounds; ValueError naming the key otherwise."""
    for f in fields(limits):
        value = getattr(limits, f.name)
        low, high = LIMIT_BOUNDS[f.name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: {f.name} must be a number, got {value!r}")
        if f.type in (int, "int") and not isinstance(value, int):
            raise ValueError(f"{where}: {f.name} must be a whole number, got {value!r}")
        if not math.isfinite(value) or not low <= value <= high:
            raise ValueError(f"{where}: {f.name} must be between {low} and {high}, got {value!r}")
    return limits


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
    """Landlock ABI version (0: unavailable). Landlock confines the child's file-system access."""
    abi = _libc.syscall(_SYS_LANDLOCK_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return abi if abi > 0 else 0


def _in_child(fn) -> bool:
    """Whether `fn()` succeeds (returns True) in a forked child: a probe that can't disturb us."""
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(0 if fn() else 1)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def _probe_tmpfs(root: bool) -> bool:
    folder = tempfile.mkdtemp(prefix="align-probe-")

    def mount():  # as the run will: mounted, then a file written in it
        uid, gid = os.getuid(), os.getgid()
        flags = CLONE_NEWNS | (0 if root else CLONE_NEWUSER)
        if _libc.unshare(flags) != 0:
            return False
        if not root:
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        if _libc.mount(b"none", b"/", None, (1 << 14) | (1 << 18), None) != 0:
            return False
        if _libc.mount(b"tmpfs", folder.encode(), b"tmpfs", 6, b"size=1m,mode=0700") != 0:
            return False
        with open(os.path.join(folder, "probe"), "w") as f:
            f.write("ok")
        return True

    try:
        return _in_child(mount)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class _Cgroups:
    """Per-run child groups of this process's own cgroup: memory (all processes together, memfd and
    shared memory included) and process count. cgroup v2 where it has both controllers, else v1."""

    def __init__(self):
        self.kind, self.memory_root, self.pids_root = "none", None, None
        self._ids = itertools.count()
        try:
            lines = open("/proc/self/cgroup").read().splitlines()
        except OSError:
            return
        entries = {}
        for line in lines:
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                entries[c] = path
        for base in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
            if "" in entries and self._try(os.path.join(base + entries[""].rstrip("/")), None, "v2"):
                return
        if "memory" in entries and "pids" in entries:
            memory = "/sys/fs/cgroup/memory" + entries["memory"].rstrip("/")
            pids = "/sys/fs/cgroup/pids" + entries["pids"].rstrip("/")
            self._try(memory, pids, "v1")

    def _try(self, memory_root, pids_root, kind) -> bool:
        probe = None
        try:
            if kind == "v2":
                controllers = open(os.path.join(memory_root, "cgroup.controllers")).read().split()
                if not {"memory", "pids"} <= set(controllers):
                    return False
            probe = self.create(64 << 20, 8, roots=(memory_root, pids_root), kind=kind)
            self.kind, self.memory_root, self.pids_root = kind, memory_root, pids_root
            return True
        except OSError:
            return False
        finally:
            if probe:
                self.remove(probe)

    def create(self, memory_bytes: int, max_pids: int, roots=None, kind=None) -> list[str]:
        memory_root, pids_root = roots or (self.memory_root, self.pids_root)
        kind = kind or self.kind
        name = f"align-sandbox-{os.getpid()}-{next(self._ids)}"
        made = []
        try:
            if kind == "v2":
                folder = os.path.join(memory_root, name)
                os.mkdir(folder)
                made.append(folder)
                _write(folder, "memory.max", memory_bytes)
                _write(folder, "memory.swap.max", 0, missing_ok=True)
                _write(folder, "pids.max", max_pids)
            else:
                memory, pids = os.path.join(memory_root, name), os.path.join(pids_root, name)
                os.mkdir(memory)
                made.append(memory)
                _write(memory, "memory.limit_in_bytes", memory_bytes)
                _write(memory, "memory.memsw.limit_in_bytes", memory_bytes, missing_ok=True)
                os.mkdir(pids)
                made.append(pids)
                _write(pids, "pids.max", max_pids)
        except OSError:
            self.remove(made)
            raise
        return made

    def kill(self, folders: list[str]) -> None:
        """SIGKILL every process in the groups, again and again, until none is left."""
        for _ in range(200):
            alive = False
            for folder in folders:
                if self.kind == "v2" and os.path.exists(os.path.join(folder, "cgroup.kill")):
                    _write(folder, "cgroup.kill", 1, missing_ok=True)
                for pid in _read_pids(folder):
                    alive = True
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
            if not alive:
                return
            time.sleep(0.0005)

    def remove(self, folders: list[str]) -> None:
        for folder in reversed(folders):
            for _ in range(100):
                try:
                    os.rmdir(folder)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.005)


def _write(folder: str, name: str, value, missing_ok: bool = False) -> None:
    try:
        with open(os.path.join(folder, name), "w") as f:
            f.write(str(value))
    except OSError:
        if not missing_ok:
            raise


def _read_pids(folder: str) -> list[int]:
    try:
        return [int(p) for p in open(os.path.join(folder, "cgroup.procs")).read().split()]
    except (OSError, ValueError):
        return []


_CAPS: dict = {}
_CGROUPS: _Cgroups | None = None


def capabilities() -> dict:
    """What isolation this machine allows, probed once per process."""
    global _CGROUPS
    with _uid_lock:
        if not _CAPS:
            root = os.geteuid() == 0
            netns_flags = CLONE_NEWNET if root else (CLONE_NEWUSER | CLONE_NEWNET)
            ipc_flags = CLONE_NEWIPC if root else (CLONE_NEWUSER | CLONE_NEWIPC)
            _CGROUPS = _Cgroups()
            _CAPS.update({"root": root, "landlock_abi": landlock_abi(),
                          "netns": _in_child(lambda: _libc.unshare(netns_flags) == 0),
                          "ipcns": _in_child(lambda: _libc.unshare(ipc_flags) == 0),
                          "tmpfs": _probe_tmpfs(root), "cgroups": _CGROUPS.kind})
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
    """Live processes of `uid` (zombies are dead already; only their parent can reap them)."""
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


# The environment the zygote (and so every run) starts from: built from nothing, never inherited.
ZYGOTE_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}


class _Zygote:
    """Client of the zygote process (align/tasks/_zygote.py) that forks the isolated children of a run."""

    def __init__(self, python: str, own_netns: bool = False):
        self.own_netns = own_netns
        args = [python, "-I", "-S", "-B", _ZYGOTE_FILE] + (["--own-netns"] if own_netns else [])
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1, start_new_session=True,
                                     env=dict(ZYGOTE_ENV), cwd="/", close_fds=True)
        self._write_lock = threading.Lock()
        self._cond = threading.Condition()
        self._pids: dict[int, list[int]] = {}
        self._status: dict[int, dict[int, tuple[int, str]]] = {}
        self._ids = itertools.count()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self._cond:
                if "pids" in msg:
                    self._pids[msg["id"]] = msg["pids"]
                else:
                    self._status.setdefault(msg["id"], {})[msg["child"]] = (msg["status"], msg.get("verdict", ""))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def start(self, request: dict) -> int:
        rid = next(self._ids)
        with self._write_lock:
            self.proc.stdin.write(json.dumps({**request, "id": rid}) + "\n")
            self.proc.stdin.flush()
        return rid

    def wait(self, rid: int, children, timeout: float | None) -> bool:
        """Until every child index in `children` of request `rid` has exited, or `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not set(children) <= set(self._status.get(rid, {})):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                if not self.alive():
                    raise RuntimeError("the sandbox zygote died")
                self._cond.wait(0.5 if remaining is None else min(remaining, 0.5))
        return True

    def pids(self, rid: int) -> list[int]:
        with self._cond:
            while rid not in self._pids and self.alive():
                self._cond.wait(0.5)
            return list(self._pids.get(rid, []))

    def finish(self, rid: int) -> dict[int, tuple[int, str]]:
        with self._cond:
            self._pids.pop(rid, None)
            return self._status.pop(rid, {})


_ZYGOTE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_zygote.py")
_zygote: _Zygote | None = None
_zygote_lock = threading.Lock()


def _get_zygote(python: str, own_netns: bool) -> _Zygote:
    global _zygote
    with _zygote_lock:
        if _zygote is None or not _zygote.alive():
            if _zygote is not None:  # reap the dead one and close its pipes
                for stream in (_zygote.proc.stdin, _zygote.proc.stdout):
                    try:
                        stream.close()
                    except OSError:
                        pass
                _zygote.proc.wait()
            _zygote = _Zygote(python, own_netns)
        return _zygote


@functools.lru_cache(maxsize=None)
def _python_for_runs(root: bool) -> str:
    return sandbox_python(root)


@functools.lru_cache(maxsize=None)
def sandbox_interpreter_matches() -> bool:
    """The two-process path runs the tests with the sandbox's interpreter; the literal judge
    (literal_tests.py) uses ours. Where they are different versions (`sum` of floats differs between 3.11
    and 3.12), the judge is not used."""
    import subprocess

    python = _python_for_runs(capabilities()["root"])
    if python == sys.executable:
        return True
    try:
        out = subprocess.run([python, "-I", "-S", "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                             text=True, timeout=30, env={"PATH": "/usr/bin:/bin"}).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return False
    return out == str(tuple(sys.version_info[:2]))


@functools.lru_cache(maxsize=None)
def candidate_read_paths() -> list[str]:
    """Where the candidate side of a verification may read: the system's and the interpreter's folders
    (not /proc, /sys, /tmp, /root or /home: no other process's memory, no other run's files, no token)."""
    paths = {"/usr", "/lib", "/lib32", "/lib64", "/bin", "/sbin", "/etc", "/dev", sys.base_prefix, sys.prefix,
             sys.exec_prefix, sys.base_exec_prefix, os.path.dirname(os.path.realpath(sys.executable))}
    return sorted(p for p in paths if p and os.path.exists(p))  # (a list: the cache hands out the same one)


@dataclass
class _ChildSpec:
    code: str
    filename: str
    stdin: str = ""
    pipe_fds: dict = field(default_factory=dict)
    verdict_fd: int | None = None
    read_paths: list[str] | None = None
    judge_fds: tuple[int, int] | None = None  # (calls in, replies out): FIFOs whose other ends are `_run`'s judge


def _run(children: list[_ChildSpec], limits: SandboxLimits, pipes: int = 0, primary: int = 0, judge=None):
    """Fork `children` (connected by `pipes` pipes) under the limits; wait for child `primary` up to the
    timeout; then kill every process of the run and return ([SandboxResult per child], [verdict text]).
    With `judge` (a literal_tests.Judge), the primary reads the judge's `outgoing` bytes on its first
    `judge_fds` and its replies go to `judge.feed` as they come; the run ends once the judge has decided."""
    caps = capabilities()
    root, netns, landlock, tmpfs = caps["root"], caps["netns"], caps["landlock_abi"], caps["tmpfs"]
    cgroups = _CGROUPS if caps["cgroups"] != "none" else None
    # As root the zygote makes one empty network namespace that every run inherits (an unshare per run costs
    # ~0.7 ms); as a normal user each child makes its own, inside its user namespace.
    shared_netns = root and netns
    prepared, requests = [], []
    # One cgroup for the whole run (both sides of a verification, and everything they fork): memory_mb and
    # max_processes bound the run, not each process.
    run_groups = cgroups.create(limits.memory_mb << 20, limits.max_processes + len(children)) if cgroups else []
    out_dir, emptied, limits_dict, streams = None, False, asdict(limits), None
    try:
        # One folder of ours (root's or ours, 0700: out of every child's reach) for the run's programs and
        # captured output; a workdir per child, owned by its uid.
        out_dir = tempfile.mkdtemp(prefix="align-sandbox-out-")
        for index, spec in enumerate(children):
            workdir = tempfile.mkdtemp(prefix="align-sandbox-")
            os.chmod(workdir, 0o700)
            uid = _claim_uid() if root else None
            if uid is not None:
                os.chown(workdir, uid, uid)
            groups = run_groups
            paths = {name: os.path.join(out_dir, f"{index}.{name}") for name in ("stdout", "stderr")}
            prepared.append((workdir, paths, uid, groups))
            program = os.path.join(out_dir, f"{index}.py")  # read before privileges drop
            with open(program, "w") as f:
                f.write(spec.code if netns else _NO_SOCKET_PRELUDE + spec.code)
            paths["stdin"] = os.devnull
            if spec.stdin:
                paths["stdin"] = os.path.join(out_dir, f"{index}.stdin")
                with open(paths["stdin"], "w") as f:
                    f.write(spec.stdin)
            read_fds, write_fds = {}, {}
            if spec.judge_fds is not None and index == primary and judge is not None:
                calls, replies = os.path.join(out_dir, f"{index}.calls"), os.path.join(out_dir, f"{index}.replies")
                os.mkfifo(calls, 0o600)
                os.mkfifo(replies, 0o600)
                # (ours open first, so the child's opens never wait: O_RDWR is a writer the child's read end finds)
                streams = (os.open(calls, os.O_RDWR | os.O_NONBLOCK),)  # (one at a time: closed in `finally`)
                streams += (os.open(replies, os.O_RDONLY | os.O_NONBLOCK),)
                read_fds[str(spec.judge_fds[0])], write_fds[str(spec.judge_fds[1])] = calls, replies
            requests.append({"read_fds": read_fds, "write_fds": write_fds,
                             "workdir": workdir, "program": program, "filename": spec.filename, **paths,
                             "limits": limits_dict, "uid": uid, "netns": netns and not shared_netns, "root": root,
                             "landlock_abi": landlock, "cgroups": groups, "ipcns": caps["ipcns"],
                             "tmpfs_mb": limits.max_disk_mb if tmpfs else None, "pipe_fds": spec.pipe_fds,
                             "verdict_fd": spec.verdict_fd, "read_paths": spec.read_paths if landlock else None})
        zygote = _get_zygote(_python_for_runs(root), shared_netns)
        start = time.monotonic()
        rid = zygote.start({"pipes": pipes, "children": requests})
        if streams is None:
            finished = zygote.wait(rid, [primary], limits.timeout_s)
        else:
            finished = _follow(zygote, rid, primary, streams, judge, start + limits.timeout_s)
        duration = time.monotonic() - start
        # Whatever happened, nothing any child started survives the run.
        pids = zygote.pids(rid)
        # (without cgroups or a uid of its own, the descendants are found before the children die: after, they
        # belong to the zygote, the subreaper, and can no longer be told from other runs')
        strays = [c for pid in pids for c in _descendants(pid)] if not root and not cgroups else []
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for child in strays:
            try:
                os.kill(child, signal.SIGKILL)
            except OSError:
                pass
        zygote.wait(rid, range(len(children)), None)
        if run_groups:
            cgroups.kill(run_groups)  # no process can leave its cgroup: when it is empty, the run is gone
            emptied = True
        for workdir, paths, uid, groups in prepared:
            if not groups and uid is not None:
                _kill_uid(uid)
        statuses = zygote.finish(rid)
        results, verdicts = [], []
        for index, (workdir, paths, uid, groups) in enumerate(prepared):
            wait_status, verdict = statuses[index]
            exit_code = os.waitstatus_to_exitcode(wait_status)
            status = "ok" if (finished or index != primary) else "timeout"
            if status == "ok":
                if exit_code in (124, 125, 126) and duration < 0.5:
                    status = "error"  # the sandbox itself could not be set up
                elif exit_code < 0:
                    status = "killed"  # a signal: CPU limit, file-size limit, memory
                elif exit_code != 0:
                    status = "error"
            stdout, out_trunc = _read_capped(paths["stdout"], limits.max_output_bytes)
            stderr, err_trunc = _read_capped(paths["stderr"], limits.max_output_bytes)
            results.append(SandboxResult(
                status=status, exit_code=exit_code, duration_s=round(duration, 3), stdout=stdout, stderr=stderr,
                stdout_truncated=out_trunc, stderr_truncated=err_trunc,
                network="namespace" if netns else "sockets-disabled",
                extra={"filesystem": "landlock" if landlock else ("uid" if uid is not None else "none"),
                       "memory": f"cgroup-{cgroups.kind}" if groups else "rlimit-per-process",
                       "disk": "tmpfs" if tmpfs else "file-size-limit"}))
            verdicts.append(verdict)
        return results, verdicts
    finally:
        if run_groups:
            if not emptied:
                cgroups.kill(run_groups)
            cgroups.remove(run_groups)
        for workdir, paths, uid, groups in prepared:
            _remove_tree(workdir)  # (empty where the run had its own tmpfs over it)
            if uid is not None:
                with _uid_lock:
                    _uids_in_use.discard(uid)
        for fd in streams or ():
            os.close(fd)
        if out_dir:
            _remove_tree(out_dir)


def _follow(zygote, rid: int, primary: int, streams: tuple[int, int], judge, deadline: float) -> bool:
    """Write the judge's calls to child `primary` and feed it the replies, until the judge decides, the
    child ends (True) or the deadline passes (False)."""
    calls, replies = streams
    poller = select.poll()
    poller.register(replies, select.POLLIN)
    poller.register(calls, 0)
    watching_calls = False

    def drain() -> bool:
        while True:
            try:
                data = os.read(replies, 1 << 16)
            except BlockingIOError:
                return False
            if not data or judge.feed(data):
                return bool(data)

    while True:
        if judge.verdict is not None or judge.undecided:
            return True  # (tests whose asserts call nothing are decided before the child runs a line)
        if judge.outgoing:
            try:
                del judge.outgoing[:os.write(calls, judge.outgoing)]
            except BlockingIOError:
                pass
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if bool(judge.outgoing) != watching_calls:  # (a call that did not fit the FIFO: wait until it can go)
            watching_calls = bool(judge.outgoing)
            poller.modify(calls, select.POLLOUT if watching_calls else 0)
        # (a FIFO whose writer has not opened it yet polls as empty: the child's exit is checked meanwhile)
        events = dict(poller.poll(min(remaining, 0.05) * 1000))
        if events.get(replies):
            try:
                data = os.read(replies, 1 << 16)
            except BlockingIOError:
                continue
            if data:
                if judge.feed(data):
                    return True
                continue
            # The writer closed its end: the child is ending.
            exited = zygote.wait(rid, [primary], max(deadline - time.monotonic(), 0))
            return drain() or exited
        if not events and zygote.wait(rid, [primary], 0):
            return drain() or True


def _remove_tree(folder: str) -> None:
    try:
        os.rmdir(folder)
    except FileNotFoundError:
        pass
    except OSError:
        shutil.rmtree(folder, ignore_errors=True)


def run_python(code: str, limits: SandboxLimits | None = None, stdin: str | None = None) -> SandboxResult:
    """Run `code` as a Python program under the sandbox's limits and return what happened. A program that
    does not compile is reported as such (compiling runs none of it)."""
    try:
        compile(code, "main.py", "exec")
    except (SyntaxError, ValueError) as err:
        message = "".join(__import__("traceback").format_exception_only(type(err), err)).strip()
        return SandboxResult(status="error", exit_code=1, duration_s=0.0, stdout="", stderr=message,
                             network="not started", extra={"compiled": False})
    results, _ = _run([_ChildSpec(code=code, filename="main.py", stdin=stdin or "")], limits or SandboxLimits())
    return results[0]


@dataclass
class TestOutcome:
    passed: bool
    observation: str
    isolation: str  # process: tests and candidate apart | in-process: together (the tests could not be split)
    status: str  # ok | timeout | killed | error (of the process that decided)
    candidate: SandboxResult
    calls: int = 0

    @classmethod
    def timed_out(cls, limits: SandboxLimits, isolation: str, candidate: SandboxResult, calls: int = 0):
        return cls(False, f"Timed out after {limits.timeout_s:g} seconds.", isolation, "timeout", candidate, calls)


def run_tests_isolated(code: str, tests: str, entry_point: str, prompt: str = "",
                       limits: SandboxLimits | None = None) -> TestOutcome:
    """The problem's tests against the candidate's code, judged where the candidate cannot reach.

    Tests made only of literal asserts (align/tasks/literal_tests.py) are judged in this process: the
    candidate runs alone in the sandbox, gets the calls' arguments and streams back its results as built-in
    values. Any other tests run as the tests' `check(candidate)` in a sandboxed process of their own, the
    candidate's code in another, the verdict coming from the tests' side over a pipe; that falls back to one
    process (labelled) when the tests pass the candidate something that can't cross, or name what only the
    candidate defines."""
    limits = limits or SandboxLimits()
    harness = "from _harness import run_in_process, run_tests, serve\n"  # preloaded in the zygote
    literal = literal_tests.plan(tests, entry_point, prompt) if sandbox_interpreter_matches() else None
    if literal is None:
        return _run_tests_split(code, tests, entry_point, prompt, limits, harness)
    judge = literal_tests.Judge(literal)
    candidate_side = _ChildSpec(code=f"{harness}serve({code!r}, {entry_point!r})\n", filename="harness.py",
                                judge_fds=(3, 4), read_paths=candidate_read_paths())
    (result,), _ = _run([candidate_side], limits, judge=judge)
    if judge.undecided:
        # A reply too costly to judge in this process: the tests' own process judges, under the sandbox's
        # limits, with a timeout of its own (an honest solution that returns something big late must not
        # lose for it; a candidate can at most double the time its verification takes).
        return _run_tests_split(code, tests, entry_point, prompt, limits, harness)
    if judge.verdict is None and result.status == "timeout":
        return TestOutcome.timed_out(limits, _split_isolation(), result, len(judge.results))
    verdict = judge.finish(gone=True)
    return TestOutcome(verdict["passed"] is True, _outcome_observation(verdict, result), _split_isolation(), "ok",
                       result, int(verdict.get("calls") or 0))


def _run_tests_split(code: str, tests: str, entry_point: str, prompt: str, limits: SandboxLimits,
                     harness: str) -> TestOutcome:
    tests_side = _ChildSpec(code=f"{harness}run_tests({prompt!r}, {tests!r}, {entry_point!r})\n",
                            filename="harness.py", pipe_fds={"3": [0, "w"], "4": [1, "r"]}, verdict_fd=5)
    candidate_side = _ChildSpec(code=f"{harness}serve({code!r}, {entry_point!r})\n", filename="harness.py",
                                pipe_fds={"3": [0, "r"], "4": [1, "w"]}, read_paths=candidate_read_paths())
    start = time.monotonic()
    (tests_result, candidate_result), (verdict_text, _) = _run([tests_side, candidate_side], limits, pipes=2)
    verdict = _parse_verdict(verdict_text)
    if verdict is not None and verdict.get("split") is False:
        # The same deadline for both tries: the fallback gets what the split run left of the timeout.
        left = limits.timeout_s - (time.monotonic() - start)
        if left < LIMIT_BOUNDS["timeout_s"][0]:
            return TestOutcome.timed_out(limits, "in-process", candidate_result)
        single = _ChildSpec(code=f"{harness}run_in_process({code!r}, {prompt!r}, {tests!r}, {entry_point!r})\n",
                            filename="harness.py", verdict_fd=5, read_paths=candidate_read_paths())
        (result,), (text,) = _run([single], replace(limits, timeout_s=left))
        if result.status == "timeout":
            return TestOutcome.timed_out(limits, "in-process", result)
        verdict = _parse_verdict(text) or {}
        return TestOutcome(verdict.get("passed") is True and result.status == "ok",
                           _outcome_observation(verdict, result), "in-process", result.status, result)
    if tests_result.status == "timeout":
        return TestOutcome.timed_out(limits, "process", candidate_result)
    if verdict is None:
        return TestOutcome(False, "The tests could not run (the test side ended without a verdict).", "process",
                           tests_result.status, candidate_result)
    passed = verdict.get("passed") is True
    return TestOutcome(passed, _outcome_observation(verdict, candidate_result), _split_isolation(),
                       tests_result.status, candidate_result, int(verdict.get("calls") or 0))


def _split_isolation() -> str:
    """Apart, but not out of reach, without root (another uid) or Landlock (reads and writes confined): the
    candidate could then read the tests' program, or write another run's, as the same user."""
    caps = capabilities()
    return "process" if caps["root"] or caps["landlock_abi"] else "process-unconfined"


def _parse_verdict(text: str) -> dict | None:
    """The tests' side's verdict; anything else (garbage a fallback's candidate wrote) is no verdict."""
    try:
        verdict = json.loads(text) if text else None
    except (ValueError, RecursionError):
        return None
    return verdict if isinstance(verdict, dict) else None


def _outcome_observation(verdict: dict, candidate: SandboxResult) -> str:
    """What the actor sees: its output when it passed; else the failing test or its own traceback."""
    printed = candidate.stdout.strip()[-2000:]
    if verdict.get("passed"):
        return printed or "All tests passed."
    observation = str(verdict.get("observation") or "").strip()
    if verdict.get("gone"):
        if candidate.stderr.strip():
            observation += "\n" + "\n".join(candidate.stderr.strip().splitlines()[-12:])
        if candidate.status == "killed":
            observation += "\nThe program was killed (a memory, CPU or file-size limit)."
    return (observation or printed or "The tests failed.").strip()
