"""`align run PIPELINE.yaml`: every stage in order, each in its own folder, skipped when nothing changed.

A pipeline names its stages in order. Kinds:
  data      a built-in generator writes a jsonl (`generator`, `n`, `seed`)
  upcycle   `align upcycle` of a dense `model` into a Mixtral-type MoE (`experts`, `top_k`, ...); ${NAME} is it
  trees     `align trees build` with `recipe` (+ `set`), then `align trees export` into <stage>/export
  sft, dpo, kto, nca   `accelerate launch -m align KIND` with `recipe` (+ `set`)
  eval      pass@1 of `models` on `problems` (+ plots of the runs it names)
  publish   `align publish` of the stage named by `source` (a dry run unless `push: true`)

`set` overrides recipe keys; `${NAME}` in any value is stage NAME's output folder. Each stage folder
holds the fully resolved config, `log.txt` and `stage.json` (hash of config and inputs, time, outputs).
A finished stage whose hash is unchanged is skipped; `--from` / `--only` select stages; a failing stage
stops the run naming its log, and the next run continues from there.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from align.core import lifecycle
from align.train.config import load_recipe_file
from align.train.data import local_form
from align.core.environment import LIBRARY_LOG_ENV
from align.core.errors import AlignError
from align.stages import TRAINING_STAGES

KINDS = ("data", "upcycle", "trees", *TRAINING_STAGES, "eval", "publish")
COMMON_KEYS = {"name", "kind", "enabled"}
REF = re.compile(r"\$\{([A-Za-z0-9_-]+)\}")


@dataclass
class DataStage:
    """kind: data, a built-in generator writing <stage>/train.jsonl."""

    generator: str = field(default="addition-sft", metadata={"help": "One of align.runner.quickstart.GENERATORS."})
    n: int = field(default=20000, metadata={"help": "Rows.", "range": (1, None)})
    seed: int = field(default=0, metadata={"help": "Seed of the generator."})
    digits: list[int] = field(default_factory=lambda: [2, 3], metadata={"help": "Operand digit counts, mixed evenly."})
    split: str = field(default="train", metadata={"help": "all, train (no held-out pair) or heldout."})
    feedback: float = field(default=0.0, metadata={"help": "Fraction of rows showing a wrong try and the critic's turn.",
                                                   "range": (0.0, 1.0)})
    critic: str = field(default="observation", metadata={"help": "The feedback rows' critic: observation or steps."})


@dataclass
class UpcycleStage:
    """kind: upcycle, a dense model made a Mixtral-type MoE in the stage folder (align/moe/upcycle.py)."""

    model: str = field(metadata={"help": "The dense model: a folder, hub id, FILE.gguf or a packaged model name."})
    experts: int = field(default=4, metadata={"help": "Experts per layer (at least 2)."})
    top_k: int = field(default=2, metadata={"help": "Experts per token (1 to experts)."})
    router_init: str = field(default="normal", metadata={"help": "normal (N(0, router_std)) or zeros."})
    router_std: float | None = field(default=None, metadata={"help": "Std of a normal router (default: the model's initializer_range)."})
    noise: float = field(default=0.0, metadata={"help": "Relative noise on the experts' weights (0: exact copies)."})
    seed: int = field(default=0, metadata={"help": "Seed of the router and the noise."})
    dtype: str = field(default="auto", metadata={"help": "auto (the checkpoint's; float32 for a GGUF), float32, bfloat16, float16."})


@dataclass
class RecipeStage:
    """kind: trees, sft, dpo, kto, nca: a recipe file, with `set` overriding its keys."""

    recipe: str = field(metadata={"help": "The stage's recipe file."})
    set: dict = field(default_factory=dict, metadata={"help": "Recipe keys to override (${stage} allowed)."})
    accelerate_config: str | None = field(default=None, metadata={
        "help": "Training stages: this stage's accelerate config (default: the pipeline's accelerate_config)."})


@dataclass
class PublishStage:
    """kind: publish, a Hub-ready folder of a training stage's output (pushed when push: true)."""

    source: str = field(metadata={"help": "The training stage whose output is published."})
    repo_id: str = field(default="your-org/model", metadata={"help": "ORG/NAME on the Hub."})
    push: bool = field(default=False, metadata={"help": "Push (else a dry run: the folder only)."})
    merge: bool = field(default=False, metadata={"help": "Publish the base with the adapter merged in."})
    base_repo_id: str | None = field(default=None, metadata={"help": "The base model's Hub repo, when it is a local folder."})
    dataset_repo_ids: list[str] = field(default_factory=list, metadata={"help": "Hub repos of the training data, when local."})


