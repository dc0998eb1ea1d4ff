"""Training data for the stages: load, convert the released UltraInteract schemas, check, mix.

Everything here runs before a model is loaded, so a wrong path or a missing column costs seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from align.core.errors import AlignError

from align.stages import training_stage

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def _turns_to_messages(turns: list[dict]) -> list[dict]:
    """UltraInteract `{"from": "user"|"assistant", "value": ...}` turns as chat messages."""
    out = []
    for turn in turns:
        role = turn.get("from") or turn.get("role")
        content = turn.get("value") if "value" in turn else turn.get("content")
        out.append({"role": {"human": "user", "gpt": "assistant"}.get(role, role), "content": content})
    return out


def ultrainteract_sft_row(row: dict) -> dict:
    return {"messages": [{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": row["response"]}]}


def ultrainteract_pair_row(row: dict) -> dict:
    return {
        "prompt": _turns_to_messages(row["trajectory"]),
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
    }


def pairs_to_kto(dataset):
    """Each preference pair as two labelled single actions: chosen desirable, rejected undesirable."""
    from datasets import Dataset

    rows = []
    for row in dataset:
        rows.append({"prompt": row["prompt"], "completion": row["chosen"], "label": True})
        rows.append({"prompt": row["prompt"], "completion": row["rejected"], "label": False})
    return Dataset.from_list(rows)


DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def local_form(name: str) -> bool:
    """A name that can only be a local file or folder (./, /, ~, or a data file's suffix), never a Hub repo id."""
    return name.startswith((".", "/", "~")) or Path(name).suffix.lower() in DATA_SUFFIXES


def load_one(path: str, split: str = "train", name: str | None = None, data_files=None, data_dir: str | None = None):
    """A `datasets.Dataset` from a saved folder, a jsonl/json/parquet file or folder, or a hub id (with
    `name`, `data_files`, `data_dir` as `datasets.load_dataset` takes them)."""
    import datasets

    p = Path(path).expanduser()
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a one-line error must stay one line
    try:
        if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists()):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise AlignError(f"dataset {path}: no split '{split}' (has {', '.join(ds)})")
                ds = ds[split]
            return ds
        if p.is_file():
            suffix = p.suffix.lower()
            builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(suffix)
            if builder is None:
                raise AlignError(f"dataset {path}: unsupported file type '{suffix}' (use .jsonl, .json, .parquet or .csv)")
            return datasets.load_dataset(builder, data_files=str(p), split="train")
        extra = {k: v for k, v in (("data_files", data_files), ("data_dir", data_dir)) if v}
        if p.is_dir():
            return datasets.load_dataset(str(p), name, split=split, **extra)
        if local_form(path):
            raise AlignError(f"dataset {path}: file or folder not found")
        return datasets.load_dataset(path, name, split=split, **extra)
    except AlignError:
        raise
    except Exception as err:  # datasets raises many types; the user needs the path and the reason
        reason = " ".join(str(err).split())[:300]
        if "corresponds to no data" in reason:  # datasets' word for a split of no rows
            raise NoRows(f"dataset {path}: has no rows (an export of trees with no correct answer leaves its "
                         "sft and pairs configs empty)") from None
        raise AlignError(f"dataset {path}: could not be loaded ({type(err).__name__}: {reason})") from None
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def to_stage_format(ds, stage: str, source: str):
    """Convert the UltraInteract schemas to the stage's columns, or check the stage's columns are present."""
    columns = set(ds.column_names)
    spec = training_stage(stage)
    wanted = spec.columns
    for group in wanted:
        if set(group) <= columns:
            return ds.select_columns(list(group))  # extra columns would stop datasets from mixing
    if set(spec.released) <= columns:
        if stage == "sft":
            return ds.map(ultrainteract_sft_row, remove_columns=ds.column_names)
        pairs = ds.map(ultrainteract_pair_row, remove_columns=ds.column_names)
        return pairs_to_kto(pairs) if stage == "kto" else pairs
    if stage == "kto" and set(PAIR_COLUMNS) <= columns:
        return pairs_to_kto(ds)
    need = " or ".join("/".join(g) for g in wanted)
    alt = "/".join(spec.released) + (" or " + "/".join(PAIR_COLUMNS) if stage == "kto" else "")
    missing = sorted(set(wanted[0]) - columns)
    raise AlignError(
        f"dataset {source}: missing column(s) {', '.join(missing)} for the {stage} stage "
        f"(needs {need}, or the UltraInteract columns {alt}; has {', '.join(sorted(columns)) or 'none'})"
    )


