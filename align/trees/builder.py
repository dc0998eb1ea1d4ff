"""Build one preference tree per problem from multi-turn critique rollouts (UltraInteract's procedure).

Per turn: sample k actions given the history and verify each. A turn with a correct and an incorrect
action records a pair (picked by a seeded rule); the correct action ends its branch and the incorrect
one is extended: its observation and the critique become the next user turn. The tree stops at
max_turns or when no incorrect action is left to extend. All-correct and all-wrong turns are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from align.core.errors import AlignError
from align.evaluation.backends import BackendError, ModelSpec, make_backend
from align.tasks.critic import LLMCritic, ObservationCritic, StepCritic, feedback_turn, load_template, opening
from align.tasks.problems import Problem, load_problems
from align.tasks.sandbox import SandboxLimits
from align.trees.store import FAILURES_FILE, StoreLocked, TreeStore, write_atomic
from align.tasks.verifiers import verify

BUILD_INFO = "build_info.json"


@dataclass
class CriticSpec(ModelSpec):
    type: str = "observation"  # observation | steps (the first wrong step, built-in addition) | llm
    template: str | None = None  # llm: prompt template file (default align/templates/critic.txt)


@dataclass
class TreesConfig:
    problems: str = field(default="arithmetic:64:0", metadata={"help": "Dataset path/hub id, or humaneval, arithmetic[:N[:SEED]]."})
    output_dir: str = field(default="data/preference_trees/run", metadata={"help": "Where trees.jsonl grows."})
    max_turns: int = field(default=5, metadata={"help": "Turns per tree at most (UltraInteract: 5).", "range": (1, 20)})
    samples_per_turn: int = field(default=2, metadata={"help": "Actions sampled per turn (at least 2).", "range": (2, 64)})
    seed: int = field(default=0, metadata={"help": "Seeds sampling and the pair choice."})
    parallel_trees: int = field(default=8, metadata={"help": "Trees built concurrently; with a local model, the group of trees whose requests are one batch per turn.", "range": (1, 4096)})
    verifier_workers: int = field(default=4, metadata={"help": "Threads running verifiers and the sandbox.", "range": (1, 256)})
    limit: int | None = field(default=None, metadata={"help": "Use only the first N problems.", "range": (1, None)})
    system_prompt: str | None = field(default=None, metadata={
        "help": "A system message before each problem, placed as the actor's chat template places it; the "
                "exported rows carry it, so SFT and the preference stages train on the same rendering."})
    skip_bad_rows: bool = field(default=False, metadata={"help": "Skip invalid problem rows (listed in a report)."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})
    report_to: list[str] = field(default_factory=list, metadata={
        "help": "Trackers that get the build's metrics every 100 trees and at the end (tensorboard, wandb, "
                "trackio, ...: accelerate's), as in TRL."})
    run_name: str = field(default="trees", metadata={"help": "The run's name in the trackers."})
    actor: dict = field(default_factory=dict, metadata={"help": "ModelSpec of the actor."})
    critic: dict = field(default_factory=dict, metadata={"help": "CriticSpec: type observation | llm, plus a ModelSpec."})
    sandbox: dict = field(default_factory=dict, metadata={"help": "SandboxLimits: timeout_s, memory_mb, ..."})


def parse_trees_config(values: dict, source: str) -> tuple[TreesConfig, ModelSpec, CriticSpec, SandboxLimits]:
    from align.train.config import validate_keys

    top = TreesConfig(**validate_keys(values, [TreesConfig], source))
    for name in ("actor", "critic", "sandbox"):
        if not isinstance(getattr(top, name), dict):
            raise AlignError(f"{source}: key '{name}' must be a mapping")
    actor = ModelSpec(**validate_keys(top.actor, [ModelSpec], f"{source}: actor"))
    critic = CriticSpec(**validate_keys(top.critic, [CriticSpec], f"{source}: critic"))
    try:
        limits = SandboxLimits(**validate_keys(top.sandbox, [SandboxLimits], f"{source}: sandbox"))
    except ValueError as err:
        raise AlignError(f"{source}: {err}") from None
    from align.train.tracking import check_trackers

    top.report_to = check_trackers(top.report_to, source)
    if critic.type not in ("observation", "steps", "llm"):
        raise AlignError(f"{source}: critic: key 'type' must be observation, steps or llm, got {critic.type!r}")
    if critic.type == "llm":
        load_template(critic.template)
    for name, spec in (("actor", actor), ("critic", critic)):
        if spec.backend not in ("local", "server"):
            raise AlignError(f"{source}: {name}: key 'backend' must be local or server, got {spec.backend!r}")
        if name == "critic" and critic.type != "llm":
            continue
        if not str(spec.model).strip():
            raise AlignError(f"{source}: {name}: key 'model' is empty")
        if spec.backend == "local":
            if spec.dtype not in ("float32", "bfloat16", "float16"):
                raise AlignError(f"{source}: {name}: key 'dtype' must be float32, bfloat16 or float16, got {spec.dtype!r}")
            if spec.decode not in ("drop", "generate"):
                raise AlignError(f"{source}: {name}: key 'decode' must be drop or generate, got {spec.decode!r}")
        if spec.backend == "server" and not spec.base_urls and (name == "actor" or critic.type == "llm"):
            raise AlignError(f"{source}: {name}: key 'base_urls' is required for the server backend")
    return top, actor, critic, limits


def check_trees_models(actor: ModelSpec, critic: CriticSpec, source: str, produced=None) -> None:
    """The local actor's (and an LLM critic's) model and adapter are what they say (align/train/model_check.py),
    before any problem is read or tree written; `produced(path)`: made by an earlier pipeline stage."""
    from align.train.model_check import check_adapter, check_model_and_adapter

    for name, spec in (("actor", actor), ("critic", critic)):
        if spec.backend != "local" or (name == "critic" and critic.type != "llm"):
            continue
        adapter = spec.adapter if not (spec.adapter and produced is not None and produced(spec.adapter)) else None
        if produced is not None and produced(spec.model):
            if adapter:
                check_adapter(adapter, None, f"{name}.adapter", source)
            continue
        check_model_and_adapter(spec.model, adapter, source, model_key=f"{name}.model", adapter_key=f"{name}.adapter")


def _check_or_record_settings(out: Path, settings: dict, command: str) -> None:
    """build_info.json records what the trees were built with; a rerun must match it to resume. Recorded
    and compared with its credentials masked (a password in base_urls: docs/secrets.md)."""
    from align.core.leaks import mask, mask_text

    settings, command = mask(settings)[0], mask_text(command)
    info_path = out / BUILD_INFO
    if info_path.exists():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
            previous = info["settings"]
            if not isinstance(previous, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise AlignError(f"{info_path}: corrupt (not the JSON this project writes); delete it to adopt the trees "
                             "there with this recipe's settings, or use a new output_dir") from None
        if previous != settings:
            changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
            raise AlignError(f"{out}: holds trees built with other settings (changed: {', '.join(changed)}); "
                             "use a new output_dir to build with these")
        return
    import align

    write_atomic(info_path, json.dumps({"settings": settings, "command": command, "align_version": align.__version__},
                                       indent=2))


def tree_hash(problem: Problem) -> str:
    return hashlib.sha1(f"{problem.id}\n{problem.instruction}".encode()).hexdigest()[:12]


def derive_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "little") & 0x7FFFFFFF


class TreeBuilder:
    def __init__(self, actor, critic, config: TreesConfig, limits: SandboxLimits, executor: ThreadPoolExecutor):
        self.actor, self.critic, self.config, self.limits, self.executor = actor, critic, config, limits, executor

    async def _verify(self, problem: Problem, text: str):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, verify, problem, text, self.limits)

    async def build(self, problem: Problem) -> dict:
        cfg = self.config
        history = opening(problem.instruction, cfg.system_prompt)
        turns = []
        for turn in range(1, cfg.max_turns + 1):
            seed = derive_seed(cfg.seed, problem.id, turn)
            texts = await self.actor.generate(history, cfg.samples_per_turn, seed)
            verdicts = await asyncio.gather(*(self._verify(problem, t) for t in texts))
            actions = [{"text": t, "correct": v.correct, "observation": v.observation, "extracted": v.extracted,
                        "status": v.status, "isolation": v.isolation} for t, v in zip(texts, verdicts)]
            correct = [i for i, a in enumerate(actions) if a["correct"]]
            wrong = [i for i, a in enumerate(actions) if not a["correct"]]
            rng = random.Random(seed)
            record = {"turn": turn, "history": list(history), "actions": actions, "pair": None, "extended": None,
                      "feedback": None}
            turns.append(record)
            if correct and wrong:
                record["pair"] = {"chosen": rng.choice(correct), "rejected": rng.choice(wrong)}
            if not wrong or turn == cfg.max_turns:
                break
            extend = record["pair"]["rejected"] if record["pair"] else rng.choice(wrong)
            action = actions[extend]
            critique = await self.critic.critique(problem, history, action["text"], action["observation"], seed)
            record["extended"] = extend
            record["feedback"] = feedback_turn(action["observation"], critique)
            history = history + [{"role": "assistant", "content": action["text"]},
                                 {"role": "user", "content": record["feedback"]}]
        return {"tree_id": tree_hash(problem), "problem": problem.to_dict(), "instruction": problem.instruction,
                "turns": turns, "solved": any(a["correct"] for t in turns for a in t["actions"])}


class RequestBarrier:
    """Batches the actor requests of one group of trees: the batch runs once every unfinished tree of
    the group is waiting on the actor, and its rows are ordered by seed, so what goes into a batch
    depends on the group alone, never on timing (same seed and group size, same trees)."""

    def __init__(self, backend, trees: int):
        self.backend, self.open, self.waiting, self._running = backend, trees, [], set()

    async def generate(self, messages: list[dict], n: int, seed: int) -> list[str]:
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((seed, messages, n, future))
        self._release()
        return await future

    def tree_done(self) -> None:
        self.open -= 1
        self._release()

    def _release(self) -> None:
        if self.waiting and len(self.waiting) == self.open:
            batch, self.waiting = sorted(self.waiting, key=lambda w: w[0]), []
            task = asyncio.ensure_future(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch) -> None:
        try:
            results = await asyncio.to_thread(self.backend.generate_batch, [(m, n, s) for s, m, n, _ in batch])
        except Exception as err:  # every tree of the batch sees the failure
            for *_, future in batch:
                future.set_exception(err)
            return
        for (*_, future), texts in zip(batch, results):
            future.set_result(texts)


class TreeProgress:
    """Trees done, trees/min, pass rate per turn, pairs so far (a bar on a terminal; `align run`'s live line)."""

    def __init__(self, total: int, enabled: bool, trackers=None):
        from align.core.progress import Progress

        self.shown = Progress("trees", total, "tree", bar=None if enabled else False)
        self.trackers = trackers
        self.turn_tried: Counter = Counter()
        self.turn_correct: Counter = Counter()
        self.pairs = 0
        self.failed = 0
        self.turns = 0
        self.identical_turns = 0  # turns whose samples were all the same text: no pair can come of them

    def add(self, tree: dict | None) -> None:
        if tree is None:
            self.failed += 1
        else:
            for t in tree["turns"]:
                self.turn_tried[t["turn"]] += len(t["actions"])
                self.turn_correct[t["turn"]] += sum(a["correct"] for a in t["actions"])
                self.pairs += t["pair"] is not None
                self.turns += 1
                self.identical_turns += len(t["actions"]) > 1 and len({a["text"] for a in t["actions"]}) == 1
        passes = " ".join(f"t{k}:{self.turn_correct[k] / self.turn_tried[k]:.0%}" for k in sorted(self.turn_tried))
        self.shown.advance(note=f"pairs={self.pairs} failed={self.failed} pass {passes}")
        if self.trackers is not None and self.shown.done % 100 == 0:
            self.log()

    def metrics(self) -> dict:
        return {"trees": self.shown.done, "pairs": self.pairs, "failed": self.failed, "turns": self.turns,
                "identical_sample_turns": self.identical_turns,
                "pass_rate": {f"turn_{k}": self.turn_correct[k] / self.turn_tried[k] for k in sorted(self.turn_tried)}}

    def log(self) -> None:
        self.trackers.log({"trees": self.metrics()}, step=self.shown.done)

    def close(self):
        if self.trackers is not None:
            self.log()
            self.trackers.close()
        self.shown.close()


def settings_of(config: TreesConfig, actor: ModelSpec, critic: CriticSpec, limits: SandboxLimits) -> dict:
    """What determines the trees (not where they go or how fast): a rerun must match it to resume."""
    keep = {k: v for k, v in asdict(config).items() if k not in ("output_dir", "parallel_trees", "verifier_workers",
                                                                  "progress", "report_to", "run_name", "actor",
                                                                  "critic", "sandbox")}
    if keep.get("system_prompt") is None:  # unset: as trees built before the key existed recorded it
        keep.pop("system_prompt", None)
    return {**keep, "actor": asdict(actor), "critic": asdict(critic), "sandbox": asdict(limits)}


async def build_trees_async(config: TreesConfig, actor_spec: ModelSpec, critic_spec: CriticSpec,
                            limits: SandboxLimits, command: str = "", actor=None) -> dict:
    """Build a tree for every problem not yet in output_dir; `actor` may be a ready backend object."""
    problems, skipped = load_problems(config.problems, config.skip_bad_rows, config.limit)
    out = Path(config.output_dir)
    try:
        store = TreeStore(out)  # one build per folder at a time
    except StoreLocked:
        raise AlignError(f"{out}: another build is writing to this folder (wait for it, or use another output_dir)") from None
    except OSError as err:
        raise AlignError(f"{out}: cannot be written ({err.strerror})") from None
    try:
        _check_or_record_settings(out, settings_of(config, actor_spec, critic_spec, limits), command)
        if skipped:
            write_atomic(out / "skipped_rows.txt", "\n".join(skipped) + "\n")
            print(f"[align] trees: skipped {len(skipped)} bad problem rows (listed in {out / 'skipped_rows.txt'})",
                  file=sys.stderr)
    except OSError as err:
        store.close()
        raise AlignError(f"{out}: cannot be written ({err.strerror}); free space and rerun, which resumes") from None
    except BaseException:
        store.close()
        raise
    todo = [p for p in problems if p.id not in store.done]
    summary = {"problems": len(problems), "already_done": len(problems) - len(todo), "built": 0, "failed": 0,
               "skipped_rows": len(skipped), "output": str(out / "trees.jsonl")}
    if not todo:
        store.close()
        return summary
    critic = None
    try:
        actor = actor or make_backend(actor_spec)
        critic = (LLMCritic(make_backend(critic_spec), critic_spec.template) if critic_spec.type == "llm"
                  else StepCritic() if critic_spec.type == "steps" else ObservationCritic())
        # each server answers before the first problem, or the build stops in seconds naming it
        for role, backend in (("actor", actor), ("critic", getattr(critic, "backend", None))):
            if hasattr(backend, "check_endpoints"):
                await backend.check_endpoints(role)
    except BaseException:
        store.close()
        for backend in (actor, getattr(critic, "backend", None)):
            if hasattr(backend, "aclose"):
                with contextlib.suppress(Exception):
                    await backend.aclose()
        raise
    trackers = None
    if config.report_to:
        from align.train.tracking import Trackers

        trackers = Trackers(config.report_to, config.run_name, out / "runs", {"problems": config.problems})
    progress = TreeProgress(len(todo), config.progress, trackers)

    def keep(problem, tree_or_error) -> dict | None:
        if isinstance(tree_or_error, BackendError):  # after its retries: reported, retried on the next run
            store.record_failure(problem.id, str(tree_or_error))
            summary["failed"] += 1
            progress.add(None)
            return None
        return tree_or_error

    def save(trees: list[dict]) -> None:
        try:
            store.append_many(trees)
        except OSError as err:
            raise AlignError(f"{store.path}: could not be written ({err.strerror}); the trees finished so far are "
                             "kept: free space and rerun to resume") from None
        summary["built"] += len(trees)
        for tree in trees:
            progress.add(tree)

    async def attempt(tree_builder, problem):
        try:
            return await tree_builder.build(problem)
        except BackendError as err:
            return err
        except (RuntimeError, OSError) as err:  # the sandbox itself failed (its zygote died, no cgroup): the
            return BackendError(f"verification failed: {type(err).__name__}: {err}")  # problem waits for a rerun

    with ThreadPoolExecutor(config.verifier_workers) as executor:
        builder = TreeBuilder(actor, critic, config, limits, executor)

        async def batched_groups():
            """Local models: groups of parallel_trees consecutive problems (of the full list, so a
            resumed run batches like a fresh one), each group's requests one batch per turn."""
            size = config.parallel_trees
            for start in range(0, len(problems), size):
                group = [p for p in problems[start:start + size] if p.id not in store.done]
                if not group:
                    continue
                barrier = RequestBarrier(actor, len(group))
                group_builder = TreeBuilder(barrier, critic, config, limits, executor)

                async def one(problem):
                    try:
                        return await attempt(group_builder, problem)
                    finally:
                        barrier.tree_done()

                results = await asyncio.gather(*(one(p) for p in group))
                save([t for t in (keep(p, r) for p, r in zip(group, results)) if t is not None])

        queue: asyncio.Queue = asyncio.Queue()
        for p in todo:
            queue.put_nowait(p)

        async def worker():
            while not queue.empty():
                problem = queue.get_nowait()
                tree = keep(problem, await attempt(builder, problem))
                if tree is not None:
                    save([tree])

        try:
            if hasattr(actor, "generate_batch"):
                await batched_groups()
            else:
                await asyncio.gather(*(worker() for _ in range(config.parallel_trees)))
        finally:
            progress.close()
            store.close()
            await actor.aclose()
            if critic is not actor:
                await critic.aclose()
    summary["pairs"] = progress.pairs
    summary["turns"], summary["identical_sample_turns"] = progress.turns, progress.identical_turns
    if progress.turns and progress.identical_turns > progress.turns / 2:
        print(f"[align] trees: WARNING: {progress.identical_turns} of {progress.turns} turns got {config.samples_per_turn} "
              "identical samples, so they can give no pair. The actor is not sampling: check its temperature, and "
              "for `transformers serve` set actor.extra_body: {generation_config: '{\"do_sample\": true}'} "
              "(it samples only when the model's generation config says do_sample).", file=sys.stderr, flush=True)
    summary["backend"] = {k: getattr(actor, k) for k in ("requests", "retries", "max_in_flight") if hasattr(actor, k)}
    return summary


def failed_problems_line(summary: dict) -> str | None:
    """The line a build with failed problems ends with (on stderr, after its JSON summary), else None."""
    if not summary.get("failed"):
        return None
    tried = summary["problems"] - summary["already_done"]
    failures = Path(summary["output"]).parent / FAILURES_FILE
    first = _first_failure(failures)
    head = (f"every problem failed ({summary['failed']} of {tried})" if not summary["built"]
            else f"{summary['failed']} of {tried} problems failed")
    return (f"align: trees: {head}; the errors are in {failures}{f' (first: {first})' if first else ''}; "
            "rerun to retry them")


def _first_failure(path: Path) -> str:
    """The first recorded error of failures.jsonl, cut to a line's worth."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                with contextlib.suppress(ValueError, AttributeError):
                    return " ".join(str(json.loads(line).get("error", "")).split())[:240]
    except OSError:
        pass
    return ""


def build_trees(config, actor_spec, critic_spec, limits, command: str = "", actor=None) -> dict:
    return asyncio.run(build_trees_async(config, actor_spec, critic_spec, limits, command, actor))