def stage_settings_class(kind: str):
    from align.evaluation.evaluate import EvalConfig

    return {"data": DataStage, "upcycle": UpcycleStage, "eval": EvalConfig, "publish": PublishStage}.get(kind, RecipeStage)


def load_pipeline(path: str) -> dict:
    """The pipeline file, every stage's own keys checked against its kind (its recipe: see check_pipeline)."""
    from align.train.config import validate_keys

    spec = load_recipe_file(path)
    unknown = set(spec) - {"output_dir", "accelerate_config", "stages", "seed"}
    if unknown:
        raise AlignError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} (allowed: output_dir, accelerate_config, stages, seed)")
    if not spec.get("output_dir") or not isinstance(spec["output_dir"], str):
        raise AlignError(f"{path}: key 'output_dir' is required")
    if Path(spec["output_dir"]).exists() and not Path(spec["output_dir"]).is_dir():
        raise AlignError(f"{path}: key 'output_dir': {spec['output_dir']} is a file, not a folder")
    if "seed" in spec and (isinstance(spec["seed"], bool) or not isinstance(spec["seed"], int)):
        raise AlignError(f"{path}: key 'seed' must be a whole number")
    stages = spec.get("stages")
    if not isinstance(stages, list) or not stages:
        raise AlignError(f"{path}: key 'stages' must be a non-empty list")
    names = []
    for i, stage in enumerate(stages):
        where = f"{path}: stages[{i}]"
        if not isinstance(stage, dict) or "name" not in stage or "kind" not in stage:
            raise AlignError(f"{where} needs 'name' and 'kind'")
        if not isinstance(stage["name"], str) or not re.fullmatch(r"[A-Za-z0-9_-]+", stage["name"]):
            raise AlignError(f"{where}: name must be letters, digits, '-' or '_', got {stage['name']!r}")
        if stage["kind"] not in KINDS:
            raise AlignError(f"{where}: kind must be one of {', '.join(KINDS)}, got {stage['kind']!r}")
        if stage["name"] in names:
            raise AlignError(f"{where}: stage name {stage['name']!r} repeats")
        for ref in REF.findall(json.dumps(stage)):
            if ref not in names:
                raise AlignError(f"{where} ({stage['name']}): ${{{ref}}} names no earlier stage")
        where = f"{where} ({stage['name']})"
        if not isinstance(stage.get("enabled", True), bool):
            raise AlignError(f"{where}: key 'enabled' must be true or false")
        settings = {k: v for k, v in stage.items() if k not in COMMON_KEYS}
        cls = stage_settings_class(stage["kind"])
        if stage["kind"] == "eval":
            from align.evaluation.evaluate import parse_eval_config

            parse_eval_config(settings, where)
        else:
            required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                        and f.default_factory is dataclasses.MISSING]
            for key in required:
                if key not in settings:
                    raise AlignError(f"{where}: key '{key}' is required for kind {stage['kind']}")
            validate_keys(settings, [cls], where)
        if cls is RecipeStage:
            if not Path(stage["recipe"]).is_file():
                raise AlignError(f"{where}: recipe {stage['recipe']} not found")
            if stage.get("accelerate_config"):
                if stage["kind"] not in TRAINING_STAGES:
                    raise AlignError(f"{where}: key 'accelerate_config' is for training stages only")
                from align.train.extras import check_accelerate_config

                check_accelerate_config(stage["accelerate_config"], f"{where}: accelerate_config")
            if not isinstance(stage.get("set") or {}, dict):
                raise AlignError(f"{where}: key 'set' must be a mapping of recipe keys")
        if stage["kind"] == "data":
            from align.runner.quickstart import GENERATORS

            if stage.get("generator", "addition-sft") not in GENERATORS:
                raise AlignError(f"{where}: generator must be one of {', '.join(GENERATORS)}, got {stage.get('generator')!r}")
            digits = stage.get("digits", [2, 3])
            if not digits or not all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 9 for d in digits):
                raise AlignError(f"{where}: key 'digits' must list digit counts from 1 to 9, got {digits!r}")
            if stage.get("split", "train") not in ("all", "train", "heldout"):
                raise AlignError(f"{where}: key 'split' must be all, train or heldout, got {stage.get('split')!r}")
        if stage["kind"] == "upcycle":
            from align.moe.upcycle import UpcycleOptions, check_options

            check_options(UpcycleOptions(**{k: v for k, v in settings.items() if k != "model"}), where)
        if stage["kind"] == "publish":
            source = stage["source"]
            kinds = {s["name"]: s["kind"] for s in stages[:i]}
            if kinds.get(source) not in TRAINING_STAGES:
                raise AlignError(f"{where}: source {source!r} is not an earlier training stage "
                                 f"({', '.join(n for n, k in kinds.items() if k in TRAINING_STAGES) or 'none'})")
            if "/" not in str(stage.get("repo_id", "your-org/model")):
                raise AlignError(f"{where}: repo_id {stage.get('repo_id')!r} should look like ORG/NAME")
        names.append(stage["name"])
    if spec.get("accelerate_config"):
        from align.train.extras import check_accelerate_config

        check_accelerate_config(spec["accelerate_config"], f"{path}: accelerate_config")
    return spec


