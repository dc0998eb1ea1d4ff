"""Sandbox zygote: a small stdlib-only process that forks one child per run (no interpreter start-up).

Protocol (JSON lines): requests on stdin `{"id", "workdir", "program", "stdin", "stdout", "stderr",
"limits": {...}, "uid", "netns", "root", "landlock_abi"}`; replies on stdout `{"id", "pid"}` once
the child is forked and `{"id", "status"}` (a raw wait status) once it has exited.

The child: new session, network namespace, rlimits, own uid (as root), Landlock write confinement,
fds 0/1/2 on the run's files and nothing else open, then the program's code runs as `__main__`.
This file must stay importable by a bare interpreter: the standard library only.
"""

import ctypes
import json
import os
import resource
import sys
import threading
import traceback

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

_SYS_LANDLOCK_CREATE, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT = 444, 445, 446
_PR_SET_NO_NEW_PRIVS = 38
_LL_WRITE_RIGHTS_V1 = sum(1 << b for b in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))
_LL_REFER, _LL_TRUNCATE = 1 << 13, 1 << 14


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_writes_only_under(paths, abi):
    rights = _LL_WRITE_RIGHTS_V1 | (_LL_REFER if abi >= 2 else 0) | (_LL_TRUNCATE if abi >= 3 else 0)
    handled = ctypes.c_uint64(rights)
    fd = _libc.syscall(_SYS_LANDLOCK_CREATE, ctypes.byref(handled), ctypes.c_size_t(8), ctypes.c_uint32(0))
    if fd < 0:
        return False
    for path in paths:
        allowed = rights if os.path.isdir(path) else ((1 << 1) | (_LL_TRUNCATE if abi >= 3 else 0))
        pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = _PathBeneath(allowed, pfd)
        _libc.syscall(_SYS_LANDLOCK_ADD_RULE, ctypes.c_int(fd), ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0))
        os.close(pfd)
    _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    ok = _libc.syscall(_SYS_LANDLOCK_RESTRICT, ctypes.c_int(fd), ctypes.c_uint32(0)) == 0
    os.close(fd)
    return ok


def count_uid_processes(uid):
    n = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                n += os.stat("/proc/" + entry).st_uid == uid
            except OSError:
                pass
    return n


def child(req):
    """Runs in the forked child: isolate, then run the program. Never returns."""
    try:
        limits = req["limits"]
        os.setsid()
        fd_in = os.open(req["stdin"], os.O_RDONLY)
        fd_out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        fd_err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        for src, dst in ((fd_in, 0), (fd_out, 1), (fd_err, 2)):
            os.dup2(src, dst)
        os.closerange(3, 65536)
        with open(req["program"]) as f:  # read while still privileged: the program lives outside workdir
            code = compile(f.read(), req["program"], "exec")
        if req["netns"] and _libc.unshare(CLONE_NEWNET if req["root"] else (CLONE_NEWUSER | CLONE_NEWNET)) != 0:
            os._exit(126)
        cpu = int(limits["timeout_s"]) + 1
        mem = limits["memory_mb"] * 1024 * 1024
        fcap = max(limits["max_output_bytes"] * 2, limits["max_file_bytes"])
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (fcap, fcap))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits["max_open_files"], limits["max_open_files"]))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        uid = req["uid"]
        if uid is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_processes"], limits["max_processes"]))
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        else:
            cap = count_uid_processes(os.getuid()) + limits["max_processes"]
            resource.setrlimit(resource.RLIMIT_NPROC, (cap, cap))
        if req["landlock_abi"] and not landlock_writes_only_under([req["workdir"], "/dev/null"], req["landlock_abi"]):
            os._exit(125)
        os.chdir(req["workdir"])
        os.environ.clear()
        os.environ.update({"PATH": "/usr/bin:/bin", "HOME": req["workdir"], "TMPDIR": req["workdir"], "LANG": "C.UTF-8"})
        sys.argv = [req["program"]]
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
    except BaseException:
        os._exit(124)
    status = 0
    try:
        exec(code, {"__name__": "__main__", "__file__": req["program"], "__builtins__": __builtins__})
    except SystemExit as exit_:
        code_ = exit_.code
        status = code_ if isinstance(code_, int) else (0 if code_ is None else 1)
        if not isinstance(code_, (int, type(None))):
            print(code_, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        status = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    os._exit(status & 0xFF)


def main():
    out_lock = threading.Lock()
    fork_lock = threading.Lock()  # the reaper may only look a pid up once it is recorded
    pids = {}

    def reply(obj):
        with out_lock:
            sys.__stdout__.write(json.dumps(obj) + "\n")
            sys.__stdout__.flush()

    def reaper():
        while True:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                threading.Event().wait(0.01)
                continue
            with fork_lock:
                rid = pids.pop(pid, None)
            if rid is not None:
                reply({"id": rid, "status": status})

    threading.Thread(target=reaper, daemon=True).start()
    for line in sys.stdin:
        req = json.loads(line)
        with fork_lock:
            pid = os.fork()
            if pid == 0:
                child(req)
            pids[pid] = req["id"]
        reply({"id": req["id"], "pid": pid})


if __name__ == "__main__":
    main()
