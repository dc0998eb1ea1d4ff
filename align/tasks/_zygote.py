"""Sandbox zygote: a small stdlib-only process that forks the isolated children of each run.

It is started once, with an environment built from nothing (no variable of the parent reaches it, so
none can be read back from /proc/self/environ of a child), and forks one or two children per run
without starting an interpreter. Requests on stdin, one JSON line each:

    {"id": N, "pipes": K, "children": [CHILD, ...]}

CHILD: {"workdir", "program", "stdin", "stdout", "stderr", "limits": {...}, "uid", "netns", "root",
"landlock_abi", "cgroups": [dir, ...], "tmpfs_mb", "pipe_fds": {"3": [pipe, "r"|"w"], ...},
"verdict_fd": fd or null, "read_paths": [...] or null}

Replies on stdout: `{"id", "pids": [...]}` once the children are forked, then for each child
`{"id", "child": i, "status": wait status, "verdict": text}` once it has exited; `verdict` is what the
child wrote to its verdict pipe (a pipe, not a file, so no other process can write it).

A child: new session, its cgroups (memory and pids), new network and mount namespaces, a private
tmpfs as its directory (the run's disk quota), rlimits, its own uid (as root), Landlock (writes only
beneath its directory; reads, where asked, only beneath read_paths), non-dumpable, fds 0/1/2 on the
run's files plus its pipes and nothing else, a minimal environment, then the program as `__main__`.
This file must stay importable by a bare interpreter: the standard library only.
"""

import ctypes
import gc
import json
import os
import resource
import sys
import threading
import traceback

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 2, 4, 1 << 14, 1 << 18
PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = 4, 38, 36
_libc = ctypes.CDLL(None, use_errno=True)

_SYS_LANDLOCK_CREATE, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT = 444, 445, 446
_LL_EXECUTE, _LL_WRITE_FILE, _LL_READ_FILE, _LL_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_LL_WRITE_RIGHTS_V1 = sum(1 << b for b in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))
_LL_REFER, _LL_TRUNCATE = 1 << 13, 1 << 14

# Exit codes of a child whose isolation could not be set up (the parent reports "error", never a run).
SETUP_FAILED, LANDLOCK_FAILED, NETNS_FAILED = 124, 125, 126


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


# ABI 4: TCP bind and connect, handled with no rule, are denied. ABI 6: no abstract unix socket and no
# signal reaches a process outside the child's own Landlock domain (another run, the tests' side, us).
_LL_NET_TCP = 1 | 2
_LL_SCOPE_ABSTRACT_UNIX, _LL_SCOPE_SIGNAL = 1, 2


def landlock(write_paths, read_paths, abi):
    """Writes only beneath write_paths; if read_paths is a list, reads (and execution) only beneath those
    and write_paths. Returns False when the ruleset can't be applied."""
    write = _LL_WRITE_RIGHTS_V1 | (_LL_REFER if abi >= 2 else 0) | (_LL_TRUNCATE if abi >= 3 else 0)
    read = _LL_EXECUTE | _LL_READ_FILE | _LL_READ_DIR
    handled = write | (read if read_paths is not None else 0)
    attr = _RulesetAttr(handled, _LL_NET_TCP if abi >= 4 else 0,
                        (_LL_SCOPE_ABSTRACT_UNIX | _LL_SCOPE_SIGNAL) if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    fd = _libc.syscall(_SYS_LANDLOCK_CREATE, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if fd < 0:
        return False
    rules = [(p, handled) for p in write_paths] + [(p, read) for p in (read_paths or [])]
    for path, rights in rules:
        try:
            pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        if not os.path.isdir(path):
            rights &= _LL_EXECUTE | _LL_WRITE_FILE | _LL_READ_FILE | (_LL_TRUNCATE if abi >= 3 else 0)
        rule = _PathBeneath(rights, pfd)
        _libc.syscall(_SYS_LANDLOCK_ADD_RULE, ctypes.c_int(fd), ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0))
        os.close(pfd)
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
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


def _arrange_fds(wanted):
    """Make exactly `wanted` ({target fd: source fd}) open, every other descriptor closed."""
    import fcntl

    staged = {target: fcntl.fcntl(source, fcntl.F_DUPFD, 1000) for target, source in wanted.items()}
    os.closerange(0, 1000)
    low = 1000
    for fd in sorted(staged.values()):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 65536)
    for target, source in staged.items():
        os.dup2(source, target, inheritable=True)
        os.close(source)


