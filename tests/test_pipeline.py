"""Pipeline runner (skip, resume, hashes, selection), eval metrics on fixed answers, and the model card."""

from __future__ import annotations

import json

import pytest
import yaml

from align.core.errors import AlignError
from conftest import REPO


def _pipeline(tmp_path, n=64, sft_set=None):
    spec = {
        "output_dir": str(tmp_path / "out"),
        "accelerate_config": str(REPO / "recipes" / "accelerate" / "cpu.yaml"),
        "stages": [
            {"name": "data", "kind": "data", "generator": "addition-sft", "n": n, "seed": 1, "digits": [2]},
            {"name": "boot", "kind": "sft", "recipe": str(REPO / "recipes" / "quickstart" / "bootstrap.yaml"),
             "set": {"datasets": ["${data}/train.jsonl"], "max_steps": 2, "per_device_train_batch_size": 8,
                     **(sft_set or {})}},
        ],
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _run(path, *flags):
    from align.runner.pipeline import main

    return main([path, *flags])


def _record(tmp_path, stage):
    return json.loads((tmp_path / "out" / stage / "stage.json").read_text())


def test_fail_resume_skip_and_rerun_on_changed_input(tmp_path, capsys):
    # a failing stage stops the run, naming the stage and its log (data whose columns are wrong: the check
    # before the run sees the file exists, the stage finds what is in it)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    path = _pipeline(tmp_path, sft_set={"datasets": [str(bad)]})
    with pytest.raises(AlignError, match=r"stage boot failed .*boot/log.txt"):
        _run(path)
    assert _record(tmp_path, "data")["status"] == "done" and _record(tmp_path, "boot")["status"] == "failed"
    assert "missing column(s)" in (tmp_path / "out" / "boot" / "log.txt").read_text()

    # fixed: the rerun continues from the failed stage, the finished one is skipped
    path = _pipeline(tmp_path)
    data_finished = _record(tmp_path, "data")["finished"]
    assert _run(path) == 0
    assert _record(tmp_path, "data")["finished"] == data_finished
    boot = _record(tmp_path, "boot")
    assert boot["status"] == "done" and (tmp_path / "out" / "boot" / "model.safetensors").exists()
    progress = json.loads((tmp_path / "out" / "boot" / "progress.json").read_text())  # what the live line showed
    assert (progress["what"], progress["done"], progress["total"], progress["unit"]) == ("sft", 2, 2, "step")
    assert progress["note"].startswith("loss ")
    resolved = yaml.safe_load((tmp_path / "out" / "boot" / "recipe.yaml").read_text())
    assert resolved["datasets"] == [str(tmp_path / "out" / "data" / "train.jsonl")]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| data | skipped |" in summary and "| boot | done |" in summary

    # nothing changed: everything skipped
    capsys.readouterr()
    assert _run(path) == 0
    assert "data unchanged, skipped" in capsys.readouterr().out and _record(tmp_path, "boot")["finished"] == boot["finished"]

    # an input changes: --only reruns that stage; the dependent stage's hash changes, so --from reruns it
    path = _pipeline(tmp_path, n=32)
    _run(path, "--only", "data")
    assert _record(tmp_path, "boot")["finished"] == boot["finished"]
    _run(path, "--from", "boot")
    assert _record(tmp_path, "boot")["finished"] > boot["finished"]


def test_pipeline_errors_before_running(tmp_path):
    from align.runner.pipeline import load_pipeline

    bad = tmp_path / "p.yaml"
    bad.write_text(yaml.safe_dump({"output_dir": "x", "stages": [{"name": "a", "kind": "sft", "recipe": "nope.yaml"}]}))
    with pytest.raises(AlignError, match=r"stages\[0\] \(a\): recipe nope.yaml not found"):
        load_pipeline(str(bad))
    bad.write_text(yaml.safe_dump({"output_dir": "x", "stages": [{"name": "a", "kind": "eval", "problems": "${b}"}]}))
    with pytest.raises(AlignError, match=r"\$\{b\} names no earlier stage"):
        load_pipeline(str(bad))
    bad.write_text(yaml.safe_dump({"output_dir": "x", "stages": [{"name": "a", "kind": "train"}]}))
    with pytest.raises(AlignError, match="kind must be one of"):
        load_pipeline(str(bad))
    bad.write_text(yaml.safe_dump({"output_dir": "x", "stages": [{"name": "e", "kind": "eval", "problems": "p", "turns": 9,
                                                                   "models": {"m": {"model": "tiny-mixtral"}}}]}))
    with pytest.raises(AlignError, match=r"stages\[0\] \(e\): key 'turns' must be between 1 and 5, got 9"):
        load_pipeline(str(bad))
    bad.write_text(yaml.safe_dump({"output_dir": "x", "stages": [{"name": "d", "kind": "data", "generator": "addition-sft",
                                                                   "feedback": 1.5}]}))
    with pytest.raises(AlignError, match=r"\(d\): key 'feedback' must be between 0.0 and 1.0, got 1.5"):
        load_pipeline(str(bad))


def test_quickstart_pipeline_validates():
    from align.runner.pipeline import Runner, load_pipeline

    path = REPO / "recipes" / "quickstart" / "pipeline.yaml"
    spec = load_pipeline(str(path))
    runner = Runner(spec, str(path))
    kinds = [s["kind"] for s in spec["stages"]]
    assert kinds[:5] == ["data", "sft", "trees", "sft", "nca"] and "eval" in kinds and "publish" in kinds
    for stage in spec["stages"]:
        resolved = runner.resolve(stage)
        if "resolved_recipe" in resolved and stage["kind"] != "trees":
            from align.train.config import ModelArguments, DataArguments, validate_keys
            from trl import DPOConfig, KTOConfig, SFTConfig

            cls = {"sft": SFTConfig, "dpo": DPOConfig, "nca": DPOConfig, "kto": KTOConfig}[stage["kind"]]
            validate_keys(resolved["resolved_recipe"], (ModelArguments, DataArguments, cls), stage["name"])


def test_eval_metrics_on_fixed_answers():
    from align.evaluation.evaluate import markdown_table, score
    from align.tasks.problems import Problem

    problems = [Problem(id="m1", task="math", prompt="1+1", answer="2"),
                Problem(id="m2", task="math", prompt="2+2", answer="4"),
                Problem(id="l1", task="logic", prompt="sky blue?", answer="yes"),
                Problem(id="c1", task="code", prompt="add", entry_point="add",
                        tests="def check(candidate):\n    assert candidate(1, 2) == 3\n")]
    answers = ["Answer: 2", "Answer: 5", "Answer: yes", "```python\ndef add(a, b):\n    return a - b\n```"]
    result = score(problems, answers)
    assert result["pass@1"] == 0.5 and result["n"] == 4 and result["correct"] == [True, False, True, False]
    assert result["per_task"] == {"code": {"pass@1": 0.0, "n": 1}, "logic": {"pass@1": 1.0, "n": 1},
                                  "math": {"pass@1": 0.5, "n": 2}}
    table = markdown_table({"models": {"base": {k: v for k, v in result.items() if k != "correct"}}})
    assert "| base | 50.0% | 0.0% | 100.0% | 50.0% | 4 |" in table


class ScriptedBackend:
    """Greedy answers by script: problem -> the answer it gives at each turn; it records every chat."""

    def __init__(self, script):
        self.script, self.chats = script, []

    def generate_batch(self, requests):
        out = []
        for chat, n, _ in requests:
            self.chats.append(list(chat))  # the eval extends its chats in place
            turn = sum(m["role"] == "user" for m in chat)
            out.append([f"Answer: {self.script[chat[0]['content']][turn - 1]}"] * n)
        return out


def test_multi_turn_eval_puts_the_critic_in_the_loop():
    from align.evaluation.evaluate import generate_greedy, markdown_table, multi_turn, score
    from align.tasks.problems import Problem

    problems = [Problem(id=f"p{i}", task="math", prompt=f"{i}+{i}", answer=str(2 * i), prefix="") for i in range(4)]
    backend = ScriptedBackend({"0+0": [0], "1+1": [3, 2], "2+2": [5, 6, 4], "3+3": [1, 1, 1]})
    first = generate_greedy(backend, [[{"role": "user", "content": p.instruction}] for p in problems], batch_size=3)
    correct = score(problems, first)["correct"]
    rates, later = multi_turn(backend, problems, first, correct, turns=3, batch_size=3)
    assert correct == [True, False, False, False]
    assert rates == {"1": 0.25, "2": 0.5, "3": 0.75}
    assert later[0] == [] and [a["correct"] for a in later[2]] == [False, True] and len(later[3]) == 2
    # the turn-3 chat of problem 2 holds both wrong answers, each followed by the observation critic's turn
    chat = next(c for c in backend.chats if c[0]["content"] == "2+2" and len(c) == 5)
    assert [m["content"] for m in chat[1:]] == ["Answer: 5", "Out: 5\nYour answer is wrong.", "Answer: 6",
                                                "Out: 6\nYour answer is wrong."]
    table = markdown_table({"models": {"sft": {"pass@1": 0.25, "n": 4, "per_task": {"math": {"pass@1": 0.25, "n": 4}},
                                               "pass@turns": rates}}})
    assert "| model | pass@1 | math pass@1 | pass@2 turns | pass@3 turns | problems |" in table
    assert "| sft | 25.0% | 25.0% | 50.0% | 75.0% | 4 |" in table


def test_publish_dry_run_card_loads(sft_output, tmp_path):
    from huggingface_hub import ModelCard

    from align.publishing.publish import main as publish

    results = tmp_path / "eval" / "results.json"
    results.parent.mkdir()
    results.write_text(json.dumps({"problems": "p", "models": {"base": {"pass@1": 0.25, "n": 4, "per_task": {"math": {"pass@1": 0.25, "n": 4}}}}}))
    (tmp_path / "eval" / "plots").mkdir()
    (tmp_path / "eval" / "plots" / "rewards.png").write_bytes(b"\x89PNG\r\n")
    out = tmp_path / "hub"
    assert publish([str(sft_output), "--repo-id", "me/tiny", "--dry-run", "--output", str(out), "--eval", str(results)]) == 0
    card = ModelCard.load(out / "README.md")
    # metadata names Hub repos only: the embedded tiny model and the local data are in the text, not there
    assert card.data.base_model is None and not card.data.datasets and card.data.library_name == "peft"
    assert card.data.license == "apache-2.0" and "moe" in card.data.tags
    assert "`tiny-mixtral`" in card.text and "data/tiny/sft.jsonl" in card.text
    text = card.text
    assert "| base | 25.0% |" in text and "plots/rewards.png" in text and "experts (" in text and "router" in text
    assert (out / "adapter_model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert (out / "plots" / "rewards.png").exists()
    with pytest.raises(SystemExit):
        from align.cli import main

        main(["publish", str(sft_output), "--repo-id", "noslash", "--dry-run"])


def test_addition_heldout_split_is_disjoint_and_unstructured():
    from align.runner.quickstart import addition_sft_rows
    from align.tasks.problems import load_problems

    heldout = {p.prompt for p in load_problems("addition:300:999:2:heldout")[0]}
    trees = {p.prompt for p in load_problems("addition:600:7:2:train")[0]}
    boot = {r["prompt"][0]["content"] for r in addition_sft_rows(4000, 12345, [2], feedback=0.3)}
    assert not heldout & trees and not heldout & boot
    sums = [sum(map(int, p.split("+"))) for p in heldout]
    assert {s % 10 for s in sums} == set(range(10))  # not one class of answers reserved
    assert any((int(p.split("+")[0]) % 10 + int(p.split("+")[1]) % 10) >= 10 for p in heldout)  # carries too


def test_publish_merge_keeps_the_recipes_dtype(tmp_path):
    """A bfloat16 stage publishes a bfloat16 merged model (it used to be loaded, and merged, in float32)."""
    from safetensors.torch import load_file

    from align.publishing.publish import main as publish
    from align.sft.train import main as sft
    from conftest import stage_args

    stage = tmp_path / "sft"
    sft(stage_args("sft.yaml", stage, "--max_steps", "1", "--dtype", "bfloat16"))
    assert publish([str(stage), "--repo-id", "me/tiny", "--dry-run", "--merge", "--output", str(tmp_path / "hub")]) == 0
    weights = load_file(str(tmp_path / "hub" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {__import__("torch").bfloat16}
    assert not (tmp_path / "hub" / "adapter_config.json").exists()


@pytest.mark.parametrize("model", ["mixtral-8x7b", "mixtral-8x22b"])
def test_real_model_pipelines_check_out(model, capsys, monkeypatch):
    """The real-model pipelines check out, but for their hub models: offline and not in the cache, --check says
    so in one line (align/train/model_check.py); with the models taken as there, every stage checks out."""
    import align.train.model_check
    from align.core.errors import AlignError
    from align.runner.pipeline import main

    with pytest.raises(AlignError, match=r"not in the local Hub cache.*hf download [^ ]+/Mixtral-8x"):
        main([str(REPO / "recipes" / model / "pipeline.yaml"), "--check"])
    monkeypatch.setattr(align.train.model_check, "_check_hub", lambda name, *a, **k: align.train.model_check.ModelInput(name, name))
    assert main([str(REPO / "recipes" / model / "pipeline.yaml"), "--check"]) == 0
    out = capsys.readouterr().out
    for stage in ("trees (trees): ok", "sft (sft): ok", "nca (nca): ok", "kto (kto): ok", "eval (eval): ok",
                  "publish (publish): ok", "dpo (dpo): ok (disabled"):
        assert stage in out


def _checked(tmp_path, stages, **top):
    spec = {"output_dir": str(tmp_path / "out"), **top, "stages": stages}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_check_finds_a_typo_in_the_last_stage_before_anything_runs(tmp_path):
    from align.runner.pipeline import main

    nca = {"name": "nca", "kind": "nca", "recipe": str(REPO / "recipes" / "tiny-mixtral" / "nca.yaml"),
           "set": {"adapter_name_or_path": "${boot}", "betaa": 0.1}}
    path = _pipeline(tmp_path)
    spec = yaml.safe_load(open(path))
    spec["stages"].append(nca)
    open(path, "w").write(yaml.safe_dump(spec))
    for flags in (["--check"], []):  # a plain run checks first too: no stage may run
        with pytest.raises(AlignError, match=r"stages\[2\] \(nca\): .*nca.yaml: unknown key 'betaa' \(did you mean 'beta'\?\)"):
            main([path, *flags])
        assert not (tmp_path / "out" / "data").exists()


@pytest.mark.parametrize("stages,flags,message", [
    ([{"name": "d", "kind": "data", "generatr": "addition-sft"}], [], r"unknown key 'generatr' \(did you mean 'generator'\?\)"),
    ([{"name": "d", "kind": "data", "n": -4}], [], "'n' must be at least 1"),
    ([{"name": "d", "kind": "data"}], ["--enable", "dpo"], "--enable: no stage named 'dpo'"),
    ([{"name": "d", "kind": "data"}, {"name": "p", "kind": "publish", "source": "d"}], [], "source 'd' is not an earlier training stage"),
    ([{"name": "s", "kind": "sft", "recipe": str(REPO / "recipes" / "tiny-mixtral" / "sft.yaml"),
       "set": {"datasets": ["./no/such.jsonl"]}}], [], r"datasets\[0\] ./no/such.jsonl not found"),
    ([{"name": "s", "kind": "sft", "recipe": str(REPO / "recipes" / "tiny-mixtral" / "sft.yaml"),
       "set": {"learning_rate": "fast"}}], [], "'learning_rate' must be a number"),
    ([{"name": "t", "kind": "trees", "recipe": str(REPO / "recipes" / "tiny-mixtral" / "trees.yaml"),
       "set": {"actor": {"temperatur": 1}}}], [], "did you mean 'temperature'"),
    ([{"name": "e", "kind": "eval", "problems": "./nope.jsonl", "models": {"m": {"model": "tiny-mixtral"}}}], [],
     "problems ./nope.jsonl not found"),
    ([{"name": "e", "kind": "eval", "problems": ["addition:4", "mbpp@./nope.parquet"],
       "models": {"m": {"model": "tiny-mixtral"}}}], [], "problems ./nope.parquet not found"),
    ([{"name": "e", "kind": "eval", "problems": ["gsm8k", "math500@"], "models": {"m": {"model": "tiny-mixtral"}}}], [],
     r"stages\[0\] \(e\): problems: 'math500@': nothing after '@'"),
])
def test_check_names_the_stage_and_key(tmp_path, stages, flags, message):
    from align.runner.pipeline import main

    with pytest.raises(AlignError, match=message):
        main([_checked(tmp_path, stages), "--check", *flags])


class _Knower:
    """An OpenAI-compatible server that knows the sample problems: right for odd seeds, wrong for even ones;
    any other prompt (the LLM critic's) gets a short critique."""

    @staticmethod
    def start():
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from align.tasks.problems import load_problems

        problems = load_problems(str(REPO / "data" / "problems" / "mixed_sample.jsonl"))[0]
        code = {"count_vowels": "def count_vowels(s):\n    return sum(c in 'aeiouAEIOU' for c in s)\n",
                "second_largest": "def second_largest(xs):\n    v = sorted(set(xs))\n    return v[-2] if len(v) > 1 else None\n"}

        def answer(content, right):
            for p in problems:
                if p.prompt in content:
                    if p.task == "code":
                        body = code[p.entry_point] if right else f"def {p.entry_point}(*a):\n    return None\n"
                        return f"Step 1: write it.\n```python\n{body}```"
                    if p.task == "logic":
                        return f"Step 1: think.\nAnswer: {p.answer if right else 'zzz'}"
                    return f"Step 1: compute.\n\\boxed{{{p.answer if right else '-1'}}}"
            return "Check your last step against the question."

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = answer(body["messages"][0]["content"], (body.get("seed") or 0) % 2 == 1)
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


def test_mixtral_pipeline_runs_end_to_end_on_the_tiny_model(tmp_path, monkeypatch):
    """recipes/mixtral-8x7b/pipeline.yaml as it is, with only the model keys (tiny-mixtral, float32, no bf16),
    the backends (a loopback server that knows the sample problems; the CPU accelerate config) and the sizes
    (2 steps of 4 rows; 3 eval problems of 16 tokens) swapped: trees, export, SFT, NCA, KTO, eval, publish."""
    from align.runner.pipeline import main

    server, url = _Knower.start()
    monkeypatch.setenv("CRITIC_API_KEY", "any-key-will-do")  # the recipe's critic reads its key from there
    try:
        spec = yaml.safe_load((REPO / "recipes" / "mixtral-8x7b" / "pipeline.yaml").read_text())
        spec["output_dir"] = str(tmp_path / "out")
        spec["accelerate_config"] = str(REPO / "recipes" / "accelerate" / "cpu.yaml")
        served = {"backend": "server", "model": "knower", "base_urls": [url]}
        tiny = {"model_name_or_path": "tiny-mixtral", "dtype": "float32", "bf16": False,
                "max_steps": 2, "gradient_accumulation_steps": 1}
        for stage in spec["stages"]:
            if stage["kind"] == "trees":
                stage["set"].update(actor=served, critic={"type": "llm", **served})
            elif stage["kind"] in ("sft", "nca", "kto", "dpo"):
                stage["set"].update(tiny)
            elif stage["kind"] == "eval":
                stage.update(limit=3, max_new_tokens=16)
                stage["models"] = {name: ({**m, "model": "tiny-mixtral"} if "adapter" in m else served)
                                   for name, m in stage["models"].items()}
        path = tmp_path / "pipeline.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        assert main([str(path)]) == 0
    finally:
        server.shutdown()
    out = tmp_path / "out"
    stats = json.loads((out / "trees" / "export" / "stats.json").read_text())
    assert stats["stats"]["trees"] == 8 and stats["counts"]["pairs"] > 0
    assert (stats["stats"]["per_task"].keys()) == {"code", "logic", "math"}
    for stage in ("sft", "nca", "kto"):
        assert (out / stage / "adapter_model.safetensors").is_file(), stage
    results = json.loads((out / "eval" / "results.json").read_text())
    assert set(results["models"]) == {"instruct", "sft", "nca", "kto"}  # dpo is off by default: skipped
    assert results["models"]["instruct"]["n"] == 3 and "2" in results["models"]["instruct"]["pass@turns"]
    assert (out / "publish" / "hub" / "README.md").is_file()


def test_the_eval_set_is_500_distinct_problems_apart_from_every_training_row_and_its_twin():
    from align.runner.quickstart import addition_sft_rows
    from align.tasks.problems import load_problems

    def pair(text):
        return tuple(sorted(map(int, text.split("+"))))

    heldout = load_problems("addition:500:999:2:heldout")[0]
    assert len({pair(p.prompt) for p in heldout}) == 500  # distinct, and no two are twins
    trees = {pair(p.prompt) for p in load_problems("addition:3000:7:2:train")[0]}
    boot = {pair(r["prompt"][0]["content"]) for r in addition_sft_rows(12800, 12345, [2, 3])}
    assert not {pair(p.prompt) for p in heldout} & (trees | boot)
    with pytest.raises(AlignError, match="only 656 distinct held-out pairs"):
        load_problems("addition:700:1:2:heldout")


def test_the_step_critic_names_the_first_wrong_step_without_the_answer():
    from align.tasks.critic import step_critique
    from align.tasks.problems import Problem, addition_steps

    problem = Problem(id="a", task="math", prompt="57+68", answer="125", prefix="", extra={"solution": addition_steps(57, 68)})
    assert addition_steps(57, 68) == "7+8=15\n5+6+1=12\nAnswer: 125"
    cases = {
        "7+8=15\n5+6+1=13\nAnswer: 135": "Step 2 is wrong: 5+6+1 is not 13.",
        "7+8=15\n5+6=11\nAnswer: 115": "Step 2 carries 0, but the step before it carries 1.",
        "7+9=16\n5+6+1=12\nAnswer: 126": "Step 1 adds the wrong digits: the units digits are 7 and 8.",
        "7+8+1=16\n5+6+1=12\nAnswer: 126": "Step 1 adds a carry, but no step comes before it.",
        "7+8=15\nAnswer: 15": "Step 2 is missing: add the tens digits too.",
        "7+8=15\n5+6+1=12\nAnswer: 124": "The steps are right, but the answer does not follow from them",
    }
    for answer, critique in cases.items():
        text = step_critique(problem, answer)
        assert text.startswith(critique) and "125" not in text, (answer, text)
    assert step_critique(Problem(id="b", task="math", prompt="x", answer="1"), "2") == ""  # no reference: no critique



def test_model_card_metadata_model_index_and_no_local_paths_pushed(sft_output, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    import align.publishing.publish
    from align.cli import main
    from align.publishing.publish import main as publish

    results = tmp_path / "results.json"
    results.write_text(json.dumps({"problems": "addition:500:999:2:heldout", "models": {
        "sft": {"pass@1": 0.7, "n": 500, "per_task": {"math": {"pass@1": 0.7, "n": 500}}, "adapter": str(sft_output),
                "pass@turns": {"1": 0.7, "2": 0.75}}}}))
    assert publish([str(sft_output), "--repo-id", "me/tiny", "--dry-run", "--output", str(tmp_path / "hub"), "--eval",
                    str(results), "--base-repo-id", "me/tiny-base", "--dataset-repo-id", "me/tiny-trees"]) == 0
    card = ModelCard.load(tmp_path / "hub" / "README.md")
    assert card.data.base_model == "me/tiny-base" and card.data.datasets == ["me/tiny-trees"]
    (index,) = card.data.to_dict()["model-index"]
    metrics = {m["type"]: m["value"] for r in index["results"] for m in r["metrics"]}
    assert metrics == {"pass@1": 0.7, "pass@2-turns": 0.75}
    pushed = []
    monkeypatch.setattr(align.publishing.publish, "push_folder", lambda folder, repo, **kw: pushed.append(repo) or "url")
    with pytest.raises(SystemExit):  # a local base and no repo id: refused, before anything is pushed
        main(["publish", str(sft_output), "--repo-id", "me/tiny", "--output", str(tmp_path / "hub2")])
    assert not pushed
    assert main(["publish", str(sft_output), "--repo-id", "me/tiny", "--output", str(tmp_path / "hub3"),
                 "--base-repo-id", "me/tiny-base"]) == 0 and pushed == ["me/tiny"]


def test_turn2_probe_runs_on_the_char_model(capsys, monkeypatch):
    """`python benchmarks/turn2_probe.py MODEL_DIR` (the README's reason turn 2 stays empty) on the untrained
    char model: one line, each placement's pass@1 a rate over the problems asked for."""
    import importlib.util
    import sys

    from align.train.models import resolve_model_path

    spec = importlib.util.spec_from_file_location("turn2_probe", REPO / "benchmarks" / "turn2_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    monkeypatch.setattr(sys, "argv", ["turn2_probe.py", resolve_model_path("tiny-mixtral-char"), "--problems", "3"])
    probe.main()
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["problems"] == 3 and set(result["pass@1"]) == {"first", "after_a_turn", "after_words"}
    assert all(rate in {round(k / 3, 4) for k in range(4)} for rate in result["pass@1"].values())  # eval's rounding


def _spread_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quickstart_spread", REPO / "benchmarks" / "quickstart_spread.py")
    spread = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(spread)
    return spread


def test_quickstart_spread_writes_seeded_pipelines_that_check_out(tmp_path, monkeypatch):
    """`python benchmarks/quickstart_spread.py --check`: every seed's pipeline has every stage on, its own
    seed in the data, trees and training stages, and passes `align run --check`; so does the variant with
    headroom (--digits 3 --bootstrap-steps 400); seed 0 is the quickstart as shipped."""
    import sys

    import yaml

    spread = _spread_module()
    monkeypatch.setattr(sys, "argv", ["quickstart_spread.py", "--check", "--seeds", "4", "--output", str(tmp_path / "a")])
    spread.main()
    monkeypatch.setattr(sys, "argv", ["quickstart_spread.py", "--check", "--seeds", "6", "--digits", "3",
                                      "--bootstrap-steps", "400", "--output", str(tmp_path / "b")])
    spread.main()
    pipeline = yaml.safe_load((tmp_path / "a" / "pipeline-seed-4.yaml").read_text())
    stages = {s["name"]: s for s in pipeline["stages"]}
    shipped = yaml.safe_load((REPO / "recipes" / "quickstart" / "pipeline.yaml").read_text())
    assert list(stages) == [s["name"] for s in shipped["stages"]] and not any("enabled" in s for s in stages.values())
    assert stages["data"]["seed"] == next(s for s in shipped["stages"] if s["name"] == "data")["seed"] + 4
    assert {n for n, s in stages.items() if s.get("set", {}).get("seed") == 4} == {
        "bootstrap", "trees", "sft", "nca", "chosen_sft", "dpo", "kto", "trees2", "sft2", "nca2"}
    assert pipeline["output_dir"] == str(tmp_path / "a" / "seed-4")
    headroom = {s["name"]: s for s in yaml.safe_load((tmp_path / "b" / "pipeline-seed-6.yaml").read_text())["stages"]}
    assert headroom["bootstrap"]["set"]["max_steps"] == 400 and headroom["eval"]["problems"] == "addition:500:999:3:heldout"
    assert headroom["trees"]["set"]["problems"] == "addition:3000:7:3:train"
    assert headroom["trees2"]["set"]["problems"] == "addition:3000:8:3:train"
    assert headroom["trees2"]["set"]["actor"] == {"model": "${bootstrap}", "adapter": "${sft}", "max_new_tokens": 48}
    as_shipped = yaml.safe_load(spread.seeded_pipeline(0, tmp_path, None).read_text())["stages"]
    for ours, theirs in zip(as_shipped, shipped["stages"], strict=True):
        theirs.pop("enabled", None)
        if ours.get("set", {}).get("seed") == 0:
            recipe = yaml.safe_load((REPO / ours["recipe"]).read_text())
            assert recipe["seed"] == ours["set"].pop("seed"), ours["name"]  # the recipe's own seed: unchanged
        assert ours == theirs


def test_quickstart_spread_shares_a_bootstrap_only_when_asked(tmp_path, monkeypatch):
    """Each seed trains its own bootstrap on its own rows; with --shared-bootstrap the data keeps its seed
    and the later seeds name the first seed's bootstrap."""
    import sys

    import yaml

    spread = _spread_module()
    ran = []
    monkeypatch.setattr(spread.subprocess, "run", lambda cmd, cwd: ran.append(cmd[-1]) or
                        __import__("types").SimpleNamespace(returncode=0))
    monkeypatch.setattr(spread, "collect", lambda seed_dir: {"models": {"sft": {"pass@1": 0.5}}, "chosen_reward": {
        s: None for s in spread.PREFERENCE}, "turn2_pair_share": 0.0})
    for shared in (False, True):
        out = tmp_path / str(shared)
        monkeypatch.setattr(sys, "argv", ["quickstart_spread.py", "--seeds", "1", "2", "--output", str(out),
                                          *["--shared-bootstrap"] * shared])
        spread.main()
        first, second = (yaml.safe_load((out / f"pipeline-seed-{s}.yaml").read_text())["stages"] for s in (1, 2))
        data_seed = next(s for s in first if s["name"] == "data")["seed"]
        second_names = [s["name"] for s in second]
        trees = next(s for s in second if s["name"] == "trees")["set"]["actor"]["model"]
        if shared:
            assert data_seed == 12345 and "bootstrap" not in second_names
            assert trees == str(out / "seed-1" / "bootstrap")
        else:
            assert data_seed == 12346 and "bootstrap" in second_names and trees == "${bootstrap}"
            assert next(s for s in second if s["name"] == "data")["seed"] == 12347
        assert "one bootstrap for all seeds" in (out / "spread.md").read_text() if shared else \
            "a bootstrap of its own per seed" in (out / "spread.md").read_text()
    assert ran == [str(tmp_path / str(shared) / f"pipeline-seed-{s}.yaml") for shared in (False, True) for s in (1, 2)]


def test_quickstart_spread_reads_the_chosen_reward_of_a_full_logging_window(tmp_path):
    spread = _spread_module()
    history = [{"step": 5, "loss": 1.0, "rewards/chosen": 0.01}, {"step": 10, "loss": 1.0, "rewards/chosen": -0.005},
               {"step": 11, "loss": 1.0, "rewards/chosen": -0.21}, {"step": 11, "train_loss": 1.0}]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"logging_steps": 5, "log_history": history}))
    assert spread.final_chosen_reward(tmp_path) == -0.005
    assert spread.final_chosen_reward(tmp_path / "missing") is None


def test_an_eval_stage_whose_config_changed_evaluates_only_the_model_that_is_new(tmp_path, capsys):
    """Enabling one more model (as `--enable dpo` does) changes the eval stage's config, so align run restarts
    it; the models already evaluated keep their results (eval's fingerprint check decides) and only the new one
    is evaluated. A changed setting the results depend on still evaluates every model again."""
    from align.runner.pipeline import LOG_ATTEMPT, main

    server, url = _Knower.start()
    served = {"backend": "server", "model": "knower", "base_urls": [url]}
    eval_stage = {"name": "eval", "kind": "eval", "problems": str(REPO / "data" / "problems" / "mixed_sample.jsonl"),
                  "limit": 2, "max_new_tokens": 16, "models": {"a": served}}

    def run(**changes):
        path = _checked(tmp_path, [{**eval_stage, **changes}])
        assert main([path]) == 0
        return (tmp_path / "out" / "eval" / "log.txt").read_text().split(LOG_ATTEMPT)[-1]

    try:
        first = run()
        assert "eval: a: kept" not in first
        second = run(models={"a": served, "b": served})
        third = run(models={"a": served, "b": served}, max_new_tokens=12)
    finally:
        server.shutdown()
    assert "each model's finished results kept" in second
    assert "eval: a: kept from an earlier run (results_a.json)" in second and "eval: b: kept" not in second
    assert "eval: a: evaluated again (its problems, settings or model changed)" in third and "eval: b: evaluated again" in third
    results = json.loads((tmp_path / "out" / "eval" / "results.json").read_text())
    assert set(results["models"]) == {"a", "b"}
