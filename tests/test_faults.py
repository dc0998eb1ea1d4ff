"""Faults a build must survive: servers that answer garbage, trickle or say Retry-After; two builds in one
folder; a full disk; corrupt metadata; secrets in the data; malformed recipes, problem and response files."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from align.core.errors import AlignError
from align.evaluation.backends import BackendError, ModelSpec, ServerBackend
from align.trees.builder import build_trees, parse_trees_config
from align.trees.store import iter_trees
from conftest import REPO

GOOD = {"choices": [{"message": {"role": "assistant", "content": "Answer:\n\\boxed{5}"}}]}


class _Scripted(BaseHTTPRequestHandler):
    """Answers request k with script[min(k, last)]: ("json", body) | ("raw", bytes, headers) | ("status",
    code, headers) | ("trickle", seconds per byte)."""

    script: list = []
    count = 0
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            type(self).bodies.append(body)
            step = self.script[min(type(self).count, len(self.script) - 1)]
            type(self).count += 1
        kind = step[0]
        if kind == "json":
            self._reply(200, json.dumps(step[1]).encode(), {"Content-Type": "application/json"})
        elif kind == "raw":
            self._reply(200, step[1], {"Content-Type": "application/json", **step[2]})
        elif kind == "status":
            self._reply(step[1], b'{"error": "busy"}', {"Content-Type": "application/json", **step[2]})
        elif kind == "trickle":
            data = json.dumps(GOOD).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            for i in range(len(data)):
                try:
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(step[1])

    def _reply(self, code, data, headers):
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def scripted():
    handler = type("Handler", (_Scripted,), {"script": [], "count": 0, "lock": threading.Lock(), "bodies": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_a_served_model_is_sampled_at_the_eval_temperature_then_greedy_again(scripted, tmp_path):
    from align.evaluation.evaluate import run_eval

    handler, url = scripted
    handler.script = [("json", GOOD)]
    run_eval({"problems": "addition:2", "samples": 2, "temperature": 0.7, "turns": 2,
              "models": {"m": {"backend": "server", "model": "m", "base_urls": [url]}}}, tmp_path)
    temperatures = [json.loads(b).get("temperature") for b in handler.bodies]
    assert temperatures[:4] == [0.0] * 4 and set(temperatures[4:]) == {0.7}, temperatures  # 2 greedy + 2 turn-2, then sampled


def _ask(url, **spec):
    async def go():
        backend = ServerBackend(ModelSpec(backend="server", base_urls=[url], backoff_s=0.01, **spec))
        try:
            return await backend.generate([{"role": "user", "content": "hi"}], 1, 0), backend
        finally:
            await backend.aclose()

    return asyncio.run(go())


@pytest.mark.parametrize("garbage", [
    ("json", {"choices": [{"message": {"content": 7}}]}),
    ("json", {"choices": [{"message": {"content": ["a", "b"]}}]}),
    ("json", {"choices": [{"message": {"content": None}}]}),
    ("json", {"choices": []}),
    ("json", {"nothing": True}),
    ("json", [1, 2, 3]),
    ("raw", b"this is not json", {}),
    ("raw", b"\x1f\x8bnot really gzip", {"Content-Encoding": "gzip"}),
    ("status", 500, {}),
    ("status", 429, {}),
])
def test_garbage_replies_are_retried_then_used(scripted, garbage):
    handler, url = scripted
    handler.script = [garbage, ("json", GOOD)]
    texts, backend = _ask(url, max_retries=2)
    assert texts == ["Answer:\n\\boxed{5}"] and backend.retries == 1


def test_a_lone_surrogate_is_replaced_not_fatal(scripted):
    handler, url = scripted
    handler.script = [("raw", b'{"choices": [{"message": {"content": "x\\ud800y"}}]}', {})]
    texts, _ = _ask(url, max_retries=0)
    assert texts[0].encode("utf-8") and texts[0].startswith("x") and texts[0].endswith("y")


def test_gzip_bodies_that_are_gzip_work(scripted):
    handler, url = scripted
    handler.script = [("raw", gzip.compress(json.dumps(GOOD).encode()), {"Content-Encoding": "gzip"})]
    texts, _ = _ask(url, max_retries=0)
    assert texts == ["Answer:\n\\boxed{5}"]


def test_the_deadline_is_per_request_not_per_read(scripted):
    handler, url = scripted
    handler.script = [("trickle", 0.05)]  # ~70 bytes at 20 bytes/s: every read is quick, the reply is not
    start = time.monotonic()
    with pytest.raises(BackendError, match="gave up after 2 attempts.*no complete reply within 0.5 s"):
        _ask(url, max_retries=1, request_timeout_s=0.5)
    assert time.monotonic() - start < 3


def test_retry_after_is_honoured_and_capped(scripted, monkeypatch):
    import align.evaluation.backends as backends

    handler, url = scripted
    handler.script = [("status", 503, {"Retry-After": "0.6"}), ("json", GOOD)]
    start = time.monotonic()
    texts, _ = _ask(url, max_retries=1)
    assert texts and time.monotonic() - start >= 0.6
    monkeypatch.setattr(backends, "RETRY_AFTER_CAP_S", 0.2)
    handler.count, handler.script = 0, [("status", 429, {"Retry-After": "3600"}), ("json", GOOD)]
    start = time.monotonic()
    texts, _ = _ask(url, max_retries=1)
    assert texts and time.monotonic() - start < 2


def test_a_client_error_is_not_retried(scripted):
    handler, url = scripted
    handler.script = [("status", 401, {})]
    with pytest.raises(BackendError, match="HTTP 401"):
        _ask(url, max_retries=3)
    assert handler.count == 1


def _problems(tmp_path, n=3):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "task": "math", "prompt": f"{i}+5", "answer": str(i + 5)}) + "\n"
                            for i in range(n)))
    return str(path)


def test_garbage_that_never_stops_becomes_a_failure_entry_and_a_rerun_finishes(tmp_path, scripted):
    handler, url = scripted
    handler.script = [("json", {"choices": [{"message": {"content": 5}}]})]
    values = {"problems": _problems(tmp_path), "output_dir": str(tmp_path / "trees"), "max_turns": 1, "progress": False,
              "actor": {"backend": "server", "model": "m", "base_urls": [url], "max_retries": 1, "backoff_s": 0.01}}
    summary = build_trees(*parse_trees_config(values, "t.yaml"))
    assert summary["failed"] == 3 and summary["built"] == 0
    failures = [json.loads(line) for line in (tmp_path / "trees" / "failures.jsonl").read_text().splitlines()]
    assert len(failures) == 3 and all("content is int" in f["error"] for f in failures)
    handler.script = [("json", GOOD)]
    summary = build_trees(*parse_trees_config(values, "t.yaml"))
    assert summary["built"] == 3 and summary["failed"] == 0


def test_llm_critic_template_with_literal_braces(tmp_path, scripted):
    from align.tasks.critic import fill_template

    assert fill_template("{a} {problem} {{x}} {reference}", problem="P {reference}", reference="R") == "{a} P {reference} {{x}} R"
    handler, url = scripted
    handler.script = [("json", {"choices": [{"message": {"content": "Look at step 2."}}]})]
    template = tmp_path / "critic.txt"
    template.write_text('JSON: {"k": [1, 2]}\nLaTeX: \\frac{a}{b}\n{problem}\n{trajectory}\n{observation}\n{reference}\n')
    values = {"problems": _problems(tmp_path, 1), "output_dir": str(tmp_path / "trees"), "max_turns": 2,
              "progress": False, "actor": {"backend": "server", "model": "m", "base_urls": [url]},
              "critic": {"type": "llm", "backend": "server", "model": "c", "base_urls": [url], "template": str(template)}}
    handler.script = [("json", {"choices": [{"message": {"content": "\\boxed{0}"}}]})]
    summary = build_trees(*parse_trees_config(values, "t.yaml"))
    assert summary["built"] == 1
    (tree,) = list(iter_trees(tmp_path / "trees"))
    assert tree["turns"][0]["feedback"].endswith("\\boxed{0}")  # the critic's reply, from the same server


def test_two_builds_into_one_folder(tmp_path):
    """The second build gets one line and exit 2 while the first holds the folder; the trees are written once."""
    recipe = tmp_path / "trees.yaml"
    recipe.write_text(f"problems: arithmetic:40:0\noutput_dir: {tmp_path / 'trees'}\nmax_turns: 1\nprogress: false\n"
                      "actor: {backend: local, model: tiny-mixtral, max_new_tokens: 8}\n")
    first = subprocess.Popen([sys.executable, "-m", "align", "trees", "build", "--config", str(recipe)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "trees" / "build_info.json").exists() and time.time() < deadline:
        time.sleep(0.1)
    # the first is paused while the second runs, so that it still holds the folder however slowly the second
    # starts (on a loaded machine the first could otherwise finish first, and the second then resume nothing)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = subprocess.run([sys.executable, "-m", "align", "trees", "build", "--config", str(recipe)],
                                cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    first.communicate(timeout=600)
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    if first.returncode == 0 and second.returncode == 0:
        pytest.fail("both builds ran to the end in one folder")
    assert second.returncode == 2 and len(lines) == 1 and "another build" in lines[0], second.stderr
    ids = [t["problem"]["id"] for t in iter_trees(tmp_path / "trees")]
    raw = (tmp_path / "trees" / "trees.jsonl").read_text().splitlines()
    assert len(ids) == len(set(ids)) == len(raw) == 40


def test_corrupt_build_info_says_how_to_recover(tmp_path):
    values = {"problems": "arithmetic:2:0", "output_dir": str(tmp_path / "trees"), "progress": False}
    (tmp_path / "trees").mkdir()
    (tmp_path / "trees" / "build_info.json").write_text("")
    with pytest.raises(AlignError, match="build_info.json: corrupt .*delete it"):
        build_trees(*parse_trees_config(values, "t.yaml"), actor=_Never())


class _Never:
    name = "never"

    async def generate(self, messages, n, seed):
        raise AssertionError("no request expected")

    async def aclose(self):
        pass


class _Oracle:
    """Right answers to "a+b", built without a model."""

    name = "oracle"

    async def generate(self, messages, n, seed):
        a, b = messages[0]["content"].rsplit("\n", 1)[-1].split("+")
        return [f"\\boxed{{{int(a) + int(b) + (i % 2)}}}" for i in range(n)]

    async def aclose(self):
        pass


def _small_disk(tmp_path, kib):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    folder = tmp_path / "disk"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    return folder


def test_disk_full_keeps_a_store_a_rerun_resumes(tmp_path):
    disk = _small_disk(tmp_path, 48)
    try:
        filler = disk / "filler"
        values = {"problems": _problems(tmp_path, 300), "output_dir": str(disk / "trees"), "max_turns": 1,
                  "progress": False, "parallel_trees": 1}
        filler.write_bytes(b"x" * (44 << 10))  # nearly full before the first start
        with pytest.raises(AlignError) as err:
            build_trees(*parse_trees_config(values, "t.yaml"), actor=_Oracle())
        assert "rerun" in str(err.value)
        info = disk / "trees" / "build_info.json"
        assert not info.exists() or json.loads(info.read_text())["settings"]  # never an empty file
        filler.write_bytes(b"x" * (24 << 10))  # room again, but not for all 300 trees
        with pytest.raises(AlignError, match="free space and rerun"):
            build_trees(*parse_trees_config(values, "t.yaml"), actor=_Oracle())
        kept = [t["problem"]["id"] for t in iter_trees(disk / "trees")]
        assert kept and len(kept) < 300
        filler.unlink()
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        summary = build_trees(*parse_trees_config(values, "t.yaml"), actor=_Oracle())
        ids = [t["problem"]["id"] for t in iter_trees(disk / "trees")]
        assert summary["already_done"] == len(kept) and sorted(ids) == sorted(f"p{i}" for i in range(300))
    finally:
        subprocess.run(["umount", str(disk)])


def test_exports_and_pushes_refuse_secrets(tmp_path, monkeypatch):
    from align.publishing.publish import push_folder
    from align.trees.export import export_trees
    from align.trees.store import TreeStore

    secret = "sk-" + "a1b2c3d4" * 4
    store = TreeStore(tmp_path / "trees")
    action = {"text": f"my key is {secret}", "correct": True, "observation": "", "extracted": None, "status": "ok"}
    store.append({"tree_id": "t", "problem": {"id": "p", "task": "math", "prompt": "1+1", "answer": "2"},
                  "instruction": "1+1", "solved": True, "turns": [{"turn": 1, "history": [{"role": "user", "content": "1+1"}],
                                                                   "actions": [action], "pair": None, "extended": None,
                                                                   "feedback": None}]})
    store.close()
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    with pytest.raises(AlignError, match=r"row 0 contains the value of \$OPENAI_API_KEY") as err:
        export_trees(tmp_path / "trees", tmp_path / "export")
    assert secret not in str(err.value) and not (tmp_path / "export" / "sft").exists()
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "data.jsonl").write_text(json.dumps({"text": secret}) + "\n")
    with pytest.raises(AlignError, match=r"data.jsonl: contains the value of \$OPENAI_API_KEY"):
        push_folder(str(folder), "org/name", repo_type="dataset")
    monkeypatch.delenv("OPENAI_API_KEY")
    assert export_trees(tmp_path / "trees", tmp_path / "export")["sft"] == 1


def test_math_commas_are_thousands_separators_only():
    from align.tasks.problems import Problem
    from align.tasks.verifiers import verify_math

    twelve = Problem(id="a", task="math", prompt="", answer="12")
    assert not verify_math(twelve, "\\boxed{1,2}").correct and verify_math(twelve, "\\boxed{12}").correct
    big = Problem(id="b", task="math", prompt="", answer="1234567")
    assert verify_math(big, "\\boxed{1,234,567}").correct and not verify_math(big, "\\boxed{12,34,567}").correct


def test_an_overflowing_retry_after_is_no_header(scripted):
    handler, url = scripted
    handler.script = [("status", 503, {"Retry-After": "Mon, 01 Jan 99999999999999999999 00:00:00 GMT"}), ("json", GOOD)]
    texts, backend = _ask(url, max_retries=1)
    assert texts == ["Answer:\n\\boxed{5}"]


def test_a_failed_problem_cancels_its_other_samples(scripted):
    handler, url = scripted
    handler.script = [("status", 500, {})]

    async def go():
        backend = ServerBackend(ModelSpec(backend="server", base_urls=[url], backoff_s=0.05, max_retries=1))
        with pytest.raises(BackendError):
            await backend.generate([{"role": "user", "content": "hi"}], 4, 0)
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        await backend.aclose()
        return pending

    assert asyncio.run(go()) == []


def test_a_reply_longer_than_any_answer_is_refused(scripted):
    handler, url = scripted
    handler.script = [("json", {"choices": [{"message": {"content": "x" * (2 << 20)}}]}), ("json", GOOD)]
    texts, backend = _ask(url, max_retries=1)
    assert texts == ["Answer:\n\\boxed{5}"] and backend.retries == 1
