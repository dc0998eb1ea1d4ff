"""Preference trees end to end: the tree rules, determinism, resume after SIGKILL, exports, servers."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from align.evaluation.backends import ModelSpec
from align.trees.builder import build_trees, parse_trees_config
from align.trees.store import iter_trees

from conftest import SHARED_REFERENCE


def _gold(instruction: str) -> int:
    a, op, b = re.search(r"(\d+) ([-+*]) (\d+)|holds (\d+)", instruction).groups()[:3] if "What is" in instruction else (None, None, None)
    if a is None:
        n, k = re.search(r"holds (\d+) .* in (\d+) boxes", instruction).groups()
        return int(n) * int(k)
    return {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


class OracleBackend:
    """A scripted actor: sample i of a request is right with probability p (seeded), else off by one."""

    name = "oracle"

    def __init__(self, p_correct: float):
        self.p = p_correct

    def texts(self, messages, n, seed):
        gold = _gold(messages[0]["content"])
        out = []
        for i in range(n):
            right = random.Random(seed * 1000 + i).random() < self.p
            value = gold if right else gold + 1 + i
            out.append(f"Step 1: compute the result.\nAnswer:\n\\boxed{{{value}}}")
        return out

    async def generate(self, messages, n, seed):
        return self.texts(messages, n, seed)

    async def aclose(self):
        pass


def _config(tmp_path, **kw):
    values = {"problems": "arithmetic:12:3", "output_dir": str(tmp_path / "trees"), "samples_per_turn": 2,
              "max_turns": 5, "progress": False, "actor": {"backend": "local"}, **kw}
    return parse_trees_config(values, "test")


def test_tree_rules(tmp_path):
    config, actor, critic, limits = _config(tmp_path, samples_per_turn=3)
    summary = build_trees(config, actor, critic, limits, actor=OracleBackend(0.4))
    assert summary["built"] == 12 and summary["failed"] == 0
    trees = list(iter_trees(tmp_path / "trees"))
    assert len(trees) == 12 and summary["pairs"] > 0
    for tree in trees:
        turns = tree["turns"]
        assert 1 <= len(turns) <= 5 and [t["turn"] for t in turns] == list(range(1, len(turns) + 1))
        for t, nxt in zip(turns, turns[1:]):
            # only an incorrect action is extended; its observation becomes the next user turn
            ext = t["actions"][t["extended"]]
            assert not ext["correct"]
            assert nxt["history"][-2] == {"role": "assistant", "content": ext["text"]}
            assert nxt["history"][-1]["content"].startswith(f"Out: {ext['observation']}\nYour answer is wrong.")
            if t["pair"]:
                assert t["extended"] == t["pair"]["rejected"]
        for t in turns:
            correct = [a["correct"] for a in t["actions"]]
            assert (t["pair"] is not None) == (any(correct) and not all(correct))
            if t["pair"]:
                assert t["actions"][t["pair"]["chosen"]]["correct"] and not t["actions"][t["pair"]["rejected"]]["correct"]
        last = turns[-1]
        # a tree stops when nothing is left to extend or at max_turns
        assert all(a["correct"] for a in last["actions"]) or len(turns) == 5
        assert last["extended"] is None


def test_same_seed_same_trees_and_rerun_skips(tmp_path):
    config, actor, critic, limits = _config(tmp_path / "a")
    build_trees(config, actor, critic, limits, actor=OracleBackend(0.5))
    config_b, *_ = _config(tmp_path / "b", parallel_trees=3)
    build_trees(config_b, actor, critic, limits, actor=OracleBackend(0.5))
    a = sorted(iter_trees(tmp_path / "a" / "trees"), key=lambda t: t["tree_id"])
    b = sorted(iter_trees(tmp_path / "b" / "trees"), key=lambda t: t["tree_id"])
    assert a == b
    again = build_trees(config, actor, critic, limits, actor=OracleBackend(0.5))
    assert again["built"] == 0 and again["already_done"] == 12
    assert len(list(iter_trees(tmp_path / "a" / "trees"))) == 12


class BatchingOracle(OracleBackend):
    """The oracle behind `generate_batch`, as a local model is driven; it records every batch's seeds."""

    def __init__(self, p_correct):
        super().__init__(p_correct)
        self.batches = []

    def generate_batch(self, requests):
        self.batches.append([seed for _, _, seed in requests])
        return [self.texts(m, n, s) for m, n, s in requests]


