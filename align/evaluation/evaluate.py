"""`align eval`: pass@1 with greedy decoding on held-out problems, with the trees' verifiers; with
`turns: K` (2..5) also pass@k-turns, the observation critic in the loop as in the trees: a wrong answer
gets its observation and "Your answer is wrong." as the next user turn, and the model tries again.

Writes results.json (per model: pass@1 overall and per task, pass@k-turns, number of problems),
results.md (the table, also printed), the answers of every model, and the plots of the runs it is told about.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from align.core.errors import AlignError
from align.evaluation.backends import BackendError
from align.tasks.critic import feedback_turn, opening, step_critique
from align.tasks.problems import Problem, load_problems
from align.tasks.sandbox import SandboxLimits
from align.tasks.verifiers import verify


@dataclass
class EvalConfig:
    """`align eval --config`: what to evaluate, on which problems, how."""

    problems: list[str] = field(metadata={
        "help": "Problem sets, one or several: a built-in (addition:..., humaneval), a standard set from the Hub "
                "(gsm8k, math500, mbpp, humaneval@openai/openai_humaneval; NAME[:SPLIT][@SOURCE]), or a problems "
                "file / dataset. Several are scored apart too."})
    models: dict = field(metadata={"help": "name: {model: hub id or folder, adapter: optional PEFT folder}."})
    turns: int = field(default=1, metadata={"help": "pass@k-turns up to k (the observation critic in the loop).",
                                            "range": (1, 5)})
    batch_size: int = field(default=32, metadata={"help": "Problems decoded together.", "range": (1, 65536)})
    max_new_tokens: int = field(default=256, metadata={"help": "Tokens per answer at most.", "range": (1, 1 << 20)})
    limit: int | None = field(default=None, metadata={"help": "Only the first N problems of each set.", "range": (1, None)})
    system_prompt: str | None = field(default=None, metadata={
        "help": "A system message before each problem (as trees' system_prompt), placed as each model's chat "
                "template places it."})
    critic: str = field(default="observation", metadata={"help": "The critic of the later turns: observation or steps "
                                                         "(the first wrong step, for the built-in addition)."})
    runs: dict = field(default_factory=dict, metadata={"help": "name: stage output folder, for the plots."})
    trees: str | None = field(default=None, metadata={"help": "A trees folder, for the tree statistics plot."})
    samples: int = field(default=0, metadata={"help": "pass@k by sampling: this many samples per problem at "
                                                      "`temperature` (0: greedy pass@1 only).", "range": (0, 4096)})
    pass_k: list[int] = field(default_factory=lambda: [1], metadata={
        "help": "The k of the sampled pass@k (unbiased estimator of Chen et al. 2021), each at most `samples`."})
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature of the pass@k samples.",
                                                      "range": (1e-6, 10.0)})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus mass of the pass@k samples.", "range": (1e-6, 1.0)})
    seed: int = field(default=0, metadata={"help": "Seed of the pass@k samples (each problem draws its own).",
                                           "range": (0, 2 ** 63 - 1)})
    report_to: list[str] = field(default_factory=list, metadata={
        "help": "Trackers that get the results (tensorboard, wandb, trackio, ...: accelerate's), as in TRL."})
    run_name: str = field(default="eval", metadata={"help": "The run's name in the trackers."})


MODEL_KEYS = {"model", "adapter", "backend", "base_urls", "api_key_env", "concurrency", "request_timeout_s", "max_retries"}


class _ServerBatches:
    """A served model (OpenAI-compatible) in the eval's batch interface: each batch is one burst of
    concurrent requests on one event loop kept for the whole eval."""

    def __init__(self, spec, role: str = "eval"):
        import asyncio

        from align.evaluation.backends import ServerBackend

        self.loop = asyncio.new_event_loop()
        self.backend = ServerBackend(spec)
        try:  # each server answers before the first batch, or the eval stops in seconds naming it
            self.loop.run_until_complete(self.backend.check_endpoints(role))
        except BaseException:
            self.loop.close()
            raise

    @property
    def spec(self):  # the sampling settings, as a local backend has them (sampled pass@k swaps them)
        return self.backend.spec

    @spec.setter
    def spec(self, value):
        self.backend.spec = value

    def generate_batch(self, requests):
        import asyncio

        async def burst():
            return await asyncio.gather(*(self.backend.generate(m, n, seed) for m, n, seed in requests))

        return self.loop.run_until_complete(burst())

    def close(self):
        self.loop.run_until_complete(self.backend.aclose())
        self.loop.close()


def make_eval_backend(m: dict, max_new_tokens: int):
    """Greedy decoding of one eval model: local (transformers, optional adapter) or served."""
    from align.evaluation.backends import LocalBackend, ModelSpec

    if m.get("backend", "local") == "server":
        spec = ModelSpec(backend="server", model=m["model"], base_urls=list(m.get("base_urls") or []), temperature=0.0,
                         max_new_tokens=max_new_tokens, api_key_env=m.get("api_key_env"),
                         **{k: m[k] for k in ("concurrency", "request_timeout_s", "max_retries") if k in m})
        return _ServerBatches(spec, f"eval: model {m['model']}")
    return LocalBackend(ModelSpec(model=m["model"], adapter=m.get("adapter"), temperature=0.0,
                                  max_new_tokens=max_new_tokens))


def parse_eval_config(spec: dict, where: str) -> EvalConfig:
    """The eval settings checked (keys, types, ranges, each model's entry) before any model loads."""
    from align.train.config import validate_keys

    for key in ("problems", "models"):
        if key not in spec:
            raise AlignError(f"{where}: key '{key}' is required")
    config = EvalConfig(**validate_keys(spec, [EvalConfig], where))
    if not config.models:
        raise AlignError(f"{where}: key 'models' is empty")
    if config.critic not in ("observation", "steps"):
        raise AlignError(f"{where}: key 'critic' must be observation or steps, got {config.critic!r}")
    for name, m in config.models.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
            raise AlignError(f"{where}: models: {name!r} is not a usable name (letters, digits, '_', '-', '.'; "
                             "it names the answers file)")
        if not isinstance(m, dict) or not isinstance(m.get("model"), str) or not m["model"].strip():
            raise AlignError(f"{where}: models.{name} needs 'model' (and optionally 'adapter')")
        bad = set(m) - MODEL_KEYS
        if bad:
            raise AlignError(f"{where}: models.{name}: unknown key(s) {', '.join(sorted(map(str, bad)))} "
                             f"(allowed: {', '.join(sorted(MODEL_KEYS))})")
        if m.get("adapter") is not None and not isinstance(m["adapter"], str):
            raise AlignError(f"{where}: models.{name}.adapter must be a folder")
        if m.get("backend", "local") not in ("local", "server"):
            raise AlignError(f"{where}: models.{name}.backend must be local or server, got {m['backend']!r}")
        if m.get("backend") == "server":
            urls = m.get("base_urls")
            if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
                raise AlignError(f"{where}: models.{name}: base_urls (a list of URLs) is required for the server backend")
            if m.get("adapter"):
                raise AlignError(f"{where}: models.{name}: a served model takes no adapter (serve a merged checkpoint)")
    if not isinstance(config.runs, dict) or not all(isinstance(v, str) for v in config.runs.values()):
        raise AlignError(f"{where}: key 'runs' must map names to stage output folders")
    if not config.problems or not all(isinstance(p, str) and p.strip() for p in config.problems):
        raise AlignError(f"{where}: key 'problems' is empty (name at least one problem set)")
    if config.pass_k != [1] and not config.samples:
        raise AlignError(f"{where}: key 'pass_k' needs 'samples' (how many answers to sample per problem)")
    if not config.pass_k or not all(
            isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in config.pass_k):
        raise AlignError(f"{where}: key 'pass_k' must be a list of whole numbers of at least 1, got {config.pass_k!r}")
    if config.samples and max(config.pass_k) > config.samples:
        raise AlignError(f"{where}: key 'pass_k': k={max(config.pass_k)} needs at least that many samples "
                         f"(samples: {config.samples})")
    from align.train.tracking import check_trackers

    config.report_to = check_trackers(config.report_to, where)
    return config


def check_eval_models(config: EvalConfig, where: str, produced=None) -> None:
    """Each local model (and adapter) is what it says (align/train/model_check.py), before any problem loads. An
    adapter that does not exist yet (a stage not run) skips its model, as the eval does; `produced(path)`:
    made by an earlier pipeline stage, checked when it exists."""
    from align.train.model_check import check_adapter, check_model_and_adapter

    for name, m in config.models.items():
        if m.get("backend", "local") != "local":
            continue
        adapter = m.get("adapter")
        if adapter and produced is not None and produced(adapter):
            adapter = None  # made by an earlier stage: the model is checked now, the adapter when it exists
        elif adapter and not Path(adapter).expanduser().exists():
            continue  # the eval skips this model
        if produced is not None and produced(m["model"]):
            if adapter:
                check_adapter(adapter, None, f"models.{name}.adapter", where)
            continue
        check_model_and_adapter(m["model"], adapter, where, model_key=f"models.{name}.model",
                                adapter_key=f"models.{name}.adapter")


def set_labels(names: list[str]) -> dict[str, str]:
    """A short name for each configured problem set, for the tables, the trackers and the model card: a
    standard set as NAME[:SPLIT] (read from a mirror too), a local file or folder by as many of its last
    path parts as tell it from the other sets' (never the whole local path), anything else as written."""
    from align.train.data import local_form
    from align.tasks.hub_sets import parse_spec

    labels, local = {}, {}
    for name in names:
        hub = parse_spec(name)
        if hub is not None:
            labels[name] = hub[0] + (f":{hub[1]}" if hub[1] else "")
        elif local_form(name) or (":" not in name and Path(name).expanduser().exists()):
            local[name] = Path(name).expanduser().resolve().parts
        else:
            labels[name] = name
    for k in range(1, max((len(p) for p in local.values()), default=0) + 1):
        tails = {name: "/".join(parts[-k:]) for name, parts in local.items()}
        taken = list(labels.values()) + list(tails.values())
        if all(taken.count(t) == 1 for t in tails.values()):
            break
    return {**labels, **(tails if local else {})}


def score(problems: list[Problem], responses: list[str], limits: SandboxLimits | None = None,
          sets: list[str] | None = None) -> dict:
    """pass@1 overall and per task for one model's answers (one answer per problem, same order); per set
    too when `sets` (each problem's set, as set_labels names it) names more than one."""
    if len(problems) != len(responses):
        raise ValueError("one response per problem")
    verdicts = [verify(p, r, limits) for p, r in zip(problems, responses)]
    correct = [v.correct for v in verdicts]
    return {
        "pass@1": round(sum(correct) / len(problems), 4) if problems else 0.0,
        "n": len(problems),
        **_grouped(problems, correct, lambda cs: {"pass@1": round(sum(cs) / len(cs), 4), "n": len(cs)}, sets),
        "correct": correct,
    }


def _grouped(problems: list[Problem], values: list, summarize, sets: list[str] | None = None) -> dict:
    """`summarize` of the values per task ("per_task") and, with several sets (gsm8k and math500 are both
    math), per set ("per_set"; `sets` holds each problem's, as set_labels names it)."""
    out = {}
    for key, labels in (("per_task", [p.task for p in problems]), ("per_set", sets or [])):
        groups = defaultdict(list)
        for label, v in zip(labels, values):
            groups[label].append(v)
        if key == "per_task" or len(groups) > 1:
            out[key] = {name: summarize(vs) for name, vs in sorted(groups.items())}
    return out


def generate_greedy(backend, chats: list[list[dict]], batch_size: int, progress=None) -> list[str]:
    out = []
    for i in range(0, len(chats), batch_size):
        out += [texts[0] for texts in backend.generate_batch([(chat, 1, 0) for chat in chats[i:i + batch_size]])]
        if progress is not None:
            progress.advance()
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples of which c are correct (Chen et al. 2021):
    1 - C(n - c, k) / C(n, k), as a running product (no huge binomials)."""
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def sample_batches(problems: int, samples: int, batch_size: int) -> list[list[tuple[int, int, int]]]:
    """Batches of at most batch_size samples, each a list of (problem index, first sample, how many).
    Sample j of a problem is drawn with its seed + j (what both backends do within a request), so a
    problem's samples may span requests and batches and still be the same samples."""
    batches, batch, rows = [], [], 0
    for i in range(problems):
        for first in range(0, samples, batch_size):
            k = min(batch_size, samples - first)
            if rows + k > batch_size:
                batches.append(batch)
                batch, rows = [], 0
            batch.append((i, first, k))
            rows += k
    return batches + ([batch] if batch else [])


def sampled_pass_at_k(backend, problems: list[Problem], config: EvalConfig, progress=None,
                      sets: list[str] | None = None) -> tuple[dict, list[list[dict]]]:
    """`samples` answers per problem at `temperature` / `top_p` (each problem its own seed), all verified:
    pass@k for every k of `pass_k`, overall, per task and per set (`sets`, as in score), and the samples
    with their verdicts."""
    from dataclasses import replace

    from align.trees.builder import derive_seed

    greedy_spec = backend.spec
    backend.spec = replace(greedy_spec, temperature=config.temperature, top_p=config.top_p)
    texts: list[list[str]] = [[] for _ in problems]
    try:
        for batch in sample_batches(len(problems), config.samples, config.batch_size):
            out = backend.generate_batch([(opening(problems[i].instruction, config.system_prompt), k,
                                           derive_seed(config.seed, problems[i].id) + first) for i, first, k in batch])
            for (i, _, _), answers in zip(batch, out):
                texts[i] += answers
            if progress is not None:
                progress.advance()
    finally:
        backend.spec = greedy_spec
    samples, counts = [], []
    for p, answers in zip(problems, texts):
        verdicts = [verify(p, a) for a in answers]
        counts.append(sum(v.correct for v in verdicts))
        samples.append([{"response": a, "correct": v.correct} for a, v in zip(answers, verdicts)])
    out = {"samples": config.samples, "temperature": config.temperature, "top_p": config.top_p}
    for k in config.pass_k:
        out[f"pass@{k}"] = round(sum(pass_at_k(config.samples, c, k) for c in counts) / len(problems), 4)
    out.update(_grouped(problems, counts, lambda cs: {
        f"pass@{k}": round(sum(pass_at_k(config.samples, c, k) for c in cs) / len(cs), 4) for k in config.pass_k}, sets))
    return out, samples


def multi_turn(backend, problems: list[Problem], first: list[str], first_correct: list[bool], turns: int,
               batch_size: int, critic: str = "observation",
               system_prompt: str | None = None) -> tuple[dict, list[list[dict]]]:
    """pass@k-turns for k = 1..turns (solved within k turns) and each problem's later attempts; `critic`
    steps adds the first wrong step to each feedback turn, as in the trees."""
    chats = [opening(p.instruction, system_prompt) + [{"role": "assistant", "content": r}] for p, r in zip(problems, first)]
    solved = list(first_correct)
    observation = {i: verify(problems[i], first[i]).observation for i, ok in enumerate(solved) if not ok}
    later: list[list[dict]] = [[] for _ in problems]
    rates = {"1": round(sum(solved) / len(problems), 4)}
    for k in range(2, turns + 1):
        todo = [i for i, ok in enumerate(solved) if not ok]
        for i in todo:
            critique = step_critique(problems[i], chats[i][-1]["content"]) if critic == "steps" else ""
            chats[i].append({"role": "user", "content": feedback_turn(observation[i], critique)})
        answers = generate_greedy(backend, [chats[i] for i in todo], batch_size)
        for i, answer in zip(todo, answers):
            chats[i].append({"role": "assistant", "content": answer})
            verdict = verify(problems[i], answer)  # once per answer: for code it is a sandbox run
            solved[i], observation[i] = verdict.correct, verdict.observation
            later[i].append({"turn": k, "response": answer, "correct": solved[i]})
        rates[str(k)] = round(sum(solved) / len(problems), 4)
    return rates, later


def markdown_table(results: dict) -> str:
    sets = sorted({t for r in results["models"].values() for t in r.get("per_set", {})})
    tasks = sorted({t for r in results["models"].values() for t in r["per_task"]}) if not sets else []
    turns = sorted({int(k) for r in results["models"].values() for k in r.get("pass@turns", {}) if k != "1"})
    sampled = sorted({int(k[5:]) for r in results["models"].values() for k in r.get("sampled", {})
                      if k.startswith("pass@")})
    head = (["pass@1"] + [f"{t} pass@1" for t in tasks] + [f"{t} pass@1" for t in sets] + [f"pass@{k} turns" for k in turns]
            + [f"pass@{k} sampled" for k in sampled] + ["problems"])
    lines = ["| model | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for name, r in results["models"].items():
        cells = [f"{r['pass@1']:.1%}"]
        cells += [f"{r['per_task'][t]['pass@1']:.1%}" if t in r["per_task"] else "" for t in tasks]
        cells += [f"{r['per_set'][t]['pass@1']:.1%}" if t in r.get("per_set", {}) else "" for t in sets]
        cells += [f"{r['pass@turns'][str(k)]:.1%}" if str(k) in r.get("pass@turns", {}) else "" for k in turns]
        cells += [f"{r['sampled'][f'pass@{k}']:.1%}" if f"pass@{k}" in r.get("sampled", {}) else "" for k in sampled]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['n']} |")
    if sampled:
        first = next(r["sampled"] for r in results["models"].values() if "sampled" in r)
        lines.append(f"\nsampled: {first['samples']} per problem, temperature {first['temperature']:g}, "
                     f"top_p {first['top_p']:g} (unbiased pass@k)")
    return "\n".join(lines)


# What a model's results depend on, besides the problems (each one's content) and the model's files: these
# settings, its entry's keys in RESULT_MODEL_KEYS and, when sampling (samples > 0), SAMPLED_SETTINGS. A
# model's kept results are used again only when all of them are as they were (align/evaluation/evaluate.py, `kept`).
RESULT_SETTINGS = ("max_new_tokens", "batch_size", "turns", "critic", "samples", "system_prompt")
SAMPLED_SETTINGS = ("pass_k", "temperature", "top_p", "seed")
RESULT_MODEL_KEYS = ("model", "adapter", "backend", "base_urls")
MODEL_FILES_SKIPPED = ("log.txt", "progress.json", "stage.json")  # a stage folder's own records, not the model


def _files_state(path: str) -> list | None:
    """A local model or adapter as (name, size, mtime) of its file, or of each file in its folder (checkpoint
    folders and hidden files aside): retrained in place, it is another model. None: not a local path."""
    location = Path(path).expanduser()
    if location.is_file():
        stat = location.stat()
        return [[location.name, stat.st_size, stat.st_mtime_ns]]
    if not location.is_dir():
        return None
    return sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in location.iterdir()
                  if f.is_file() and not f.name.startswith(".") and f.name not in MODEL_FILES_SKIPPED)


