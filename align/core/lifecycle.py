"""Stopping and locking like a long job: signals, the tree of processes a command started, one writer per folder.

- A stop signal (SIGTERM, SIGINT, SIGHUP; a training stage also SIGUSR1) raises `Interrupted` where the
  command is, or, inside `deferred()` (a training loop, a supervised child), is only recorded: the training
  loop saves a checkpoint at the next step boundary and stops; a supervisor passes SIGTERM on to the
  processes it started, waits up to the grace period (ALIGN_STOP_GRACE seconds, default 30), then kills
  what is left. The command exits with 128 + the signal.
- Every process `start` runs gets SIGKILL when its parent dies (PR_SET_PDEATHSIG), and an align command
  started by one (ALIGN_SUPERVISED in its environment) arms the same for itself: kill -9 of `align run`
  takes its stage down with it, and the stage writes nothing more.
- `lock_folder` holds an flock on FOLDER/.align.lock for the process's life: a second writer is refused in
  one line naming the holder's pid; the lock of a dead process is gone with it (the kernel drops it).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from align.core.errors import AlignError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
GRACE_ENV = "ALIGN_STOP_GRACE"
SUPERVISED_ENV = "ALIGN_SUPERVISED"  # the pid of the align process that started this one, through any launcher
LOCK_NAME = ".align.lock"

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_libc = None
_requested: int | None = None
_deferred = 0
_locks: dict[str, int] = {}  # resolved folder -> fd of its held lock


class Interrupted(BaseException):
    """A stop signal arrived: unwinds like KeyboardInterrupt (cleanup runs), ends in exit 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal_name(signum)}")
        self.signum = signum
        self.code = 128 + signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def grace_seconds() -> float:
    value = os.environ.get(GRACE_ENV, "30")
    try:
        grace = float(value)
    except ValueError:
        raise AlignError(f"{GRACE_ENV}: {value!r} is not a number of seconds") from None
    if grace < 0:
        raise AlignError(f"{GRACE_ENV}: {value!r} must be 0 or more seconds")
    return grace


# ------------------------------------------------------------------ signals
def _handler(signum, frame):
    global _requested
    if _requested is None:
        _requested = signum
    if not _deferred:
        raise Interrupted(signum)


def install(signals=STOP_SIGNALS) -> None:
    """Stop signals raise Interrupted (or are recorded, inside `deferred()`). Main thread only. A signal
    ignored when the command started stays ignored (`nohup align run ...` goes on after its terminal closes)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in signals:
        if signal.getsignal(signum) != signal.SIG_IGN:
            signal.signal(signum, _handler)


def requested() -> int | None:
    """The first stop signal received, if any."""
    return _requested


def reset() -> None:
    """Forget a recorded signal (tests run several commands in one process)."""
    global _requested
    _requested = None


@contextlib.contextmanager
def deferred():
    """Inside, a stop signal is recorded (see requested()) instead of raised: the code inside stops itself."""
    global _deferred
    _deferred += 1
    try:
        yield
    finally:
        _deferred -= 1


# ------------------------------------------------------------------ processes
def _load_libc() -> bool:
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc is not None


def _prctl(option: int, value: int) -> bool:
    return _load_libc() and _libc.prctl(option, value, 0, 0, 0) == 0


def _die_with_parent_preexec():  # runs in the child between fork and exec: the libc handle is loaded already
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def die_with_parent() -> None:
    """An align process started by another (ALIGN_SUPERVISED set) is killed when its parent dies; where the
    kernel cannot do that, a thread polls the parent and exits."""
    supervisor = os.environ.get(SUPERVISED_ENV)
    if not supervisor:
        return
    parent = os.getppid()
    if not _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL):
        def watch():
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(128 + signal.SIGKILL)

        threading.Thread(target=watch, daemon=True, name="align-parent-watch").start()
    if os.getppid() != parent or not _alive(int(supervisor)):  # it died before the kernel was told
        os._exit(128 + signal.SIGKILL)


def become_supervisor() -> None:
    """Orphaned descendants are handed to this process (not init), so stop_tree still finds them."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def start(cmd: list[str], **popen) -> subprocess.Popen:
    """Popen in a session of its own (a terminal's Ctrl-C reaches this process only, which stops the tree),
    killed when this process dies; align commands below it know they are supervised."""
    env = dict(popen.pop("env", None) or os.environ)
    env[SUPERVISED_ENV] = str(os.getpid())
    preexec = _die_with_parent_preexec if _load_libc() else None
    return subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=preexec, **popen)