# A datasets entry: ours (weight) and TRL's DatasetConfig / mixture names (fraction, data_files, data_dir, columns).
DATASET_KEYS = {"path", "weight", "fraction", "split", "name", "data_files", "data_dir", "columns"}


def _spec(item: Any, index: int) -> dict:
    if isinstance(item, str):
        item = {"path": item}
    if isinstance(item, dict) and isinstance(item.get("path"), str) and not item["path"].strip():
        raise AlignError(f"recipe: datasets[{index}] has an empty path")
    if isinstance(item, dict) and "path" in item:
        unknown = set(item) - DATASET_KEYS
        if unknown:
            raise AlignError(f"recipe: datasets[{index}] has unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                             f"(allowed: {', '.join(sorted(DATASET_KEYS))})")
        item = dict(item)
        if "fraction" in item:  # TRL's mixture name for the share of rows kept
            if "weight" in item:
                raise AlignError(f"recipe: datasets[{index}] has both fraction and weight; keep one")
            item["weight"] = item.pop("fraction")
        columns = item.get("columns")
        if columns is not None and (not isinstance(columns, list) or not all(isinstance(c, str) for c in columns)):
            raise AlignError(f"recipe: datasets[{index}].columns must be a list of column names")
        return item
    raise AlignError(f"recipe: datasets[{index}] must be a path or a mapping with 'path'")


def load_training_data(data_args, stage: str):
    """The stage's training set: every dataset loaded, converted, checked, weighted, mixed and shuffled."""
    import datasets

    if not data_args.datasets:
        raise AlignError("recipe: key 'datasets' is empty; name at least one dataset")
    specs = [_spec(item, i) for i, item in enumerate(data_args.datasets)]  # every entry checked before loading
    for i, spec in enumerate(specs):
        weight = spec.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0 < weight < float("inf"):
            raise AlignError(f"recipe: datasets[{i}].weight must be a positive number, got {weight!r}")
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a one-line error must stay one line
    try:
        return _load_and_mix(specs, data_args, stage)
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


class NoRows(AlignError):
    """A dataset that loaded and has no rows: an error alone, left out of a mixture with others that have some."""


def _load_and_mix(specs: list[dict], data_args, stage: str):
    from datasets import concatenate_datasets

    parts, empty = [], []
    for spec in specs:
        source = str(spec["path"])
        try:
            ds = load_one(source, split=spec.get("split", "train"), name=spec.get("name"),
                          data_files=spec.get("data_files"), data_dir=spec.get("data_dir"))
            if len(ds) == 0:
                raise NoRows(f"dataset {source}: has no rows")
        except NoRows as err:
            empty.append(str(err))
            continue
        if spec.get("columns"):
            missing = [c for c in spec["columns"] if c not in ds.column_names]
            if missing:
                raise AlignError(f"dataset {source}: no column(s) {', '.join(missing)} (has {', '.join(ds.column_names)})")
            ds = ds.select_columns(spec["columns"])
        ds = to_stage_format(ds, stage, source)
        weight = spec.get("weight", 1.0)
        keep = max(1, round(weight * len(ds)))
        if keep != len(ds):
            shuffled = ds.shuffle(seed=data_args.data_seed_mix)
            indices = [j % len(ds) for j in range(keep)]
            ds = shuffled.select(indices)
        parts.append(ds)
    if not parts:  # nothing to train on: the first empty one names why
        raise AlignError(empty[0] if len(empty) == 1 else f"{empty[0]}; and so have the other {len(empty) - 1}")
    for line in empty:  # a mixture with an empty part (trees of one task with no correct answer) trains on the rest
        print(f"[align] {stage}: {line}: left out of the mixture", flush=True)
    try:
        mixed = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    except ValueError as err:
        raise AlignError(f"recipe: the datasets can't be mixed, their columns differ ({err})") from None
    mixed = mixed.shuffle(seed=data_args.data_seed_mix)
    if data_args.max_train_samples:
        mixed = mixed.select(range(min(len(mixed), data_args.max_train_samples)))
    return mixed