def problems_digest(problems: list[Problem], sets: list[str]) -> str:
    """The problems evaluated, each as loaded (prompt, ground truth, tests) and with its set's label."""
    import hashlib

    rows = [[p.to_dict(), label] for p, label in zip(problems, sets)]
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()


def result_fingerprint(config: EvalConfig, m: dict, problems_hash: str) -> str:
    """What one model's results depend on: the problems, the settings of RESULT_SETTINGS (and SAMPLED_SETTINGS
    when sampling), the model's entry (RESULT_MODEL_KEYS: not its connection's concurrency, timeouts, retries
    or key) and its local files."""
    import hashlib

    settings = {k: getattr(config, k) for k in RESULT_SETTINGS + (SAMPLED_SETTINGS if config.samples else ())}
    payload = {"problems": problems_hash, "settings": settings,
               "model": {k: m.get(k) for k in RESULT_MODEL_KEYS if m.get(k) is not None},
               "files": {k: _files_state(m[k]) for k in ("model", "adapter") if m.get(k)}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_result_path(output: Path, name: str) -> Path:
    return output / f"results_{name}.json"


def kept(output: Path, name: str, fingerprint: str) -> tuple[dict | None, str | None]:
    """(an earlier run's whole results of model `name` made with the same fingerprint, else None; why they are
    not used, when there were some). Its answers file is written before it (both atomically), so a result
    found has its answers."""
    path = model_result_path(output, name)
    if not path.exists():
        return None, None
    try:
        saved = json.loads(path.read_text())
        result = saved["result"]
        same = saved["fingerprint"] == fingerprint
    except (OSError, ValueError, KeyError, TypeError):
        return None, f"{path.name} is unreadable"
    if not same:
        return None, "its problems, settings or model changed"
    if not (output / f"answers_{name}.jsonl").is_file():
        return None, f"answers_{name}.jsonl is missing"
    return result, None


def run_eval(spec: dict, output: Path, where: str = "eval", force: bool = False) -> dict:
    """Every configured model on the problems, into `output`; the results of a model evaluated there already
    with the same problems, settings and model files (result_fingerprint) are kept, unless `force`."""
    config = parse_eval_config(spec, where)
    check_eval_models(config, where)
    problems, sets = [], []
    for name in config.problems:
        try:
            loaded = load_problems(name, limit=config.limit)[0]
        except AlignError as err:
            raise AlignError(f"{where}: {err}") from None
        problems += loaded
        sets += [name] * len(loaded)
    if len({p.id for p in problems}) != len(problems):
        raise AlignError(f"{where}: key 'problems': two sets share problem ids (name each set once)")
    labels = set_labels(config.problems)  # (the names parse: every set loaded)
    sets = [labels[name] for name in sets]
    output.mkdir(parents=True, exist_ok=True)
    from align.core import lifecycle

    taken = lifecycle.lock_folder(output, "align eval")  # one writer (under `align run`: its lock, held already)
    try:
        return _evaluate(config, problems, sets, output, where, force)
    finally:
        if taken:
            lifecycle.unlock_folder(output)


def _evaluate(config: EvalConfig, problems: list[Problem], sets: list[str], output: Path, where: str,
              force: bool) -> dict:
    """run_eval's work in its locked output folder: each model evaluated (or its results kept), then the
    tables, the trackers and the plots."""
    from align.core import lifecycle
    from align.core.progress import Progress
    from align.train.tracking import Trackers

    turns, batch_size = config.turns, config.batch_size
    for stale in output.glob(".*.tmp"):  # a write a kill cut off (lifecycle.atomic_write): never a result
        stale.unlink(missing_ok=True)
    problems_hash = problems_digest(problems, sets)
    results = {"problems": config.problems, "models": {}}
    for name, m in config.models.items():
        if m.get("adapter") and not Path(m["adapter"]).exists():
            print(f"[align] eval: {name} skipped ({m['adapter']} does not exist: a stage not run)", flush=True)
            continue
        fingerprint = result_fingerprint(config, m, problems_hash)
        earlier, why = (None, None) if force else kept(output, name, fingerprint)
        if earlier is not None:
            print(f"[align] eval: {name}: kept from an earlier run ({model_result_path(output, name).name})", flush=True)
            results["models"][name] = earlier
            continue
        if why:
            print(f"[align] eval: {name}: evaluated again ({why})", flush=True)
        model_result_path(output, name).unlink(missing_ok=True)  # (its answers are rewritten first)
        batches = -(-len(problems) // batch_size)
        sampling = len(sample_batches(len(problems), config.samples, batch_size)) if config.samples else 0
        backend = make_eval_backend(m, config.max_new_tokens)
        progress = Progress(f"eval {name}", batches + sampling, "batch")  # after the load: a failed one leaves no bar
        samples = None
        try:
            responses = generate_greedy(backend, [opening(p.instruction, config.system_prompt) for p in problems],
                                        batch_size, progress)
            progress.note("verifying")
            scored = score(problems, responses, sets=sets)
            correct = scored.pop("correct")
            later = [[] for _ in problems]
            if turns > 1:
                progress.note(f"turns 2..{turns}")
                scored["pass@turns"], later = multi_turn(backend, problems, responses, correct, turns, batch_size,
                                                         config.critic, config.system_prompt)
            if config.samples:
                progress.note(f"{config.samples} samples per problem")
                scored["sampled"], samples = sampled_pass_at_k(backend, problems, config, progress, sets)
        except BackendError as err:
            raise AlignError(f"{where}: models.{name}: {err}") from None
        finally:
            progress.close()
            getattr(backend, "close", lambda: None)()
        # Each model's answers, then its results, each whole or not at all: a rerun keeps the model or redoes it.
        with lifecycle.deferred(), lifecycle.atomic_write(output / f"answers_{name}.jsonl") as f:
            for i, (p, r, ok, more) in enumerate(zip(problems, responses, correct, later)):
                row = {"problem_id": p.id, "response": r, "correct": ok, **({"later_turns": more} if more else {})}
                f.write(json.dumps({**row, **({"samples": samples[i]} if samples else {})}) + "\n")
        results["models"][name] = {**scored, "model": m["model"], "adapter": m.get("adapter")}
        with lifecycle.deferred():
            lifecycle.write_json_atomic(model_result_path(output, name),
                                        {"fingerprint": fingerprint, "result": results["models"][name]})
        if lifecycle.requested():  # a stop signal while the model's results were written: they are kept
            raise lifecycle.Interrupted(lifecycle.requested())
    with lifecycle.atomic_write(output / "results.json") as f:
        f.write(json.dumps(results, indent=2))
    with lifecycle.atomic_write(output / "results.md") as f:
        f.write(markdown_table(results) + "\n")
    if config.report_to:
        trackers = Trackers(config.report_to, config.run_name, output / "runs", {"problems": ", ".join(config.problems)})
        trackers.log({name: {k: v for k, v in r.items() if k not in ("model", "adapter")}
                      for name, r in results["models"].items()})
        trackers.close()
    from align.evaluation.plots import make_plots

    make_plots(config.runs, config.trees, output / "plots")
    return results


def main(argv: list[str]):
    from align.train.config import load_recipe_file
    from align.core.errors import ArgumentParser

    parser = ArgumentParser(prog="align eval")
    parser.add_argument("--config", required=True, help="problems, models {name: {model, adapter}}, runs, trees")
    parser.add_argument("--output", required=True)
    parser.add_argument("--force", action="store_true",
                        help="evaluate every model again (default: keep the results of models evaluated already in "
                             "--output with the same problems, settings and model files)")
    args = parser.parse_args(argv)
    spec = load_recipe_file(args.config)
    results = run_eval(spec, Path(args.output), args.config, force=args.force)
    print(markdown_table(results))
    return 0
