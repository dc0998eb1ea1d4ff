"""Hostile model-written code ends in a verdict within timeout + 2 s, contained, while we keep running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from align.tasks.sandbox import SandboxLimits, capabilities, run_python

TIMEOUT = 2.0
LIMITS = SandboxLimits(timeout_s=TIMEOUT, memory_mb=512)

HOSTILE = {
    "infinite_loop": "while True:\n    pass\n",
    "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "setsid_escape": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(600)\n",
    "memory_bomb": "x = bytearray(8 * 1024**3)\nprint('allocated')\n",
    "memory_creep": "chunks = []\nwhile True:\n    chunks.append(b' ' * 10**7)\n",
    "output_flood": "import sys\nwhile True:\n    sys.stdout.write('x' * 100000)\n",
    "write_outside": "open('/tmp/align-sandbox-escape-{tag}', 'w').write('pwned')\nprint('wrote')\n",
    "delete_outside": "import os\nos.remove({target!r})\nprint('deleted')\n",
    "network": "import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')\n",
    "ignore_signals": "import signal, time\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    time.sleep(0.05)\n",
}


@pytest.fixture(scope="module")
def listener():
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    yield server.getsockname()[1]
    server.close()


def _leftovers():
    """Processes still running as a sandbox uid (root mode) or running a sandbox program."""
    out = subprocess.run(["ps", "-eo", "uid=,stat=,args="], capture_output=True, text=True).stdout
    live = [line.split(None, 2) for line in out.splitlines() if len(line.split(None, 2)) == 3]
    live = [(uid, stat, args) for uid, stat, args in live if not stat.startswith("Z")]  # zombies are dead
    return [args for uid, stat, args in live if "align-sandbox-" in args or (uid.isdigit() and int(uid) >= 200000)]


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_code_is_contained(case, tmp_path, listener):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    tag = f"{os.getpid()}-{case}"
    code = HOSTILE[case].format(tag=tag, target=str(target), port=listener)
    start = time.monotonic()
    result = run_python(code, LIMITS)
    elapsed = time.monotonic() - start
    assert elapsed < TIMEOUT + 2, f"{case} took {elapsed:.1f}s"
    assert not (result.status == "ok" and any(w in result.stdout for w in ("allocated", "wrote", "deleted", "connected")))
    assert target.read_text() == "keep me"
    assert not os.path.exists(f"/tmp/align-sandbox-escape-{tag}")
    assert len(result.stdout) <= LIMITS.max_output_bytes
    if case == "output_flood":
        assert result.stdout_truncated
    time.sleep(0.2)
    assert not _leftovers(), f"{case} left processes behind"


def test_hostile_cases_run_concurrently_and_the_caller_keeps_going(listener):
    codes = [HOSTILE[c].format(tag="c", target="/nonexistent", port=listener) for c in ("infinite_loop", "fork_bomb", "memory_creep", "ignore_signals")]
    start = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(run_python, c, LIMITS) for c in codes]
        assert run_python("print(6 * 7)", LIMITS).stdout.strip() == "42"  # we are not blocked meanwhile
        results = [f.result() for f in futures]
    assert time.monotonic() - start < TIMEOUT + 4
    assert all(r.status != "ok" for r in results)
    assert not _leftovers()


def test_private_directory_and_clean_exit():
    result = run_python("import os\nopen('scratch.txt', 'w').write('ok')\nprint(os.getcwd(), sorted(os.listdir('.')))\n", LIMITS)
    assert result.status == "ok" and result.exit_code == 0
    cwd = result.stdout.split()[0]
    assert "align-sandbox-" in cwd and "scratch.txt" in result.stdout
    assert not os.path.exists(cwd), "the private directory is removed afterwards"


def test_reports_isolation_in_use():
    caps = capabilities()
    result = run_python("print(1)", LIMITS)
    assert result.network == ("namespace" if caps["netns"] else "sockets-disabled")


def test_sandbox_cli_prints_a_json_verdict(tmp_path):
    program = tmp_path / "loop.py"
    program.write_text("print('start', flush=True)\nwhile True: pass\n")
    proc = subprocess.run([sys.executable, "-m", "align", "sandbox", "run", str(program), "--timeout", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    verdict = json.loads(proc.stdout.strip().splitlines()[-1])
    assert verdict["status"] == "timeout" and verdict["stdout"].strip() == "start" and verdict["duration_s"] < 3
