"""The quickstart's table over several seeds, with its spread: mean ± sd of every model's pass@1 and
pass@k turns, the chosen reward at the end of each preference stage, and the turn-2 share of the pairs.

Every seed runs the whole quickstart (`recipes/quickstart/pipeline.yaml` with every stage enabled: DPO,
KTO, NCA's control chosen_sft and the second round) with its own seed in every stage: the bootstrap's
rows (the data stage's seed plus S) and their order, the trees' sampling, every training stage's `seed`;
seed 0 is the quickstart as shipped. With `--shared-bootstrap` (how the spreads before 2026-12-01, night,
were run) the data stage keeps its seed and the seeds after the first reuse the first one's bootstrap,
so the spread leaves out how much the base model itself moves. Each seed's pipeline lives in OUT/seed-S;
a rerun skips finished stages, so an interrupted benchmark resumes.

    python benchmarks/quickstart_spread.py [--seeds 1 2 3] [--output outputs/quickstart-spread] [--shared-bootstrap]
        [--digits 3 --bootstrap-steps 400]

`--digits 3 --bootstrap-steps 400` is the variant with headroom (benchmarks/RESULTS.md): a longer bootstrap,
and the trees, round 2 and eval on 3-digit sums, where it leaves half the problems unsolved.

`--check` writes each seed's pipeline and runs `align run PIPELINE --check` on it, training nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from align.runner.pipeline import substitute_refs

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "recipes" / "quickstart" / "pipeline.yaml"
TRAINING = ("sft", "nca", "dpo", "kto")
PREFERENCE = ("nca", "dpo", "kto", "nca2")


def with_digits(problems: str, digits: int) -> str:
    """`addition:N:SEED:DIGITS:SPLIT` with another digit count."""
    parts = problems.split(":")
    if len(parts) != 5 or parts[0] != "addition":
        raise SystemExit(f"--digits: the quickstart's problems {problems!r} are not addition:N:SEED:DIGITS:SPLIT")
    return ":".join([*parts[:3], str(digits), parts[4]])


def seeded_pipeline(seed: int, out: Path, shared_bootstrap: Path | None, digits: int | None = None,
                    bootstrap_steps: int | None = None, own_rows: bool = True) -> Path:
    """The quickstart's pipeline for one seed: every stage on, `seed` in the trees and training stages
    (the bootstrap's too), the data stage's seed moved by `seed` when `own_rows` (seed 0 is the quickstart
    as shipped); with `shared_bootstrap`, no data or bootstrap stage, and that folder as the bootstrap."""
    spec = yaml.safe_load(PIPELINE.read_text())
    spec["output_dir"] = str(out / f"seed-{seed}")
    stages = []
    for stage in spec["stages"]:
        if shared_bootstrap is not None:
            if stage["name"] in ("data", "bootstrap"):
                continue
            stage = substitute_refs(stage, {"bootstrap": str(shared_bootstrap)})
        if stage["kind"] == "trees" or stage["kind"] in TRAINING:
            stage.setdefault("set", {})["seed"] = seed
        elif stage["kind"] == "data" and own_rows:
            stage["seed"] = stage.get("seed", 0) + seed
        if stage["name"] == "bootstrap" and bootstrap_steps:
            stage["set"]["max_steps"] = bootstrap_steps
        if digits and stage["kind"] == "trees":
            trees = yaml.safe_load((REPO / stage["recipe"]).read_text())
            stage["set"]["problems"] = with_digits(stage["set"].get("problems", trees["problems"]), digits)
            stage["set"].setdefault("actor", {})["max_new_tokens"] = max(trees["actor"]["max_new_tokens"], 16 * digits)
        if digits and stage["kind"] == "eval":
            stage["problems"] = with_digits(stage["problems"], digits)
            stage["max_new_tokens"] = max(stage.get("max_new_tokens", 0), 16 * digits)
        stage.pop("enabled", None)  # DPO, KTO and chosen_sft too
        stages.append(stage)
    spec["stages"] = stages
    path = out / f"pipeline-seed-{seed}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def final_chosen_reward(stage_dir: Path) -> float | None:
    """rewards/chosen of the last full logging window: the trainer also logs the last step alone, whose
    batch may hold only the few rows left over (2 of 16 pairs gave -0.21 where the window before gave -0.005)."""
    state = stage_dir / "trainer_state.json"
    if not state.is_file():
        return None
    state = json.loads(state.read_text())
    every = state.get("logging_steps") or 1
    rows = [h for h in state["log_history"] if "rewards/chosen" in h]
    full = [h for h in rows if h["step"] % every == 0] or rows
    return full[-1]["rewards/chosen"] if full else None


def collect(seed_dir: Path) -> dict:
    results = json.loads((seed_dir / "eval" / "results.json").read_text())
    stats = json.loads((seed_dir / "trees" / "export" / "stats.json").read_text())
    pairs_by_turn = {}
    for line in (seed_dir / "trees" / "trees.jsonl").read_text().splitlines():
        for turn in json.loads(line)["turns"]:
            if turn["pair"]:
                pairs_by_turn[turn["turn"]] = pairs_by_turn.get(turn["turn"], 0) + 1
    total_pairs = sum(pairs_by_turn.values())
    return {
        "models": {name: {"pass@1": r["pass@1"], **{f"pass@{k} turns": v for k, v in r.get("pass@turns", {}).items()
                                                   if k != "1"}} for name, r in results["models"].items()},
        "chosen_reward": {stage: final_chosen_reward(seed_dir / stage) for stage in PREFERENCE},
        "pairs": total_pairs,
        "turn2_pair_share": round(sum(v for k, v in pairs_by_turn.items() if k >= 2) / total_pairs, 4) if total_pairs else 0.0,
        "pass_rate_per_turn": stats["stats"]["pass_rate_per_turn"],
    }


def mean_sd(values: list[float], percent: bool = True) -> str:
    """mean ± sample sd over the seeds; rates as percentages, rewards as numbers."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1%} ± {sd:.1%}" if percent else f"{statistics.mean(values):+.4f} ± {sd:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--output", default="outputs/quickstart-spread")
    parser.add_argument("--shared-bootstrap", action="store_true",
                        help="seeds after the first reuse its data and bootstrap (the issue allows it; faster)")
    parser.add_argument("--check", action="store_true", help="write and check each seed's pipeline, train nothing")
    parser.add_argument("--digits", type=int, choices=(1, 2, 3),
                        help="the trees and eval on sums of this many digits (headroom: 3; held-out pairs go to 3)")
    parser.add_argument("--bootstrap-steps", type=int, help="the bootstrap's max_steps (the recipe's by default)")
    args = parser.parse_args()
    if args.check and args.shared_bootstrap and len(args.seeds) > 1:
        parser.error("--check with --shared-bootstrap: the later seeds name the first seed's bootstrap, which only "
                     "a real run makes; check without --shared-bootstrap")
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    per_seed, shared = {}, None
    for seed in args.seeds:
        path = seeded_pipeline(seed, out, shared, args.digits, args.bootstrap_steps, own_rows=not args.shared_bootstrap)
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "align", "run", str(path), *["--check"] * args.check], cwd=REPO)
        if proc.returncode:
            raise SystemExit(f"seed {seed}: align run {path} failed (exit {proc.returncode})")
        if args.check:
            continue
        if args.shared_bootstrap:
            shared = shared or out / f"seed-{seed}" / "bootstrap"
        per_seed[seed] = {**collect(out / f"seed-{seed}"), "seconds": round(time.monotonic() - start)}
        print(json.dumps({"seed": seed, **per_seed[seed]}), flush=True)
    if args.check:
        return
    models = list(next(iter(per_seed.values()))["models"])
    columns = sorted({c for r in per_seed.values() for m in r["models"].values() for c in m})
    bootstrap = "one bootstrap for all seeds" if args.shared_bootstrap else "a bootstrap of its own per seed"
    lines = [f"seeds {args.seeds} ({bootstrap}); mean ± sd over seeds", "", "| model | " + " | ".join(columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name in models:
        lines.append(f"| {name} | " + " | ".join(mean_sd([r["models"][name].get(c) for r in per_seed.values()])
                                                for c in columns) + " |")
    lines += ["", "| chosen reward at the end | " + " | ".join(PREFERENCE) + " |", "|---|" + "---|" * len(PREFERENCE),
              "| mean ± sd | " + " | ".join(mean_sd([r["chosen_reward"][s] for r in per_seed.values()], percent=False)
                                          for s in PREFERENCE) + " |",
              "", f"turn-2+ share of the pairs: {mean_sd([r['turn2_pair_share'] for r in per_seed.values()])}",
              "", "| pass@1 minus SFT's, per seed | mean ± sd |", "|---|---|"]
    for name in models:
        if name not in ("sft", "base"):
            gaps = [r["models"][name]["pass@1"] - r["models"]["sft"]["pass@1"] for r in per_seed.values()
                    if name in r["models"] and "sft" in r["models"]]  # a model eval skipped in a seed counts not
            lines.append(f"| {name} | {mean_sd(gaps)} |")
    table = "\n".join(lines)
    (out / "spread.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