def test_batched_groups_give_the_trees_of_one_request_at_a_time(tmp_path):
    from align.trees.builder import derive_seed
    from align.tasks.problems import load_problems

    config, actor, critic, limits = _config(tmp_path / "queue", max_turns=3)
    build_trees(config, actor, critic, limits, actor=OracleBackend(0.5))
    config_b, *_ = _config(tmp_path / "batched", max_turns=3, parallel_trees=5)
    oracle = BatchingOracle(0.5)
    build_trees(config_b, actor, critic, limits, actor=oracle)
    queue = sorted(iter_trees(tmp_path / "queue" / "trees"), key=lambda t: t["tree_id"])
    batched = sorted(iter_trees(tmp_path / "batched" / "trees"), key=lambda t: t["tree_id"])
    assert queue == batched and len(batched) == 12

    # one batch per group and turn: the open trees of 5 consecutive problems, ordered by seed
    problems, _ = load_problems(config.problems)
    by_id = {t["problem"]["id"]: t for t in batched}
    expected = []
    for start in range(0, 12, 5):
        group = problems[start:start + 5]
        for turn in range(1, 4):
            seeds = sorted(derive_seed(config.seed, p.id, turn) for p in group if len(by_id[p.id]["turns"]) >= turn)
            if seeds:
                expected.append(seeds)
    assert oracle.batches == expected and len(expected) > 3


def test_row_sampler_samples_softmax_within_top_p():
    import torch

    from align.evaluation.backends import RowSampler

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0])
    rows = 20000
    picks = RowSampler(list(range(rows)), temperature=0.7, top_p=1.0)(None, logits.expand(rows, 5)).argmax(-1)
    freq = torch.bincount(picks, minlength=5) / rows
    assert torch.allclose(freq, (logits / 0.7).softmax(-1), atol=0.01), freq
    # top_p 0.8 keeps the smallest set of top tokens holding 80% of the mass: here the first two
    probs = (logits / 0.7).softmax(-1)
    assert probs[0] < 0.8 <= probs[:2].sum()
    picks = RowSampler(list(range(rows)), temperature=0.7, top_p=0.8)(None, logits.expand(rows, 5)).argmax(-1)
    freq = torch.bincount(picks, minlength=5) / rows
    assert freq[2:].sum() == 0 and torch.allclose(freq[:2], probs[:2] / probs[:2].sum(), atol=0.01)


def test_local_samples_do_not_depend_on_their_batch():
    from align.evaluation.backends import LocalBackend

    backend = LocalBackend(ModelSpec(model="tiny-mixtral", temperature=1.0, max_new_tokens=8))
    chat = lambda text: [{"role": "user", "content": text}]
    alone = backend.generate_batch([(chat("What is 2 + 2?"), 3, 11)])
    mixed = backend.generate_batch([(chat("a much longer question that pads the others"), 2, 5),
                                    (chat("What is 2 + 2?"), 3, 11), (chat("hi"), 1, 7)])
    assert mixed[1] == alone[0] and [len(t) for t in mixed] == [2, 3, 1]
    assert len(set(alone[0])) > 1  # three seeds, three different samples of a random model
    greedy = LocalBackend(ModelSpec(model="tiny-mixtral", temperature=0.0, max_new_tokens=8))
    assert greedy.generate_batch([(chat("hi"), 3, 0)]) == [[greedy.generate_batch([(chat("hi"), 1, 9)])[0][0]] * 3]


def test_changed_settings_refuse_to_mix(tmp_path):
    from align.core.errors import AlignError

    config, actor, critic, limits = _config(tmp_path)
    build_trees(config, actor, critic, limits, actor=OracleBackend(0.5))
    config2, *_ = _config(tmp_path, seed=7)
    with pytest.raises(AlignError, match="other settings.*seed"):
        build_trees(config2, actor, critic, limits, actor=OracleBackend(0.5))


def test_tiny_local_model_builds_a_tree(tmp_path):
    config, actor, critic, limits = _config(tmp_path, problems="arithmetic:2:0", max_turns=2,
                                            actor={"backend": "local", "model": "tiny-mixtral", "max_new_tokens": 6})
    summary = build_trees(config, actor, critic, limits)
    trees = list(iter_trees(tmp_path / "trees"))
    assert summary["built"] == 2 and len(trees) == 2
    assert all(len(t["turns"][0]["actions"]) == 2 for t in trees)