def descendants(root: int | None = None) -> list:
    import psutil

    try:
        return psutil.Process(root or os.getpid()).children(recursive=True)
    except psutil.Error:
        return []


def _signal_all(procs, signum: int) -> None:
    import psutil

    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signum)


def _living(procs) -> list:
    import psutil

    living = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE:
                living.append(proc)
    return living


def _reap() -> None:
    """Collect adopted orphans that have exited (this process is their subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def stop_tree(proc: subprocess.Popen | None, grace: float | None = None, spare: tuple[int, ...] = ()) -> None:
    """SIGTERM to every descendant (but `spare`: a launcher such as `accelerate launch`, which kills its
    worker 5 s after a SIGTERM, where the worker may need longer to save a checkpoint; it ends when its
    worker does), then wait for them all up to `grace` seconds, then SIGKILL to whatever is left."""
    import psutil

    grace = grace_seconds() if grace is None else grace
    _signal_all([p for p in descendants() if p.pid not in spare], signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc is not None:
            proc.poll()
        _reap()
        if not _living(descendants()):
            break
        time.sleep(0.1)
    left = descendants()
    _signal_all(left, signal.SIGKILL)
    if proc is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of its session is not a descendant any more
    psutil.wait_procs(left, timeout=5)
    if proc is not None:
        proc.wait()
    _reap()


def wait(proc: subprocess.Popen, spare_launcher: bool = False, poll_s: float = 0.2) -> int:
    """The child's exit status; a stop signal meanwhile stops its whole tree (stop_tree) and raises
    Interrupted. `spare_launcher`: the child is a launcher (accelerate) whose workers are signalled."""
    with deferred():
        while True:
            try:
                code = proc.wait(timeout=poll_s)
                break
            except subprocess.TimeoutExpired:
                pass
            if _requested is not None:
                stop_tree(proc, spare=(proc.pid,) if spare_launcher else ())
                raise Interrupted(_requested)
        if _requested is not None:  # it ended as the signal came (or the signal reached it too)
            stop_tree(proc, grace=0)
            if code != 0:
                raise Interrupted(_requested)
    return code


def supervise(cmd: list[str], spare_launcher: bool = False, **popen) -> int:
    return wait(start(cmd, **popen), spare_launcher)


# ------------------------------------------------------------------ one writer per folder
def lock_folder(folder: str | os.PathLike, what: str) -> bool:
    """Hold FOLDER/.align.lock for this process's life (idempotent). Held by another live process: one line
    naming it; held by an ancestor of this one (the `align run` or launcher that started it): that is this
    stage's own lock, and this process goes on under it. True: this call took the lock (held already by
    this process or an ancestor: False)."""
    import fcntl

    folder = Path(folder)
    key = str(folder.resolve())
    if key in _locks:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        pid = holder.get("pid")
        if isinstance(pid, int) and pid in _ancestors():
            return False
        if not isinstance(pid, int):
            raise AlignError(f"{folder}: being written by another process (it holds {path})") from None
        since = time.strftime("%H:%M:%S", time.localtime(holder.get("started") or time.time()))
        raise AlignError(f"{folder}: being written by pid {pid} ({holder.get('command') or 'align'}, since {since}); "
                         f"wait for it to end, or stop it with kill {pid}") from None
    record = json.dumps({"pid": os.getpid(), "command": what, "started": time.time()})
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode(), 0)
    _locks[key] = fd
    return True


def unlock_folder(folder: str | os.PathLike) -> None:
    fd = _locks.pop(str(Path(folder).resolve()), None)
    if fd is not None:
        os.close(fd)  # the flock goes with the last descriptor of it


def _holder(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return data if isinstance(data, dict) else {}
    except (ValueError, OSError):
        return {}


def _ancestors() -> set[int]:
    import psutil

    try:
        return {p.pid for p in psutil.Process().parents()}
    except psutil.Error:
        return set()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike):
    """A text file written through a temporary file beside it and a rename: a kill (or a full disk) leaves the
    old file or the new one, whole, never a part; the temporary file goes when the write fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """Write JSON through a temporary file and a rename: a kill leaves the old file or the new, whole."""
    with atomic_write(path) as f:
        f.write(json.dumps(data, indent=2))
