"""From trees to training data (SFT, pairs, KTO), statistics, dataset cards, and back from the release.

Every export is a `datasets` folder the training stages read as is. Rows are ordered by tree id, so
the same trees give byte-identical exports whatever order they were built in.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from pathlib import Path

from align.core.errors import AlignError
from align.tasks.problems import RELEASED_TASK
from align.trees.store import iter_trees


def load_trees(path) -> list[dict]:
    trees = sorted(iter_trees(path), key=lambda t: t["tree_id"])
    if not trees:
        raise AlignError(f"trees: no trees in {path}")
    return trees


def _row_ids(tree: dict, turn: int) -> dict:
    depth = len(tree["turns"])
    return {"id": f"{tree['tree_id']}_{depth}_{turn}", "parent_id": tree["tree_id"],
            "task": RELEASED_TASK.get(tree["problem"]["task"], tree["problem"]["task"]),
            "dataset": tree["problem"].get("source", "user")}


def sft_rows(trees: list[dict], leaves_only: bool = False) -> list[dict]:
    """Correct actions, as TRL prompt-completion rows so that only the correct action is trained on: the
    history's earlier (wrong) answers are context, never targets. Default: the whole interaction
    history as the prompt. leaves_only: instruction -> correct response (what Eurus trained SFT on)."""
    rows = []
    for tree in trees:
        for t in tree["turns"]:
            for a in t["actions"]:
                if not a["correct"]:
                    continue
                history = t["history"][:1] if leaves_only else t["history"]
                rows.append({**_row_ids(tree, t["turn"]), "instruction": tree["instruction"], "response": a["text"],
                             "prompt": history, "completion": [{"role": "assistant", "content": a["text"]}]})
                break  # one correct action per turn, as in the release
    return rows


def pair_rows(trees: list[dict]) -> list[dict]:
    """TRL conversational pairs (shared history in `prompt`) plus the released UltraInteract_pair columns."""
    rows = []
    for tree in trees:
        for t in tree["turns"]:
            if not t["pair"]:
                continue
            chosen = t["actions"][t["pair"]["chosen"]]["text"]
            rejected = t["actions"][t["pair"]["rejected"]]["text"]
            rows.append({**_row_ids(tree, t["turn"]),
                         "prompt": t["history"],
                         "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}],
                         # the released UltraInteract_pair columns: user and assistant turns only
                         "trajectory": [{"from": m["role"], "value": m["content"]} for m in t["history"]
                                        if m["role"] != "system"],
                         "chosen_text": chosen, "rejected_text": rejected})
    return rows


def kto_rows(trees: list[dict]) -> list[dict]:
    """Every verified action with its history, labelled desirable (correct) or not."""
    rows = []
    for tree in trees:
        for t in tree["turns"]:
            for a in t["actions"]:
                rows.append({**_row_ids(tree, t["turn"]), "prompt": t["history"],
                             "completion": [{"role": "assistant", "content": a["text"]}], "label": bool(a["correct"])})
    return rows


def tree_stats(trees: list[dict]) -> dict:
    per_task = defaultdict(Counter)
    by_turns = Counter()
    tried, correct = Counter(), Counter()
    distinct, identical, turns = [0, 0], 0, 0  # (distinct texts, samples) summed over turns
    for tree in trees:
        task = tree["problem"]["task"]
        per_task[task]["trees"] += 1
        per_task[task]["pairs"] += sum(t["pair"] is not None for t in tree["turns"])
        per_task[task]["correct_actions"] += sum(a["correct"] for t in tree["turns"] for a in t["actions"])
        per_task[task]["actions"] += sum(len(t["actions"]) for t in tree["turns"])
        per_task[task]["solved"] += bool(tree["solved"])
        per_task[task]["in_process"] += any(a.get("isolation") == "in-process" for t in tree["turns"] for a in t["actions"])
        by_turns[len(tree["turns"])] += 1
        for t in tree["turns"]:
            tried[t["turn"]] += len(t["actions"])
            correct[t["turn"]] += sum(a["correct"] for a in t["actions"])
            distinct[0] += len({a["text"] for a in t["actions"]})
            distinct[1] += len(t["actions"])
            identical += len(t["actions"]) > 1 and len({a["text"] for a in t["actions"]}) == 1
            turns += 1
    return {
        "trees": len(trees),
        "pairs": sum(c["pairs"] for c in per_task.values()),
        "correct_actions": sum(c["correct_actions"] for c in per_task.values()),
        "in_process_problems": sum(c["in_process"] for c in per_task.values()),
        # sample diversity: distinct texts per sample over all turns (1.0: every sample differs), and the
        # turns whose samples were all one text (no pair can come of those)
        "sample_diversity": round(distinct[0] / distinct[1], 4) if distinct[1] else None,
        "identical_sample_turns": identical,
        "turns": turns,
        "per_task": {k: dict(v) for k, v in sorted(per_task.items())},
        "trajectories_by_turns": {k: by_turns[k] for k in sorted(by_turns)},
        "pass_rate_per_turn": {k: round(correct[k] / tried[k], 4) for k in sorted(tried)},
    }


def format_stats(stats: dict) -> str:
    lines = [f"trees {stats['trees']}  pairs {stats['pairs']}  correct actions {stats['correct_actions']}"
             + (f"  sample diversity {stats['sample_diversity']:.2f} (identical samples in {stats['identical_sample_turns']}"
                f" of {stats['turns']} turns)" if stats.get("sample_diversity") is not None else "")
             + (f"  problems verified in-process (tests and candidate in one process, forgeable) "
                f"{stats['in_process_problems']}" if stats.get("in_process_problems") else ""), "",
             "| task | trees | solved | pairs | correct actions | actions |", "|---|---|---|---|---|---|"]
    for task, c in stats["per_task"].items():
        lines.append(f"| {task} | {c['trees']} | {c.get('solved', 0)} | {c['pairs']} | {c['correct_actions']} | {c['actions']} |")
    lines += ["", "| turns in tree | trees | pass rate at that turn |", "|---|---|---|"]
    for k in sorted(set(stats["trajectories_by_turns"]) | set(stats["pass_rate_per_turn"])):
        rate = stats["pass_rate_per_turn"].get(k)
        lines.append(f"| {k} | {stats['trajectories_by_turns'].get(k, 0)} | {'' if rate is None else f'{rate:.1%}'} |")
    return "\n".join(lines)


def _clean(value):
    """Text as UTF-8 can hold it: a lone surrogate (a server's reply) becomes U+FFFD."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


CONFIGS = ("sft", "pairs", "pairs_ultrainteract", "kto")
PARQUET = "train-00000-of-00001.parquet"


def no_correct_answer_warning(stats: dict) -> str | None:
    """The one warning line for trees in which no action was correct (no SFT row, no pair), else None."""
    if stats["correct_actions"]:
        return None
    return (f"warning: the build produced no correct answer ({stats['trees']} trees, "
            f"{sum(c['actions'] for c in stats['per_task'].values())} actions, 0 correct), so there are no SFT rows "
            "and no pairs; the actor model is too weak for these problems (or the verifier refused every answer)")


def loadable_configs(counts: dict) -> list[str]:
    """The configs an export's card lists: `datasets` cannot load a split of no rows ("Instruction 'train'
    corresponds to no data"), so an empty config keeps its folder (the schema, in an empty parquet file)
    but is left out of the card's `configs:`."""
    return [c for c in CONFIGS if counts.get(c)]


def _save(rows: list[dict], folder: Path, columns: list[str]) -> int:
    """One config of the export: <folder>/train-00000-of-00001.parquet, the Hub's layout for a split."""
    import shutil

    from datasets import Dataset

    ds = (Dataset.from_list([{c: _clean(r[c]) for c in columns} for r in rows]) if rows
          else Dataset.from_dict({c: [] for c in columns}))
    if folder.exists():
        shutil.rmtree(folder)  # an earlier export's files (also the old save_to_disk layout)
    folder.mkdir(parents=True)
    ds.to_parquet(str(folder / PARQUET))
    return len(rows)


def export_trees(trees_path, output_dir, leaves_only: bool = False, command: str = "") -> dict:
    """Write the sft, pairs, pairs_ultrainteract and kto configs in the Hub's dataset layout (parquet per
    config, the card's `configs:` naming them), stats.json and the dataset card: the folder loads with
    `load_dataset(folder, name=config)` as it will from the Hub, and each config folder is a stage's data."""
    from align.core.progress import Progress

    progress = Progress("export", 9, "step")
    try:
        return _export(trees_path, output_dir, leaves_only, command, progress)
    finally:
        progress.close()


def _export(trees_path, output_dir, leaves_only: bool, command: str, progress) -> dict:
    progress.note("reading the trees")
    trees = load_trees(trees_path)
    progress.advance(note=f"{len(trees)} trees")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise AlignError(f"--output: {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    ids = ["id", "parent_id", "task", "dataset"]
    sft = sft_rows(trees, leaves_only)
    pairs = pair_rows(trees)
    kto = kto_rows(trees)
    from align.core.leaks import check_rows

    for name, rows in (("sft", sft), ("pairs", pairs), ("kto", kto)):
        progress.note(f"secrets check: {name} ({len(rows)} rows)")
        check_rows(rows, f"{trees_path}: {name} export")
        progress.advance()
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    bars = is_progress_bar_enabled()
    disable_progress_bar()
    try:
        counts = {}
        for name, rows, columns in (
                ("sft", sft, ["prompt", "completion", "instruction", "response"]),
                ("pairs", pairs, ["prompt", "chosen", "rejected"]),
                ("pairs_ultrainteract", [{**r, "chosen": r["chosen_text"], "rejected": r["rejected_text"]} for r in pairs],
                 ["trajectory", "chosen", "rejected"]),
                ("kto", kto, ["prompt", "completion", "label"])):
            progress.note(f"writing {name} ({len(rows)} rows)")
            counts[name] = _save(rows, out / name, ids + columns)
            progress.advance()
    finally:
        if bars:
            enable_progress_bar()
    desirable = sum(r["label"] for r in kto)
    counts["kto_desirable"] = desirable
    counts["kto_undesirable"] = len(kto) - desirable
    counts["kto_desirable_ratio"] = round(desirable / max(len(kto) - desirable, 1), 3)
    stats = tree_stats(trees)
    build_info = {}
    info_path = Path(trees_path) / "build_info.json" if Path(trees_path).is_dir() else Path(trees_path).parent / "build_info.json"
    if info_path.exists():
        try:
            build_info = json.loads(info_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise AlignError(f"{info_path}: corrupt (not the JSON this project writes); delete it to export "
                             "without the build settings in the card") from None
        if not isinstance(build_info, dict):
            raise AlignError(f"{info_path}: corrupt (not a JSON object); delete it to export without the build settings")
    counts["empty_configs"] = [c for c in CONFIGS if c not in loadable_configs(counts)]
    (out / "stats.json").write_text(json.dumps({"counts": counts, "stats": stats}, indent=2))
    dataset_card(counts, stats, build_info, command, leaves_only).save(str(out / "README.md"))
    progress.advance(note="stats and card")
    return counts


def dataset_card(counts: dict, stats: dict, build_info: dict, command: str, leaves_only: bool):
    """huggingface_hub's DatasetCard: card data (license, tags, task categories, size and the `configs:`
    that map each config to its parquet files) and the text."""
    from huggingface_hub import DatasetCard, DatasetCardData

    settings = build_info.get("settings", {})
    actor, critic = settings.get("actor", {}), settings.get("critic", {})
    rows = max(counts[c] for c in CONFIGS)
    listed = loadable_configs(counts)
    empty = [c for c in CONFIGS if c not in listed]
    default = "pairs" if "pairs" in listed else None
    size = "n<1K" if rows < 1000 else "1K<n<10K" if rows < 10_000 else "10K<n<100K" if rows < 100_000 else "100K<n<1M"
    data = DatasetCardData(
        license="apache-2.0", language=["en"], tags=["preference-trees", "ultrainteract", "dpo", "kto", "nca", "moe-align"],
        task_categories=["text-generation"], size_categories=[size], pretty_name="Preference trees (UltraInteract-style)",
        configs=[{"config_name": c, "data_files": [{"split": "train", "path": f"{c}/*.parquet"}], **({"default": True} if c == default else {})}
                 for c in listed] or None)
    warning = no_correct_answer_warning(stats)
    empty_note = ""
    if empty:
        empty_note = (f"\n**{', '.join(f'`{c}`' for c in empty)} {'has' if len(empty) == 1 else 'have'} no rows** and "
                      f"{'is' if len(empty) == 1 else 'are'} left out of this card's configs (`datasets` cannot load a "
                      "split of no rows); the folder keeps the columns in an empty parquet file."
                      + (f" {warning[len('warning: '):][:1].upper()}{warning[len('warning: ') + 1:]}." if warning else "") + "\n")
    text = f"""
# Preference trees (UltraInteract-style)

Built by moe-align from multi-turn critique rollouts: at each turn one correct and one incorrect
sibling action form a pair; the incorrect one is extended with the environment's observation and a
critique, up to {settings.get('max_turns', '?')} turns.

Load a config as `load_dataset("ORG/NAME", "{default or (listed or ['kto'])[0]}", split="train")` (configs: {', '.join(f'`{c}`' for c in listed) or 'none'}).
{empty_note}
## Configs

| config | rows | columns |
|---|---|---|
| `sft` | {counts['sft']} | id, parent_id, task, dataset, prompt, completion, instruction, response ({'correct leaves without history' if leaves_only else 'correct actions, their history as the prompt'}) |
| `pairs` | {counts['pairs']} | id, parent_id, task, dataset, prompt, chosen, rejected (TRL conversational) |
| `pairs_ultrainteract` | {counts['pairs_ultrainteract']} | id, parent_id, task, dataset, trajectory, chosen, rejected (the released UltraInteract_pair columns) |
| `kto` | {counts['kto']} | id, parent_id, task, dataset, prompt, completion, label ({counts['kto_desirable']} desirable / {counts['kto_undesirable']} undesirable) |

`id` is `<tree hash>_<tree depth>_<turn>`; rows sharing `parent_id` share the instruction.

## Statistics

{format_stats(stats)}

## How it was built

- problems: `{settings.get('problems', '?')}`; samples per turn: {settings.get('samples_per_turn', '?')}; seed: {settings.get('seed', '?')}
- actor: {actor.get('backend', '?')} `{actor.get('model', '?')}`{f" + adapter `{actor['adapter']}`" if actor.get('adapter') else ''}, temperature {actor.get('temperature', '?')}, top_p {actor.get('top_p', '?')}, max_new_tokens {actor.get('max_new_tokens', '?')}
- critic: {critic.get('type', '?')}{f" ({critic.get('backend')} `{critic.get('model')}`)" if critic.get('type') == 'llm' else ' (the first wrong step, never the answer)' if critic.get('type') == 'steps' else ' (feeds back the observation only)'}
- verifiers: math by final-answer comparison (exact numbers, then Math-Verify); logic by normalised exact match; code by unit tests run apart from the candidate in a sandbox (timeout {settings.get('sandbox', {}).get('timeout_s', '?')} s, {settings.get('sandbox', {}).get('memory_mb', '?')} MB, no network); problems verified in one process: {stats.get('in_process_problems', 0)}
- build command: `{build_info.get('command', '?')}`
- export command: `{command}`
"""
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n{text}")


def push_export(folder: str, repo_id: str, private: bool = True) -> str:
    """An export to the Hub through `datasets`' own push, config by config (parquet, and the configs of the
    card), then the card itself; secrets are checked first."""
    import pyarrow.parquet as pq
    from datasets import Dataset
    from huggingface_hub import DatasetCard

    from align.core.leaks import check_folder
    from align.core.hub import hub_call

    if "/" not in repo_id:
        raise AlignError(f"--push-to-hub: {repo_id!r} should look like ORG/NAME")
    check_folder(folder)
    token = os.environ.get("HF_TOKEN")
    counts = json.loads((Path(folder) / "stats.json").read_text()).get("counts", {}) if (Path(folder) / "stats.json").is_file() else {}
    for config in loadable_configs(counts) if counts else CONFIGS:
        # read as it is, not through load_dataset(folder, config): datasets 5.2 caches a local folder's configs
        # by the folder's name, so a second export also called "export" would push the first one's rows
        ds = Dataset(pq.read_table(str(Path(folder) / config / PARQUET)))
        hub_call(f"push of config {config} to {repo_id}", ds.push_to_hub, repo_id, config_name=config, private=private,
                 token=token)
    card = DatasetCard.load(str(Path(folder) / "README.md"))
    hub_call(f"push of the card to {repo_id}", card.push_to_hub, repo_id, repo_type="dataset", token=token)
    return f"https://huggingface.co/datasets/{repo_id}"


def _released_row_problem(row: dict) -> str | None:
    if not isinstance(row.get("parent_id"), str) or not row["parent_id"]:
        return "parent_id must be a non-empty string"
    if not isinstance(row.get("id"), str) or not re.fullmatch(r".+_\d+_\d+", row["id"]):
        return f"id must look like <hash>_<depth>_<turn>, got {str(row.get('id'))[:60]!r}"
    trajectory = row.get("trajectory")
    if not isinstance(trajectory, list) or not trajectory or not all(
            isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str) for t in trajectory):
        return "trajectory must be a non-empty list of {from, value} turns"
    if not isinstance(row.get("chosen"), str) or not isinstance(row.get("rejected"), str):
        return "chosen and rejected must be strings"
    return None


def import_released(path: str, output_dir: str) -> int:
    """Released UltraInteract_pair rows (parquet/jsonl/datasets folder) back into trees.jsonl."""
    from align.train.data import load_one
    from align.trees.store import TreeStore

    rows = load_one(path).to_list()
    missing = {"id", "parent_id", "trajectory", "chosen", "rejected"} - set(rows[0] if rows else {})
    if missing:
        raise AlignError(f"{path}: not UltraInteract_pair data (missing column(s) {', '.join(sorted(missing))})")
    for i, row in enumerate(rows):
        problem = _released_row_problem(row)
        if problem:
            raise AlignError(f"{path}: row {i}: {problem}")
    by_parent = defaultdict(list)
    for row in rows:
        by_parent[row["parent_id"]].append(row)
    task_back = {v: k for k, v in RELEASED_TASK.items()} | {"Math_PoT": "math"}
    store = TreeStore(output_dir)
    try:
        return _import_trees(store, by_parent, task_back)
    finally:
        store.close()


def _import_trees(store, by_parent: dict, task_back: dict) -> int:
    written = 0
    for parent, group in sorted(by_parent.items()):
        group.sort(key=lambda r: int(str(r["id"]).rsplit("_", 1)[-1]))
        first = group[0]
        problem = {"id": parent, "task": task_back.get(first.get("task"), "math"), "prompt": first["trajectory"][0]["value"],
                   "source": first.get("dataset", "ultrainteract")}
        if parent in store.done:
            continue
        turns = []
        for row in group:
            history = [{"role": m["from"], "content": m["value"]} for m in row["trajectory"]]
            turns.append({"turn": int(str(row["id"]).rsplit("_", 1)[-1]), "history": history,
                          "actions": [{"text": row["chosen"], "correct": True, "observation": "", "extracted": None, "status": "released"},
                                      {"text": row["rejected"], "correct": False, "observation": "", "extracted": None, "status": "released"}],
                          "pair": {"chosen": 0, "rejected": 1}, "extended": None, "feedback": None})
        for cur, nxt in zip(turns, turns[1:]):
            cur["extended"] = 1
            cur["feedback"] = nxt["history"][-1]["content"]
        store.append({"tree_id": parent, "problem": problem, "instruction": first["trajectory"][0]["value"],
                      "turns": turns, "solved": True})
        written += 1
    return written