def _build_cmd(recipe):
    return [sys.executable, "-m", "align", "trees", "build", "--config", str(recipe)]


def test_resume_after_sigkill_gives_the_same_trees(tmp_path):
    recipe = tmp_path / "trees.yaml"
    recipe.write_text(
        "problems: arithmetic:6:1\nmax_turns: 2\nsamples_per_turn: 2\nparallel_trees: 1\nprogress: false\n"
        "actor:\n  backend: local\n  model: tiny-mixtral\n  max_new_tokens: 6\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    whole = tmp_path / "whole"
    subprocess.run(_build_cmd(recipe) + ["--output_dir", str(whole)], check=True, env=env, capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_build_cmd(recipe) + ["--output_dir", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trees_file = killed / "trees.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not trees_file.exists() or trees_file.read_text().count("\n") < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = trees_file.read_text().count("\n")
    assert 2 <= partial < 6, "the kill should land mid-run"
    with open(trees_file, "a") as f:
        f.write('{"tree_id": "half-writ')  # what a kill mid-write leaves behind
    subprocess.run(_build_cmd(recipe) + ["--output_dir", str(killed)], check=True, env=env, capture_output=True, timeout=300)
    a = sorted(iter_trees(whole), key=lambda t: t["tree_id"])
    b = sorted(iter_trees(killed), key=lambda t: t["tree_id"])
    assert len(b) == 6 and a == b


def test_exports_load_in_every_stage(tmp_path):
    from align.trees.export import export_trees

    config, actor, critic, limits = _config(tmp_path, problems="arithmetic:10:5")
    build_trees(config, actor, critic, limits, actor=OracleBackend(0.5))
    counts = export_trees(tmp_path / "trees", tmp_path / "export", command="test")
    assert counts["pairs"] > 0 and counts["sft"] > 0 and counts["kto"] == counts["kto_desirable"] + counts["kto_undesirable"]
    card = (tmp_path / "export" / "README.md").read_text()
    assert f"| `pairs` | {counts['pairs']} |" in card and "observation" in card
    # the Hub's layout: every config loads as load_dataset would load it from the Hub
    from datasets import load_dataset
    from huggingface_hub import DatasetCard

    cache = str(tmp_path / "cache")  # datasets 5.2 caches a local folder's configs by the folder's name alone
    for config in ("sft", "pairs", "pairs_ultrainteract", "kto"):
        loaded = load_dataset(str(tmp_path / "export"), config, split="train", cache_dir=cache)
        assert len(loaded) == counts[config], config
    assert load_dataset(str(tmp_path / "export"), "pairs", split="train", cache_dir=cache).column_names[-3:] == \
        ["prompt", "chosen", "rejected"]
    data = DatasetCard.load(tmp_path / "export" / "README.md").data.to_dict()
    assert [c["config_name"] for c in data["configs"]] == ["sft", "pairs", "pairs_ultrainteract", "kto"]
    assert data["license"] == "apache-2.0" and "text-generation" in data["task_categories"]

    from align.dpo.train import main as dpo
    from align.kto_nca.kto import main as kto
    from align.kto_nca.nca import main as nca
    from align.sft.train import main as sft

    from conftest import stage_args

    sft_out = tmp_path / "sft"
    trainer = sft(stage_args("sft.yaml", sft_out, "--datasets", str(tmp_path / "export" / "sft"), "--max_steps", "1"))
    # a multi-turn trajectory trains its final, correct action only: the earlier wrong answers are context
    row = max(trainer.train_dataset, key=lambda r: len(r["prompt"]))
    assert len(row["prompt"]) >= 3
    trained = trainer.processing_class.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != -100])
    assert trained.removesuffix(trainer.processing_class.eos_token) == row["completion"][0]["content"]
    for name, entry, data in (("dpo", dpo, "pairs"), ("nca", nca, "pairs_ultrainteract"), ("kto", kto, "kto")):
        trainer = entry(stage_args(f"{name}.yaml", tmp_path / name, "--datasets", str(tmp_path / "export" / data),
                                   "--adapter_name_or_path", str(sft_out), "--max_steps", "1"))
        assert trainer.state.global_step == 1


@pytest.mark.skipif(not (SHARED_REFERENCE / "ultrainteract_pair_sample.jsonl").exists(), reason="needs ../shared")
def test_import_released_pairs_and_export_them_back(tmp_path):
    from datasets import load_dataset

    from align.trees.export import export_trees, import_released

    sample = SHARED_REFERENCE / "ultrainteract_pair_sample.jsonl"
    originals = [json.loads(line) for line in sample.read_text().splitlines()]
    assert import_released(str(sample), str(tmp_path / "trees")) == len({r["parent_id"] for r in originals})
    export_trees(tmp_path / "trees", tmp_path / "export")
    back = load_dataset(str(tmp_path / "export"), "pairs_ultrainteract", split="train",
                        cache_dir=str(tmp_path / "cache")).to_list()  # (datasets 5.2 caches configs by folder name)
    key = lambda r: r["id"]  # noqa: E731
    assert [(r["id"], r["trajectory"], r["chosen"], r["rejected"]) for r in sorted(back, key=key)] == \
           [(r["id"], r["trajectory"], r["chosen"], r["rejected"]) for r in sorted(originals, key=key)]


# ------------------------------------------------------------------ OpenAI-compatible servers
def _send_json(handler, code, payload):
    data = json.dumps(payload).encode()
    handler.send_response(code)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


class _FlakyHandler(BaseHTTPRequestHandler):
    """429 then 500 on first tries; always 503 for one poisoned problem; otherwise the right answer."""

    attempts: dict = {}
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        instruction = body["messages"][0]["content"]
        key = (instruction, body["seed"])
        with self.lock:
            self.attempts[key] = self.attempts.get(key, 0) + 1
            attempt = self.attempts[key]
        if "What is 13 +" in instruction or attempt == 1 and body["seed"] % 2 == 0:
            return self._send(503 if "What is 13 +" in instruction else 429, {"error": "busy"})
        if attempt == 2 and body["seed"] % 3 == 0:
            return self._send(500, {"error": "oops"})
        gold = _gold(instruction)
        value = gold if body["seed"] % 2 else gold + 1
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": f"Answer:\n\\boxed{{{value}}}"}}]})

    def _send(self, code, payload):
        _send_json(self, code, payload)


def test_server_errors_are_retried_then_reported(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        problems = tmp_path / "p.jsonl"
        rows = [{"id": f"p{i}", "task": "math", "prompt": f"What is {a} + 4?", "answer": str(a + 4), "source": "t"}
                for i, a in enumerate([10, 11, 12, 13, 14])]
        problems.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        config, actor, critic, limits = _config(tmp_path, problems=str(problems), actor={
            "backend": "server", "model": "m", "base_urls": [url, url], "max_retries": 2, "backoff_s": 0.01,
            "concurrency": 4})
        summary = build_trees(config, actor, critic, limits)
        assert summary["built"] == 4 and summary["failed"] == 1 and summary["backend"]["retries"] > 0
        failures = [json.loads(line) for line in (tmp_path / "trees" / "failures.jsonl").read_text().splitlines()]
        assert [f["problem_id"] for f in failures] == ["p3"] and "503" in failures[0]["error"]
        assert {t["problem"]["id"] for t in iter_trees(tmp_path / "trees")} == {"p0", "p1", "p2", "p4"}
    finally:
        server.shutdown()


def test_request_timeouts_are_retried(tmp_path):
    from align.evaluation.backends import BackendError, ServerBackend

    class Slow(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            time.sleep(1.0)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        spec = ModelSpec(backend="server", base_urls=[f"http://127.0.0.1:{server.server_address[1]}/v1"],
                         request_timeout_s=0.2, max_retries=1, backoff_s=0.01)

        async def go():
            backend = ServerBackend(spec)
            try:
                await backend.generate([{"role": "user", "content": "hi"}], 1, 0)
            finally:
                await backend.aclose()
            return backend

        with pytest.raises(BackendError, match="gave up after 2 attempts.*Timeout"):
            asyncio.run(go())
    finally:
        server.shutdown()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tree_against_transformers_serve(tmp_path, capsys):
    """A real `transformers serve` on loopback. As the model's generation config says no sampling, the
    server ignores temperature: every turn's samples are one text, and the build says so loudly. With
    do_sample passed in the request (extra_body) the samples differ and the trees get pairs."""
    pytest.importorskip("fastapi")
    from align.train.models import resolve_model_path

    model_dir = resolve_model_path("tiny-mixtral-char")
    port = _free_port()
    exe = Path(sys.executable).with_name("transformers")
    server = subprocess.Popen([str(exe), "serve", "--host", "127.0.0.1", "--port", str(port), model_dir],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        import urllib.request

        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, "transformers serve exited"
            time.sleep(0.5)
        problems = tmp_path / "digits.jsonl"  # an untrained character model says "7" last now and then
        problems.write_text("".join(json.dumps({"id": f"d{i}", "task": "math", "prompt": f"Say a digit ({i}).",
                                                "answer": "7"}) + "\n" for i in range(8)))
        actor = {"backend": "server", "model": model_dir, "base_urls": [f"http://127.0.0.1:{port}/v1"],
                 "max_new_tokens": 12, "request_timeout_s": 120, "concurrency": 4}
        config, actor_spec, critic, limits = _config(tmp_path, problems=str(problems), max_turns=3, samples_per_turn=4,
                                                     output_dir=str(tmp_path / "greedy"), actor=actor)
        summary = build_trees(config, actor_spec, critic, limits)
        assert summary["built"] == 8 and summary["failed"] == 0
        assert summary["identical_sample_turns"] == summary["turns"] > 0
        assert "identical samples" in capsys.readouterr().err
        from align.trees.export import load_trees, tree_stats

        assert tree_stats(load_trees(tmp_path / "greedy"))["sample_diversity"] == 0.25  # 1 text of 4 samples

        actor["extra_body"] = {"generation_config": json.dumps({"do_sample": True})}
        config, actor_spec, critic, limits = _config(tmp_path, problems=str(problems), max_turns=3, samples_per_turn=4,
                                                     output_dir=str(tmp_path / "sampled"), actor=actor)
        summary = build_trees(config, actor_spec, critic, limits)
        stats = tree_stats(load_trees(tmp_path / "sampled"))
        assert summary["failed"] == 0 and stats["sample_diversity"] > 0.9
        assert summary["pairs"] > 0 and stats["pairs"] == summary["pairs"]
        assert "identical samples" not in capsys.readouterr().err
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


class _CriticHandler(BaseHTTPRequestHandler):
    prompts: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.prompts.append(body["messages"][0]["content"])
        _send_json(self, 200, {"choices": [{"message": {"content": "Check the carry in step 2."}}]})


def test_llm_critic_feedback_turn(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _CriticHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        template = tmp_path / "critic.txt"
        template.write_text("P: {problem}\nT: {trajectory}\nO: {observation}\nR: {reference}\n")
        config, actor, critic, limits = _config(tmp_path, problems="arithmetic:3:1", max_turns=2, critic={
            "type": "llm", "backend": "server", "model": "critic", "template": str(template),
            "base_urls": [f"http://127.0.0.1:{server.server_address[1]}/v1"]})
        build_trees(config, actor, critic, limits, actor=OracleBackend(0.0))  # always wrong: always critiqued
        trees = list(iter_trees(tmp_path / "trees"))
        feedback = trees[0]["turns"][0]["feedback"]
        assert feedback.startswith("Out: ") and "Your answer is wrong.\nCheck the carry in step 2." in feedback
        answer = trees[0]["problem"]["answer"]
        prompt = next(p for p in _CriticHandler.prompts if p.startswith(f"P: {trees[0]['instruction']}\n"))  # trees run concurrently
        assert f"R: {answer}" in prompt and "O: " in prompt and "T: [assistant]" in prompt
        assert answer not in trees[0]["turns"][1]["history"][-1]["content"].replace("Out: ", "").split("wrong.")[1]
    finally:
        server.shutdown()



def test_export_push_goes_through_datasets_push_config_by_config(tmp_path, monkeypatch):
    import datasets
    from huggingface_hub import DatasetCard

    from align.trees.export import export_trees, push_export

    config, actor, critic, limits = _config(tmp_path, problems="arithmetic:6:5")
    build_trees(config, actor, critic, limits, actor=OracleBackend(0.5))
    export_trees(tmp_path / "trees", tmp_path / "export")
    calls = []
    monkeypatch.setattr(datasets.Dataset, "push_to_hub", lambda self, repo, **kw: calls.append((repo, kw["config_name"], len(self))))
    monkeypatch.setattr(DatasetCard, "push_to_hub", lambda self, repo, **kw: calls.append((repo, "card", kw["repo_type"])))
    assert push_export(str(tmp_path / "export"), "me/trees").endswith("datasets/me/trees")
    assert [c[1] for c in calls] == ["sft", "pairs", "pairs_ultrainteract", "kto", "card"] and calls[-1][2] == "dataset"