def substitute_refs(value, folders: dict[str, str]):
    """`value` (a stage or part of one) with each `${name}` of `folders` replaced by its folder; a reference
    to a name not in `folders` stays (load_pipeline has refused those that name no stage)."""
    if isinstance(value, str):
        return REF.sub(lambda m: folders.get(m.group(1), m.group(0)), value)
    if isinstance(value, list):
        return [substitute_refs(v, folders) for v in value]
    if isinstance(value, dict):
        return {k: substitute_refs(v, folders) for k, v in value.items()}
    return value


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _clear_folder(folder: Path, keep: tuple[str, ...] = ()) -> None:
    """Remove a stage folder's contents, all but its lock (which this run holds) and the names in `keep`."""
    from align.core.lifecycle import LOCK_NAME

    for path in folder.iterdir():
        if path.name == LOCK_NAME or path.name in keep:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _kept_through_a_change(folder: Path, kind: str) -> tuple[str, ...]:
    """What a stage whose config or inputs changed keeps besides its log: an eval stage its models' finished
    results (results_NAME.json and answers_NAME.jsonl), which `align eval` reuses only when their fingerprint
    (problems, the settings results depend on, the model's entry and files) still matches. So enabling one
    more model, or retraining one, evaluates that model alone."""
    if kind != "eval" or not folder.is_dir():
        return ()
    return tuple(sorted(p.name for pattern in ("results_*.json", "answers_*.jsonl") for p in folder.glob(pattern)))


LOG_ATTEMPT = "===== align run: attempt "  # each attempt's first line in a stage's log.txt


def _attempt_number(folder: Path, record: dict | None) -> int:
    """This attempt's number at the stage: one more than the last one's (stage.json's, else the headers in
    log.txt, else none: 1)."""
    last = record.get("attempt") if record else None
    if not isinstance(last, int) or isinstance(last, bool):
        last = 0
        try:
            with open(folder / "log.txt", errors="replace") as f:
                last = sum(line.startswith(LOG_ATTEMPT) for line in f)
        except OSError:
            pass
        if not last and record:
            last = 1  # a stage run before attempts were counted
    return last + 1


def _last_attempt(record: dict | None) -> str:
    """How the last attempt at a stage ended, from its stage.json, for the next attempt's log header."""
    status = (record or {}).get("status")
    if status == "interrupted":
        return f"the last one was interrupted ({record.get('signal', 'a stop signal')})"
    if status == "running":  # its run was killed (kill -9, a dead node) before it could say anything
        return "the last one ended without a word (killed)"
    return f"the last one {status}" if status else "the last one left no stage.json"