def _private_tmpfs(path, size_mb, uid):
    if _libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return False
    options = f"size={int(size_mb)}m,mode=0700" + (f",uid={uid},gid={uid}" if uid is not None else "")
    return _libc.mount(b"tmpfs", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options.encode()) == 0


def child(req, fds):
    """Runs in the forked child: isolate, then run the program. Never returns."""
    try:
        limits = req["limits"]
        os.setsid()
        wanted = {0: os.open(req["stdin"], os.O_RDONLY),
                  1: os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                  2: os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), **fds}
        for target, path in (req.get("read_fds") or {}).items():  # files of ours the run may only read
            wanted[int(target)] = os.open(path, os.O_RDONLY)
        for target, path in (req.get("write_fds") or {}).items():  # FIFOs whose reader is the verifier
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # (no reader: fails at once, never hangs)
            os.set_blocking(fd, True)
            wanted[int(target)] = fd
        _arrange_fds(wanted)
        with open(req["program"]) as f:  # read while still privileged: the program lives outside workdir
            code = compile(f.read(), req.get("filename") or req["program"], "exec")
        for cgroup in req.get("cgroups") or []:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        # Its own IPC namespace (where the machine allows it): SysV shared memory made by the run dies with
        # it, and no run reaches another's. As a normal user all namespaces come inside a user namespace,
        # which then maps our uid onto itself (without a map no file could be created on its tmpfs).
        own_uid, own_gid = os.getuid(), os.getgid()
        processes_of_ours = count_uid_processes(own_uid) if req["uid"] is None else 0
        flags = ((CLONE_NEWNET if req["netns"] else 0) | (CLONE_NEWNS if req.get("tmpfs_mb") else 0)
                 | (CLONE_NEWIPC if req.get("ipcns") else 0))
        if flags and not req["root"]:
            flags |= CLONE_NEWUSER
        if flags and _libc.unshare(flags) != 0:
            os._exit(NETNS_FAILED)
        if flags & CLONE_NEWUSER:
            for name, text in (("setgroups", "deny"), ("uid_map", f"{own_uid} {own_uid} 1"),
                               ("gid_map", f"{own_gid} {own_gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        uid = req["uid"]
        if req.get("tmpfs_mb") and not _private_tmpfs(req["workdir"], req["tmpfs_mb"], uid):
            os._exit(SETUP_FAILED)
        cpu = int(limits["timeout_s"]) + 1
        mem = limits["memory_mb"] * 1024 * 1024
        fcap = max(limits["max_output_bytes"] * 2, limits["max_file_bytes"])
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (fcap, fcap))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits["max_open_files"], limits["max_open_files"]))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if uid is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_processes"], limits["max_processes"]))
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        else:
            cap = processes_of_ours + limits["max_processes"]  # counted before the user namespace
            resource.setrlimit(resource.RLIMIT_NPROC, (cap, cap))
        if req["landlock_abi"] and not landlock([req["workdir"], "/dev/null"], req.get("read_paths"),
                                                req["landlock_abi"]):
            os._exit(LANDLOCK_FAILED)
        _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # no other process of this uid reads our memory or fds
        os.chdir(req["workdir"])
        os.environ.clear()
        os.environ.update({"PATH": "/usr/bin:/bin", "HOME": req["workdir"], "TMPDIR": req["workdir"],
                           "LANG": "C.UTF-8"})
        sys.argv = [req.get("filename") or req["program"]]
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        del req, fds, wanted
    except BaseException:
        os._exit(SETUP_FAILED)
    status = 0
    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
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


