"""`align run PIPELINE.yaml`: every stage in order, each in its own folder, skipped when nothing changed.

A pipeline names its stages in order. Kinds:
  data      a built-in generator writes a jsonl (`generator`, `n`, `seed`)
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
from pathlib import Path

import yaml

from align.config import load_recipe_file
from align.errors import AlignError
from align.stages import TRAINING_STAGES

KINDS = ("data", "trees", *TRAINING_STAGES, "eval", "publish")
STAGE_KEYS = {"name", "kind", "recipe", "set", "enabled", "generator", "n", "seed", "digits", "split", "feedback", "problems", "models", "runs",
              "trees", "source", "repo_id", "push", "merge", "max_new_tokens", "batch_size", "turns", "limit"}
REF = re.compile(r"\$\{([A-Za-z0-9_-]+)\}")


def load_pipeline(path: str) -> dict:
    spec = load_recipe_file(path)
    unknown = set(spec) - {"output_dir", "accelerate_config", "stages", "seed"}
    if unknown:
        raise AlignError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} (allowed: output_dir, accelerate_config, stages, seed)")
    if not spec.get("output_dir"):
        raise AlignError(f"{path}: key 'output_dir' is required")
    stages = spec.get("stages")
    if not isinstance(stages, list) or not stages:
        raise AlignError(f"{path}: key 'stages' must be a non-empty list")
    names = []
    for i, stage in enumerate(stages):
        where = f"{path}: stages[{i}]"
        if not isinstance(stage, dict) or "name" not in stage or "kind" not in stage:
            raise AlignError(f"{where} needs 'name' and 'kind'")
        if stage["kind"] not in KINDS:
            raise AlignError(f"{where}: kind must be one of {', '.join(KINDS)}, got {stage['kind']!r}")
        bad = set(stage) - STAGE_KEYS
        if bad:
            raise AlignError(f"{where} ({stage['name']}): unknown key(s) {', '.join(sorted(bad))}")
        if stage["name"] in names:
            raise AlignError(f"{where}: stage name {stage['name']!r} repeats")
        for ref in REF.findall(json.dumps(stage)):
            if ref not in names:
                raise AlignError(f"{where} ({stage['name']}): ${{{ref}}} names no earlier stage")
        if stage["kind"] == "trees" or stage["kind"] in TRAINING_STAGES:
            if not stage.get("recipe"):
                raise AlignError(f"{where} ({stage['name']}): key 'recipe' is required for kind {stage['kind']}")
            if not Path(stage["recipe"]).is_file():
                raise AlignError(f"{where} ({stage['name']}): recipe {stage['recipe']} not found")
            if stage["kind"] in TRAINING_STAGES:
                from align.extras import check_report_to

                recipe = _deep_merge(load_recipe_file(stage["recipe"]), stage.get("set") or {})
                report_to = recipe.get("report_to")
                check_report_to(report_to.split(",") if isinstance(report_to, str) else report_to,
                                f"{where} ({stage['name']}): {stage['recipe']}")
        if stage["kind"] == "eval":
            from align.evaluate import parse_eval_config

            parse_eval_config({k: v for k, v in stage.items() if k not in ("name", "kind", "enabled")},
                              f"{where} ({stage['name']})")
        if stage["kind"] == "data":
            from align.quickstart import check_feedback

            check_feedback(stage.get("feedback", 0.0), f"{where} ({stage['name']})")
        names.append(stage["name"])
    if spec.get("accelerate_config"):
        from align.extras import check_accelerate_config

        check_accelerate_config(spec["accelerate_config"], f"{path}: accelerate_config")
    return spec


def _substitute(value, folders: dict[str, str]):
    if isinstance(value, str):
        return REF.sub(lambda m: folders[m.group(1)], value)
    if isinstance(value, list):
        return [_substitute(v, folders) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, folders) for k, v in value.items()}
    return value


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


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
        resolved = _substitute({k: v for k, v in stage.items() if k not in ("set",)}, self.folders)
        if stage.get("recipe"):
            recipe = load_recipe_file(stage["recipe"])
            recipe = _deep_merge(recipe, _substitute(stage.get("set") or {}, self.folders))
            recipe["output_dir"] = self.folders[stage["name"]]
            resolved["resolved_recipe"] = recipe
        return resolved

    def stage_hash(self, stage: dict, resolved: dict) -> str:
        refs = set(REF.findall(json.dumps(stage)))
        if stage["kind"] == "publish":  # publishes `source`, with the eval stage's table and plots in its card
            refs |= {stage.get("source")} | ({"eval"} & set(self.folders))
        refs = sorted(r for r in refs if r)
        payload = {"stage": resolved, "inputs": {r: self.hashes.get(r) for r in refs}}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # ------------------------------------------------------------ execution
    def _run(self, cmd: list[str], log: Path, name: str) -> None:
        with open(log, "a") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
            start = time.monotonic()
            stop = threading.Event()

            def heartbeat():
                while not stop.wait(30):
                    print(f"[align] run: {name} still running ({time.monotonic() - start:.0f}s; log {log})", flush=True)

            threading.Thread(target=heartbeat, daemon=True).start()
            code = proc.wait()
            stop.set()
        if code != 0:
            raise StageFailed(name, log, code)

    def execute(self, stage: dict, resolved: dict, folder: Path) -> list[str]:
        kind, log = stage["kind"], folder / "log.txt"
        recipe_path = folder / "recipe.yaml"
        if "resolved_recipe" in resolved:
            recipe_path.write_text(yaml.safe_dump(resolved["resolved_recipe"], sort_keys=False))
        if kind == "data":
            from align.quickstart import write_generated_data

            return [write_generated_data(resolved, folder)]
        if kind in TRAINING_STAGES:
            from align.launch import accelerate_command

            self._run(accelerate_command(kind, self.spec.get("accelerate_config"), ["--config", str(recipe_path)]),
                      log, stage["name"])
            return [str(folder)]
        if kind == "trees":
            self._run([sys.executable, "-m", "align", "trees", "build", "--config", str(recipe_path)], log, stage["name"])
            self._run([sys.executable, "-m", "align", "trees", "export", str(folder), "--output", str(folder / "export")],
                      log, stage["name"])
            return [str(folder / "trees.jsonl"), str(folder / "export")]
        if kind == "eval":
            eval_spec = folder / "eval.yaml"
            eval_spec.write_text(yaml.safe_dump({k: v for k, v in resolved.items() if k not in ("name", "kind", "enabled")}))
            self._run([sys.executable, "-m", "align", "eval", "--config", str(eval_spec), "--output", str(folder)],
                      log, stage["name"])
            print((folder / "results.md").read_text(), flush=True)
            return [str(folder / "results.json"), str(folder / "results.md"), str(folder / "plots")]
        # publish
        source = self.folders[resolved["source"]]
        cmd = [sys.executable, "-m", "align", "publish", source, "--repo-id", resolved.get("repo_id", "your-org/model"),
               "--output", str(folder / "hub"), "--eval", str(Path(self.folders.get("eval", "")) / "results.json")]
        if resolved.get("merge"):
            cmd.append("--merge")
        if not resolved.get("push"):
            cmd.append("--dry-run")
        self._run(cmd, log, stage["name"])
        return [str(folder / "hub")]

    def run(self, only: str | None = None, start_from: str | None = None, enable: set[str] = frozenset()) -> int:
        names = [s["name"] for s in self.spec["stages"]]
        for flag, value in (("--only", only), ("--from", start_from)):
            if value and value not in names:
                raise AlignError(f"{flag}: no stage named {value!r} (stages: {', '.join(names)})")
        selected = {only} if only else set(names[names.index(start_from):]) if start_from else set(names)
        self.out.mkdir(parents=True, exist_ok=True)
        total_start = time.monotonic()
        for stage in self.spec["stages"]:
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
            if record and record.get("hash") != digest and folder.exists():
                # Its config or inputs changed: what is there is stale. (Same hash: an interrupted or failed
                # attempt, whose partial work, such as finished trees, the stage resumes from.)
                shutil.rmtree(folder)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "resolved.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
            (folder / "log.txt").write_text("")
            print(f"[align] run: {name} ({stage['kind']}) ...", flush=True)
            start = time.monotonic()
            record = {"stage": name, "kind": stage["kind"], "hash": digest, "status": "running", "started": time.time()}
            (folder / "stage.json").write_text(json.dumps(record, indent=2))
            try:
                outputs = self.execute(stage, resolved, folder)
            except StageFailed as err:
                record.update(status="failed", seconds=round(time.monotonic() - start, 1), error=str(err))
                (folder / "stage.json").write_text(json.dumps(record, indent=2))
                self.summary.append({"stage": name, "status": "FAILED", "seconds": record["seconds"], "outputs": [str(err.log)]})
                self.print_summary(time.monotonic() - total_start)
                raise AlignError(f"stage {name} failed (exit {err.code}); see {err.log}; rerun to continue from it") from None
            seconds = round(time.monotonic() - start, 1)
            record.update(status="done", seconds=seconds, outputs=outputs, finished=time.time())
            (folder / "stage.json").write_text(json.dumps(record, indent=2))
            self.summary.append({"stage": name, "status": "done", "seconds": seconds, "outputs": outputs})
            print(f"[align] run: {name} done in {seconds:.0f}s", flush=True)
        self.print_summary(time.monotonic() - total_start)
        return 0

    def print_summary(self, total: float) -> None:
        lines = ["", "| stage | status | seconds | outputs |", "|---|---|---|---|"]
        for row in self.summary:
            lines.append(f"| {row['stage']} | {row['status']} | {row['seconds']:.0f} | {', '.join(row['outputs'])} |")
        lines.append(f"\ntotal {total:.0f}s")
        text = "\n".join(lines)
        print(text, flush=True)
        (self.out / "summary.md").write_text(text + "\n")


class StageFailed(Exception):
    def __init__(self, name: str, log: Path, code: int):
        super().__init__(f"{name} exited with {code}")
        self.name, self.log, self.code = name, log, code


def main(argv: list[str]):
    from align.errors import ArgumentParser

    parser = ArgumentParser(prog="align run")
    parser.add_argument("pipeline")
    parser.add_argument("--only", help="run this stage only")
    parser.add_argument("--from", dest="start_from", help="run this stage and the ones after it")
    parser.add_argument("--enable", default="", help="comma-separated stages marked enabled: false to run too")
    parser.add_argument("--force", action="store_true", help="rerun selected stages even if unchanged")
    args = parser.parse_args(argv)
    spec = load_pipeline(args.pipeline)
    enable = {s for s in args.enable.split(",") if s}
    return Runner(spec, args.pipeline, force=args.force).run(args.only, args.start_from, enable)