def _start_log_attempt(log: Path, attempt: int, why: str) -> None:
    """Append this attempt's header to the stage's log: the earlier attempts' output (an interrupted one's
    last lines above all) stays above it, and a blank line sets it apart from a last line cut off mid-way."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())
    with open(log, "ab+") as f:
        if f.tell():
            f.seek(-1, os.SEEK_END)
            f.write(b"\n\n" if f.read(1) != b"\n" else b"\n")
    with open(log, "a") as f:
        f.write(f"{LOG_ATTEMPT}{attempt}, {stamp}, pid {os.getpid()}: {why} =====\n")


def _stage_record(folder: Path) -> dict | None:
    path = folder / "stage.json"
    return json.loads(path.read_text()) if path.exists() else None


class Runner:
    def __init__(self, spec: dict, path: str, force: bool = False):
        self.spec, self.path, self.force = spec, path, force
        self.out = Path(spec["output_dir"])
        self.folders = {s["name"]: str(self.out / s["name"]) for s in spec["stages"]}
        self.hashes: dict[str, str] = {}
        self.summary: list[dict] = []

    # ------------------------------------------------------------ resolution
    def resolve(self, stage: dict) -> dict:
        """The stage with references replaced and its recipe merged in: what it runs, and what its hash covers."""
        resolved = substitute_refs({k: v for k, v in stage.items() if k not in ("set",)}, self.folders)
        if stage.get("recipe"):
            recipe = load_recipe_file(stage["recipe"])
            recipe = _deep_merge(recipe, substitute_refs(stage.get("set") or {}, self.folders))
            recipe["output_dir"] = self.folders[stage["name"]]
            resolved["resolved_recipe"] = recipe
        return resolved

    def stage_hash(self, stage: dict, resolved: dict) -> str:
        refs = set(REF.findall(json.dumps(stage)))
        if stage["kind"] == "publish":  # publishes `source`, with the eval stage's table and plots in its card
            refs |= {stage.get("source")} | ({"eval"} & set(self.folders))
        refs = sorted(r for r in refs if r)
        from align.core.leaks import mask

        # over the masked stage: a token or password changes nothing a stage makes (and its hash is written)
        payload = {"stage": mask(resolved)[0], "inputs": {r: self.hashes.get(r) for r in refs}}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # ------------------------------------------------------------ checking
    def produced(self, path) -> bool:
        """A path inside this pipeline's output folder: made by a stage, so not there before it runs."""
        try:
            Path(path).expanduser().resolve().relative_to(self.out.resolve())
            return True
        except (ValueError, TypeError):
            return False

    def _exists_or_produced(self, path, where: str, what: str) -> None:
        if isinstance(path, str) and local_form(path) and not self.produced(path) and not Path(path).expanduser().exists():
            raise AlignError(f"{where}: {what} {path} not found")

    def check(self, enable: set[str] = frozenset(), only: set[str] | None = None) -> list[str]:
        """Every stage (or those in `only`) resolved (recipe + set + ${stage}) and validated as it will run:
        keys, types, ranges, files, stage names, trackers, accelerate config. No model is loaded; returns a
        line per stage."""
        names = [s["name"] for s in self.spec["stages"]]
        for name in enable:
            if name not in names:
                raise AlignError(f"--enable: no stage named {name!r} (stages: {', '.join(names)})")
        lines = []
        for i, stage in enumerate(self.spec["stages"]):
            if only is not None and stage["name"] not in only:
                continue
            kind, where = stage["kind"], f"{self.path}: stages[{i}] ({stage['name']})"
            resolved = self.resolve(stage)
            if kind == "upcycle":
                self._check_upcycle(resolved["model"], where)
            elif kind == "trees":
                self._check_trees(resolved["resolved_recipe"], f"{where}: {stage['recipe']}")
            elif kind in TRAINING_STAGES:
                self._check_training(kind, resolved["resolved_recipe"], f"{where}: {stage['recipe']}")
            elif kind == "eval":
                from align.evaluation.evaluate import check_eval_models, parse_eval_config

                config = parse_eval_config({k: v for k, v in resolved.items() if k not in COMMON_KEYS}, where)
                self._check_problems(config.problems, where)
                check_eval_models(config, where, self.produced)
                for model_name, m in config.models.items():
                    if m.get("backend", "local") != "local" and m.get("api_key_env") and not os.environ.get(m["api_key_env"]):
                        raise AlignError(f"{where}: models.{model_name}: environment variable {m['api_key_env']} "
                                         "(api_key_env) is not set")
            enabled = stage.get("enabled", True) or stage["name"] in enable
            note = "" if enabled else " (disabled; --enable to run)"
            if kind in TRAINING_STAGES and not _has_gpu():
                config_file = stage.get("accelerate_config") or self.spec.get("accelerate_config")
                kind_of = str(load_recipe_file(config_file).get("distributed_type", "NO")) if config_file else "NO"
                if kind_of in ("FSDP", "DEEPSPEED"):
                    note += f" (its accelerate config asks for {kind_of}, which needs GPUs: not on this machine)"
            lines.append(f"{stage['name']} ({kind}): ok{note}")
        return lines

    def _check_upcycle(self, model: str, where: str) -> None:
        from align.train.models import PACKAGED_MODELS, resolve_model_path

        if model in PACKAGED_MODELS:
            try:
                resolve_model_path(model)  # its package is installed
            except AlignError as err:
                raise AlignError(f"{where}: {err}") from None
        else:
            self._exists_or_produced(model, where, "model")

    def _check_problems(self, problems, where: str) -> None:
        from align.tasks.problems import problems_location

        for spec in [problems] if isinstance(problems, str) else problems:
            try:
                location = problems_location(spec)
            except AlignError as err:
                raise AlignError(f"{where}: {err}") from None
            if location is None or self.produced(location) or Path(location).expanduser().exists():
                continue
            if local_form(location):
                raise AlignError(f"{where}: problems {location} not found")

    def _check_trees(self, recipe: dict, where: str) -> None:
        from align.trees.builder import check_trees_models, parse_trees_config

        if "problems" not in recipe:
            raise AlignError(f"{where}: key 'problems' is required (a trees recipe names its problems)")
        recipe = copy.deepcopy(recipe)
        for role in ("actor", "critic"):
            part = recipe.get(role)
            if isinstance(part, dict) and isinstance(part.get("adapter"), str) and self.produced(part["adapter"]):
                del part["adapter"]  # made by an earlier stage: checked when it exists
        config, actor, critic, _ = parse_trees_config(recipe, where)
        self._check_problems(config.problems, where)
        check_trees_models(actor, critic, where, self.produced)
        for role, spec in (("actor", actor), ("critic", critic)):
            if role == "critic" and critic.type != "llm":
                continue
            if spec.backend != "local" and spec.api_key_env and not os.environ.get(spec.api_key_env):
                raise AlignError(f"{where}: {role}: environment variable {spec.api_key_env} (api_key_env) is not set")

    def _check_training(self, kind: str, recipe: dict, where: str) -> None:
        from align.train.config import parse_stage_recipe
        from align.train.preflight import check_stage_settings
        from align.stages import training_stage

        spec = training_stage(kind)
        # On a machine without an accelerator a GPU recipe is checked as the CPU would run it (TRL refuses
        # bf16 there unless use_cpu, which says nothing about the recipe): cpu_processes_defaults does that.
        model_args, data_args, args = parse_stage_recipe(spec.config_class(), recipe, where, {}, apply_env=False)
        adapter = model_args.adapter_name_or_path
        if adapter and self.produced(adapter):
            model_args.adapter_name_or_path = None  # made by an earlier stage: checked when it exists
        check_stage_settings(spec, model_args, data_args, args, where, self.produced)
        if not data_args.datasets:
            raise AlignError(f"{where}: key 'datasets' is empty; name at least one dataset")
        from align.train.data import _spec

        for j, item in enumerate(data_args.datasets):
            self._exists_or_produced(str(_spec(item, j)["path"]), where, f"datasets[{j}]")

    # ------------------------------------------------------------ execution
    def _run(self, cmd: list[str], log: Path, name: str, secrets: dict | None = None, launcher: bool = False) -> None:
        """Run one command of a stage, its whole output into `log`; meanwhile show the stage's progress
        (align/core/progress.py): one line rewritten in place on a terminal, else a line every HEARTBEAT_S.
        `secrets` ({file: what align.core.leaks.mask found}) go to the command in its environment, not a file.
        A stop signal stops the command's whole tree of processes (align/core/lifecycle.py; `launcher`: the
        command is `accelerate launch`, whose workers get the signal) and raises Interrupted."""
        from align.core.leaks import mask_argv, recipe_secrets_env
        from align.core.progress import PROGRESS_ENV, read_progress

        progress_file = log.parent / "progress.json"
        progress_file.unlink(missing_ok=True)  # (an earlier command's, or an interrupted attempt's)
        with open(log, "a") as f:
            f.write(f"$ {shlex.join(mask_argv(cmd))}\n")
            f.flush()
            env = {**os.environ, "PYTHONUNBUFFERED": "1", PROGRESS_ENV: str(progress_file),
                   LIBRARY_LOG_ENV: "-",  # the stage's stderr is its log: other libraries' records go there
                   **recipe_secrets_env(secrets or {})}
            proc = lifecycle.start(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
            start = time.monotonic()
            stop = threading.Event()
            live = sys.stdout.isatty()

            def heartbeat():
                while not stop.wait(LIVE_S if live else HEARTBEAT_S):
                    elapsed = time.monotonic() - start
                    shown = read_progress(progress_file)
                    if live:
                        width = shutil.get_terminal_size((100, 20)).columns - 1
                        text = f"[align] run: {name}: {shown or 'running'} ({elapsed:.0f}s)"
                        sys.stdout.write("\r\033[K" + text[:width])
                        sys.stdout.flush()
                    elif shown:
                        print(f"[align] run: {name}: {shown} ({elapsed:.0f}s; log {log})", flush=True)
                    else:
                        print(f"[align] run: {name} still running ({elapsed:.0f}s; log {log})", flush=True)

            beat = threading.Thread(target=heartbeat, daemon=True)
            beat.start()
            try:
                code = lifecycle.wait(proc, spare_launcher=launcher)
            finally:
                stop.set()
                beat.join()
                if live:
                    sys.stdout.write("\r\033[K")
                    sys.stdout.flush()
        if code != 0:
            raise StageFailed(name, log, code)

    def execute(self, stage: dict, resolved: dict, folder: Path, resume_from: Path | None = None) -> list[str]:
        from align.core.leaks import mask

        kind, log = stage["kind"], folder / "log.txt"
        recipe_path = folder / "recipe.yaml"
        secrets = {}  # the recipe's credentials: written masked, handed to the stage's processes in memory
        if "resolved_recipe" in resolved:
            recipe, secrets[str(recipe_path)] = mask(resolved["resolved_recipe"])
            recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        if kind == "data":
            from align.runner.quickstart import write_generated_data

            return [write_generated_data(resolved, folder)]
        if kind == "upcycle":
            cmd = [sys.executable, "-m", "align", "upcycle", resolved["model"], str(folder), "--replace"]
            for key in ("experts", "top_k", "router_init", "router_std", "noise", "seed", "dtype"):
                if resolved.get(key) is not None:
                    cmd += [f"--{key.replace('_', '-')}", str(resolved[key])]
            self._run(cmd, log, stage["name"])
            return [str(folder)]
        if kind in TRAINING_STAGES:
            from align.train.launch import accelerate_command

            config_file = stage.get("accelerate_config") or self.spec.get("accelerate_config")
            stage_argv = ["--config", str(recipe_path)]
            if resume_from is not None:
                stage_argv += ["--resume_from_checkpoint", str(resume_from)]
            self._run(accelerate_command(kind, config_file, stage_argv), log, stage["name"], secrets, launcher=True)
            return [str(folder)]
        if kind == "trees":
            self._run([sys.executable, "-m", "align", "trees", "build", "--config", str(recipe_path)], log, stage["name"],
                      secrets)
            self._run([sys.executable, "-m", "align", "trees", "export", str(folder), "--output", str(folder / "export")],
                      log, stage["name"])
            return [str(folder / "trees.jsonl"), str(folder / "export")]
        if kind == "eval":
            eval_spec = folder / "eval.yaml"
            spec, secrets[str(eval_spec)] = mask({k: v for k, v in resolved.items() if k not in ("name", "kind", "enabled")})
            eval_spec.write_text(yaml.safe_dump(spec))
            self._run([sys.executable, "-m", "align", "eval", "--config", str(eval_spec), "--output", str(folder)],
                      log, stage["name"], secrets)
            print((folder / "results.md").read_text(), flush=True)
            return [str(folder / "results.json"), str(folder / "results.md"), str(folder / "plots")]
        # publish
        source = self.folders[resolved["source"]]
        cmd = [sys.executable, "-m", "align", "publish", source, "--repo-id", resolved.get("repo_id", "your-org/model"),
               "--output", str(folder / "hub"), "--eval", str(Path(self.folders.get("eval", "")) / "results.json")]
        if resolved.get("merge"):
            cmd.append("--merge")
        if resolved.get("base_repo_id"):
            cmd += ["--base-repo-id", resolved["base_repo_id"]]
        for repo in resolved.get("dataset_repo_ids") or []:
            cmd += ["--dataset-repo-id", repo]
        if not resolved.get("push"):
            cmd.append("--dry-run")
        # the source stage's credentials, in memory: the publish checks the folder for their values too
        source_stage = next(s for s in self.spec["stages"] if s["name"] == resolved["source"])
        source_recipe = self.resolve(source_stage).get("resolved_recipe") or {}
        self._run(cmd, log, stage["name"], {str(Path(source) / "recipe.yaml"): mask(source_recipe)[1]})
        return [str(folder / "hub")]

    def run(self, only: str | None = None, start_from: str | None = None, enable: set[str] = frozenset()) -> int:
        names = [s["name"] for s in self.spec["stages"]]
        for flag, value in (("--only", only), ("--from", start_from)):
            if value and value not in names:
                raise AlignError(f"{flag}: no stage named {value!r} (stages: {', '.join(names)})")
        selected = {only} if only else set(names[names.index(start_from):]) if start_from else set(names)
        self.out.mkdir(parents=True, exist_ok=True)
        lifecycle.reset()  # (a stop signal before this point ended the command already)
        total_start = time.monotonic()
        for stage in self.spec["stages"]:
            if lifecycle.requested():  # came while the last stage ended: it is done, the rest waits
                raise lifecycle.Interrupted(lifecycle.requested())
            name, folder = stage["name"], Path(self.folders[stage["name"]])
            enabled = stage.get("enabled", True) or name in enable
            resolved = self.resolve(stage)
            digest = self.stage_hash(stage, resolved)
            record = _stage_record(folder)
            if not enabled:
                self.summary.append({"stage": name, "status": "disabled", "seconds": 0, "outputs": []})
                continue
            if name not in selected:
                if not record or record.get("status") != "done":
                    if any(f"${{{name}}}" in json.dumps(s) for s in self.spec["stages"] if s["name"] in selected):
                        raise AlignError(f"stage {name} is needed by the selected stages but has not finished; run it first")
                self.hashes[name] = record.get("hash") if record else None
                self.summary.append({"stage": name, "status": "not selected", "seconds": 0, "outputs": []})
                continue
            self.hashes[name] = digest
            if record and record.get("status") == "done" and record.get("hash") == digest and not self.force:
                print(f"[align] run: {name} unchanged, skipped", flush=True)
                self.summary.append({"stage": name, "status": "skipped", "seconds": 0, "outputs": record["outputs"]})
                continue
            # One writer per stage folder: another live run (or stage command) writing it: one line naming it.
            lifecycle.lock_folder(folder, f"align run {self.path} (stage {name})")
            try:
                self._run_stage(stage, resolved, digest, folder, _stage_record(folder), total_start)
            finally:
                lifecycle.unlock_folder(folder)
        self.print_summary(time.monotonic() - total_start)
        return 0

    def _run_stage(self, stage: dict, resolved: dict, digest: str, folder: Path, record: dict | None,
                   total_start: float) -> None:
        name = stage["name"]
        resume_from = None
        attempt = _attempt_number(folder, record)
        why = "the first" if attempt == 1 else _last_attempt(record)
        if record and (record.get("hash") != digest or self.force) and folder.exists():
            # Its config or inputs changed (or --force): what is there is stale. (Same hash: an interrupted
            # or failed attempt, whose partial work the stage resumes from: finished trees, checkpoints.)
            # The log of the earlier attempts stays: each attempt appends to it under its own header line.
            kept = () if self.force else _kept_through_a_change(folder, stage["kind"])
            _clear_folder(folder, keep=("log.txt",) + kept)
            if kept:
                why += ("; restarted (its config or inputs changed), each model's finished results kept for eval "
                        "to reuse where their fingerprint still matches")
            else:
                why += "; restarted from nothing (" + ("--force" if self.force else "its config or inputs changed") + ")"
        elif record and stage["kind"] in TRAINING_STAGES:
            from align.train.checkpoints import newest_checkpoint, resume_line

            resume_from, skipped = newest_checkpoint(folder)
            for note in skipped:
                print(f"[align] run: {name}: {note}", flush=True)
            if resume_from is not None:
                print(f"[align] run: {resume_line(name, resume_from)}", flush=True)
                why += f"; {resume_line(name, resume_from).split(': ', 1)[1]}"
            else:
                why += "; no whole checkpoint: from step 0"
        folder.mkdir(parents=True, exist_ok=True)
        from align.core.leaks import mask

        (folder / "resolved.yaml").write_text(yaml.safe_dump(mask(resolved)[0], sort_keys=False))
        _start_log_attempt(folder / "log.txt", attempt, why)
        print(f"[align] run: {name} ({stage['kind']}) ...", flush=True)
        start = time.monotonic()
        record = {"stage": name, "kind": stage["kind"], "hash": digest, "status": "running", "started": time.time(),
                  "pid": os.getpid(), "attempt": attempt}
        if resume_from is not None:
            record["resumed_from"] = resume_from.name
        lifecycle.write_json_atomic(folder / "stage.json", record)
        try:
            outputs = self.execute(stage, resolved, folder, resume_from)
        except lifecycle.Interrupted as stop:
            record.update(status="interrupted", signal=lifecycle.signal_name(stop.signum),
                          seconds=round(time.monotonic() - start, 1))
            lifecycle.write_json_atomic(folder / "stage.json", record)
            self.summary.append({"stage": name, "status": "INTERRUPTED", "seconds": record["seconds"],
                                 "outputs": [str(folder / "log.txt")]})
            self.print_summary(time.monotonic() - total_start)
            print(f"[align] run: {name} interrupted ({lifecycle.signal_name(stop.signum)}); rerun to continue "
                  "from it", flush=True)
            raise
        except StageFailed as err:
            record.update(status="failed", seconds=round(time.monotonic() - start, 1), error=str(err))
            lifecycle.write_json_atomic(folder / "stage.json", record)
            self.summary.append({"stage": name, "status": "FAILED", "seconds": record["seconds"], "outputs": [str(err.log)]})
            self.print_summary(time.monotonic() - total_start)
            raise AlignError(f"stage {name} failed (exit {err.code}); see {err.log}; rerun to continue from it") from None
        with lifecycle.deferred():  # done is recorded whole; a stop signal now ends the run before the next stage
            seconds = round(time.monotonic() - start, 1)
            record.update(status="done", seconds=seconds, outputs=outputs, finished=time.time())
            lifecycle.write_json_atomic(folder / "stage.json", record)
            self.summary.append({"stage": name, "status": "done", "seconds": seconds, "outputs": outputs})
            print(f"[align] run: {name} done in {seconds:.0f}s", flush=True)

    def print_summary(self, total: float) -> None:
        lines = ["", "| stage | status | seconds | outputs |", "|---|---|---|---|"]
        for row in self.summary:
            lines.append(f"| {row['stage']} | {row['status']} | {row['seconds']:.0f} | {', '.join(row['outputs'])} |")
        lines.append(f"\ntotal {total:.0f}s")
        text = "\n".join(lines)
        print(text, flush=True)
        (self.out / "summary.md").write_text(text + "\n")


HEARTBEAT_S = 30.0  # a progress line in a log (not a terminal)
LIVE_S = 1.0  # the live line on a terminal


class StageFailed(Exception):
    def __init__(self, name: str, log: Path, code: int):
        super().__init__(f"{name} exited with {code}")
        self.name, self.log, self.code = name, log, code


def main(argv: list[str]):
    from align.core.errors import ArgumentParser

    parser = ArgumentParser(prog="align run")
    parser.add_argument("pipeline")
    parser.add_argument("--only", help="run this stage only")
    parser.add_argument("--from", dest="start_from", help="run this stage and the ones after it")
    parser.add_argument("--enable", default="", help="comma-separated stages marked enabled: false to run too")
    parser.add_argument("--force", action="store_true", help="rerun selected stages even if unchanged")
    parser.add_argument("--check", action="store_true",
                        help="resolve and validate every stage (recipes, set:, ${stage}, files, keys), load no model, run nothing")
    args = parser.parse_args(argv)
    spec = load_pipeline(args.pipeline)
    enable = {s for s in args.enable.split(",") if s}
    runner = Runner(spec, args.pipeline, force=args.force)
    names = [s["name"] for s in spec["stages"]]
    for flag, value in (("--only", args.only), ("--from", args.start_from)):
        if value and value not in names:
            raise AlignError(f"{flag}: no stage named {value!r} (stages: {', '.join(names)})")
    to_run = None  # --check: every stage; a run: the stages it will run, before the first one starts
    if not args.check:
        chosen = [args.only] if args.only else names[names.index(args.start_from):] if args.start_from else names
        to_run = {s["name"] for s in spec["stages"] if s["name"] in chosen and (s.get("enabled", True) or s["name"] in enable)}
    with warnings.catch_warnings():  # libraries' deprecation notes about their own defaults: not the recipe's
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        lines = runner.check(enable, to_run)  # a typo in the last stage costs seconds, not the earlier stages' hours
    if args.check:
        print("\n".join(lines + [f"{args.pipeline}: {len(lines)} stages check out"]))
        return 0
    return runner.run(args.only, args.start_from, enable)