def _drain(fd):
    """What a child wrote to its verdict pipe (at most 1 MiB), without waiting on a descendant that
    still holds the pipe open."""
    os.set_blocking(fd, False)
    chunks, size = [], 0
    while size < 1 << 20:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            break
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
        size += len(data)
    os.close(fd)
    return b"".join(chunks).decode("utf-8", "replace")


# Imported once here, so a run does not pay for them: the harness's own, and what model-written code and
# test files import most (HumanEval's prompts import typing, math, re, hashlib, collections).
PRELOAD = ("base64", "bisect", "collections", "functools", "hashlib", "heapq", "itertools", "linecache", "math",
           "random", "re", "string", "struct", "traceback", "typing")


def _preload_harness():
    """The verification harness (stdlib only), compiled once here: every child is a fork that has it."""
    import importlib
    import importlib.util

    for name in PRELOAD:
        importlib.import_module(name)

    spec = importlib.util.spec_from_file_location("_harness", os.path.join(os.path.dirname(__file__), "_harness.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["_harness"] = module
    spec.loader.exec_module(module)
    # The compiler's first use in a process costs ~1 ms (its state is set up lazily): pay it here, once.
    compile("warm = [i for i in range(2)]\n", "<warm>", "exec")
    # Everything so far lives as long as the zygote: out of the collector's sight, so that a collection in a
    # child does not touch (and so copy) every inherited page.
    gc.collect()
    gc.freeze()


def main():
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans of a run come back to us to be reaped
    if "--own-netns" in sys.argv and _libc.unshare(CLONE_NEWNET) != 0:
        sys.exit("the zygote could not make its network namespace")
    # (with --own-netns every run starts in the zygote's empty network namespace, loopback down; Landlock's
    # scoping keeps runs from reaching each other's abstract sockets)
    _preload_harness()

    out_lock = threading.Lock()
    fork_lock = threading.Lock()  # the reaper may only look a pid up once it is recorded
    pids = {}  # pid -> (request id, child index, verdict read fd or None)

    def reply(obj):
        with out_lock:
            sys.__stdout__.write(json.dumps(obj) + "\n")
            sys.__stdout__.flush()

    forked_some = threading.Event()

    def reaper():
        while True:
            try:
                pid, status = os.wait()
            except ChildProcessError:  # nothing to reap: sleep until the next fork, not a fixed interval
                forked_some.wait()
                forked_some.clear()
                continue
            with fork_lock:
                entry = pids.pop(pid, None)
            if entry is not None:
                rid, index, verdict_fd = entry
                verdict = _drain(verdict_fd) if verdict_fd is not None else ""
                reply({"id": rid, "child": index, "status": status, "verdict": verdict})

    threading.Thread(target=reaper, daemon=True).start()
    for line in sys.stdin:
        req = json.loads(line)
        pipes = [os.pipe() for _ in range(req.get("pipes", 0))]
        forked = []
        with fork_lock:
            for index, spec in enumerate(req["children"]):
                fds = {int(target): pipes[p][0 if end == "r" else 1] for target, (p, end) in
                       (spec.get("pipe_fds") or {}).items()}
                verdict_r = None
                if spec.get("verdict_fd") is not None:
                    verdict_r, verdict_w = os.pipe()
                    fds[int(spec["verdict_fd"])] = verdict_w
                pid = os.fork()
                if pid == 0:
                    child(spec, fds)
                if verdict_r is not None:
                    os.close(verdict_w)
                pids[pid] = (req["id"], index, verdict_r)
                forked.append(pid)
            forked_some.set()
            for r, w in pipes:
                os.close(r)
                os.close(w)
        reply({"id": req["id"], "pids": forked})


if __name__ == "__main__":
    main()
