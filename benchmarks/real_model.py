"""The real-model study: recipes/smollm2-moe/pipeline.yaml once per seed, then one table over the seeds.

    python benchmarks/real_model.py --seeds 0 1 [--enable dpo] [--work outputs/real_model]
    python benchmarks/real_model.py --smoke      # a few problems and steps: that it runs end to end

Each seed gets its own output folder and its own seeds in every stage (trees sampling, training, the
router's initialisation); the upcycled model is made once per seed folder and reused on a rerun (finished
stages are skipped by `align run`). The table has, per model (base, SFT, NCA, KTO, DPO): pass@1 and pass@2
turns on the held-out problems (mean ± spread over the seeds), and for the preference stages the last
logged chosen / rejected rewards; plus the share of the trees' pairs that come from turn 2 or later.

Two seeds take about 56 minutes on 2 quiet CPU cores (DPO, with --enable dpo, about 7 more a seed); the
figures are in benchmarks/RESULTS.md. The smoke (16 word problems and 4 puzzles, 2 experts, one step per
stage) runs the whole pipeline in CI.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "recipes" / "smollm2-moe" / "pipeline.yaml"
MODELS = ("base", "sft", "nca", "kto", "dpo")
PREFERENCE = ("nca", "kto", "dpo")
# the smoke's trees (problems, new tokens per answer): enough word problems that the model solves some and
# misses some (about a third of one-step problems at 40 tokens), so SFT, NCA and KTO have rows to train on
SMOKE_TREES = {"wordproblems": (16, 40), "ordering": (4, 12)}


def seeded_pipeline(spec: dict, seed: int, out: Path, smoke: bool) -> dict:
    """The pipeline for one seed: its own output folder and seeds; in smoke mode a few problems and steps."""
    spec = copy.deepcopy(spec)
    spec["output_dir"] = str(out)
    for stage in spec["stages"]:
        kind, settings = stage["kind"], stage.setdefault("set", {}) if "recipe" in stage else stage
        if kind == "upcycle":
            stage["seed"] = seed
            if smoke:
                stage.update(experts=2, top_k=1)
        elif kind == "trees":
            settings["seed"] = seed
            if smoke:  # (the full study draws the same problems for every seed: the seeds vary the samples)
                name, *params = settings["problems"].split(":")
                params[0], params[1] = str(SMOKE_TREES[name][0]), str(int(params[1]) + seed)
                settings["problems"] = ":".join([name, *params])
                settings["parallel_trees"] = 16
                settings["actor"] = {**settings.get("actor", {}), "max_new_tokens": SMOKE_TREES[name][1]}
        elif kind in ("sft", "nca", "kto", "dpo"):
            settings["seed"] = seed
            if smoke:
                settings.update(max_steps=1, logging_steps=1, per_device_train_batch_size=2, max_length=192)
        elif kind == "eval" and smoke:
            stage.update(limit=2, max_new_tokens=12)
    return spec


def read_results(out: Path) -> dict:
    """pass@1 / pass@2 turns per model, the last chosen / rejected rewards per preference stage, and the
    share of pairs from turn 2 or later, from one seed's output folder."""
    row: dict = {}
    results = out / "eval" / "results.json"
    if results.is_file():
        for name, r in json.loads(results.read_text())["models"].items():
            row[name] = {"pass@1": r.get("pass@1"), "pass@2 turns": r.get("pass@turns", {}).get("2")}
    for name in PREFERENCE:
        state = out / name / "trainer_state.json"
        if state.is_file():
            history = [h for h in json.loads(state.read_text())["log_history"] if "rewards/chosen" in h]
            if history:
                row.setdefault(name, {}).update(chosen=history[-1]["rewards/chosen"],
                                                rejected=history[-1].get("rewards/rejected"))
    pairs = later = 0
    for trees in out.glob("trees_*/trees.jsonl"):
        for line in trees.read_text().splitlines():
            for turn in json.loads(line)["turns"] if line.strip() else []:
                if turn.get("pair"):
                    pairs += 1
                    later += turn["turn"] > 1
    row["pairs"] = pairs
    row["later_turn_share"] = later / pairs if pairs else None
    return row


def _cell(values: list) -> str:
    values = [v for v in values if isinstance(v, (int, float))]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def table(rows: dict[int, dict]) -> str:
    lines = ["| model | pass@1 | pass@2 turns | chosen reward | rejected reward |", "|---|---|---|---|---|"]
    for name in MODELS:
        got = [r.get(name, {}) for r in rows.values()]
        if not any(got):
            continue
        rewards = [g.get("chosen") for g in got], [g.get("rejected") for g in got]
        reward_cells = [(f"{statistics.mean(v):.3f}" if (v := [x for x in vs if x is not None]) else "-") for vs in rewards]
        lines.append(f"| {name} | {_cell([g.get('pass@1') for g in got])} | {_cell([g.get('pass@2 turns') for g in got])} "
                     f"| {reward_cells[0]} | {reward_cells[1]} |")
    shares = [r["later_turn_share"] for r in rows.values() if r.get("later_turn_share") is not None]
    lines.append(f"\npairs per seed: {[r['pairs'] for r in rows.values()]}; from turn 2 or later: {_cell(shares)}%")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--work", default="outputs/real_model")
    parser.add_argument("--enable", default="", help="stages marked enabled: false to run too (dpo)")
    parser.add_argument("--smoke", action="store_true", help="a few problems and one step per stage, one seed")
    parser.add_argument("--until", help="run the stages up to this one only (e.g. trees_logic)")
    args = parser.parse_args(argv)
    spec = yaml.safe_load(PIPELINE.read_text())
    if args.until:
        names = [s["name"] for s in spec["stages"]]
        if args.until not in names:
            parser.error(f"--until: no stage {args.until!r} ({', '.join(names)})")
        spec["stages"] = spec["stages"][:names.index(args.until) + 1]
    seeds = args.seeds[:1] if args.smoke else args.seeds
    rows = {}
    for seed in seeds:
        out = Path(args.work) / f"seed{seed}"
        out.mkdir(parents=True, exist_ok=True)
        pipeline = out.parent / f"pipeline-seed{seed}.yaml"
        pipeline.write_text(yaml.safe_dump(seeded_pipeline(spec, seed, out, args.smoke), sort_keys=False))
        cmd = [sys.executable, "-m", "align", "run", str(pipeline)] + (["--enable", args.enable] if args.enable else [])
        print(f"[real_model] seed {seed}: {' '.join(cmd)}", flush=True)
        code = subprocess.run(cmd, cwd=REPO).returncode
        if code != 0:
            print(f"[real_model] seed {seed}: the pipeline failed (exit {code}); see {out}", flush=True)
            return code
        rows[seed] = read_results(out)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
