"""A corpus of malformed recipes, problem files, response files, programs and numbers: every one ends with
exactly one line `align: error: ...` naming the file or key, exit code 2, and no model loaded."""

from __future__ import annotations

import json

import pytest

from conftest import REPO

TRees = "trees"
GOOD_TREES = {"problems": "arithmetic:2:0", "output_dir": "OUT", "progress": False,
              "actor": {"backend": "local", "model": "tiny-mixtral"}}


def _yaml(value) -> str:
    import yaml

    return yaml.safe_dump(value)


def _trees_case(recipe_text=None, problems_text=None, problems_bytes=None, **changes):
    def build(tmp):
        values = {**GOOD_TREES, "output_dir": str(tmp / "out"), **changes}
        if problems_text is not None or problems_bytes is not None:
            path = tmp / "problems.jsonl"
            path.write_bytes(problems_bytes if problems_bytes is not None else problems_text.encode())
            values["problems"] = str(path)
        recipe = tmp / "trees.yaml"
        if isinstance(recipe_text, bytes):
            recipe.write_bytes(recipe_text)
        else:
            recipe.write_text(recipe_text if recipe_text is not None else _yaml(values))
        return ["trees", "build", "--config", str(recipe)]
    return build


CODE_ROW = {"id": "c", "task": "code", "prompt": "f", "tests": "def check(candidate):\n    assert candidate() == 1\n",
            "entry_point": "f"}

CASES = {
    # trees recipes
    "trees: empty recipe": (_trees_case(""), "empty"),
    "trees: not UTF-8": (_trees_case(b"problems: \xff\xfe\n"), "UTF-8"),
    "trees: a list": (_trees_case("- a\n- b\n"), "mapping"),
    "trees: bad YAML": (_trees_case("problems: [unclosed\n"), "YAML"),
    "trees: no problems key": (_trees_case("output_dir: x\n"), "'problems' is required"),
    "trees: limit -1": (_trees_case(limit=-1), "'limit'"),
    "trees: verifier_workers 0": (_trees_case(verifier_workers=0), "'verifier_workers'"),
    "trees: samples_per_turn 1": (_trees_case(samples_per_turn=1), "'samples_per_turn'"),
    "trees: parallel_trees text": (_trees_case(parallel_trees="many"), "'parallel_trees'"),
    "trees: actor a list": (_trees_case(actor=[1, 2]), "'actor'"),
    "trees: temperature nan": (_trees_case(actor={"temperature": float("nan")}), "temperature"),
    "trees: top_p 2": (_trees_case(actor={"top_p": 2.0}), "top_p"),
    "trees: timeout inf": (_trees_case(sandbox={"timeout_s": float("inf")}), "timeout_s"),
    "trees: memory -5": (_trees_case(sandbox={"memory_mb": -5}), "memory_mb"),
    "trees: memory 0": (_trees_case(sandbox={"memory_mb": 0}), "memory_mb"),
    "trees: server without urls": (_trees_case(actor={"backend": "server"}), "base_urls"),
    "trees: missing critic template": (_trees_case(critic={"type": "llm", "backend": "server", "base_urls": ["http://x"],
                                                           "template": "/nonexistent/critic.txt"}), "critic template"),
    "trees: missing problems file": (_trees_case(problems="./nope/problems.jsonl"), "nope/problems.jsonl"),
    # problem files
    "problems: row is an array": (_trees_case(problems_text="[1, 2]\n"), "problems.jsonl:1"),
    "problems: row is a string": (_trees_case(problems_text='"text"\n'), "problems.jsonl:1"),
    "problems: row is null": (_trees_case(problems_text="null\n"), "problems.jsonl:1"),
    "problems: not UTF-8": (_trees_case(problems_bytes=b'{"id": "\xff"}\n'), "UTF-8"),
    "problems: not JSON": (_trees_case(problems_text='{"id": 1,\n'), "problems.jsonl:1"),
    "problems: id is a list": (_trees_case(problems_text=json.dumps({"id": [1], "task": "math", "prompt": "p", "answer": "1"})),
                               "'id'"),
    "problems: id is true": (_trees_case(problems_text=json.dumps({"id": True, "task": "math", "prompt": "p", "answer": "1"})),
                             "'id'"),
    "problems: unknown task": (_trees_case(problems_text=json.dumps({"id": 1, "task": "poetry", "prompt": "p"})), "'task'"),
    "problems: math without answer": (_trees_case(problems_text=json.dumps({"id": 1, "task": "math", "prompt": "p"})),
                                      "'answer'"),
    "problems: tests not Python": (_trees_case(problems_text=json.dumps({**CODE_ROW, "tests": "def check(:"})), "'tests'"),
    "problems: entry point not a name": (_trees_case(problems_text=json.dumps({**CODE_ROW, "entry_point": "f()"})),
                                         "'entry_point'"),
    "problems: repeated id": (_trees_case(problems_text=json.dumps(CODE_ROW) + "\n" + json.dumps(CODE_ROW)), "repeats"),
    "problems: empty file": (_trees_case(problems_text=""), "no usable problems"),
}


def _verify_case(responses_bytes, *flags):
    def build(tmp):
        path = tmp / "responses.jsonl"
        path.write_bytes(responses_bytes)
        return ["verify", "--problems", "arithmetic:2:0", "--responses", str(path), *flags]
    return build


CASES.update({
    "verify: not UTF-8": (_verify_case(b'{"problem_id": "\xff"}\n'), "UTF-8"),
    "verify: row is an array": (_verify_case(b"[1]\n"), "responses.jsonl:1"),
    "verify: unknown problem": (_verify_case(b'{"problem_id": "nope", "response": "1"}\n'), "nope"),
    "verify: response not text": (_verify_case(b'{"problem_id": "arith-0-0", "response": 5}\n'), "'response'"),
    "verify: timeout nan": (_verify_case(b"", "--timeout", "nan"), "--timeout"),
    "verify: timeout -1": (_verify_case(b"", "--timeout", "-1"), "--timeout"),
    "verify: timeout inf": (_verify_case(b"", "--timeout", "inf"), "--timeout"),
    "verify: missing responses": (lambda tmp: ["verify", "--problems", "arithmetic:2:0", "--responses", str(tmp / "x.jsonl")],
                                  "x.jsonl"),
})


def _sandbox_case(content: bytes | None, *flags):
    def build(tmp):
        path = tmp / "program.py"
        if content is not None:
            path.write_bytes(content)
        return ["sandbox", "run", str(path), *flags]
    return build


CASES.update({
    "sandbox: timeout nan": (_sandbox_case(b"print(1)", "--timeout", "nan"), "--timeout"),
    "sandbox: timeout 0": (_sandbox_case(b"print(1)", "--timeout", "0"), "--timeout"),
    "sandbox: memory 0": (_sandbox_case(b"print(1)", "--memory-mb", "0"), "--memory-mb"),
    "sandbox: memory -5": (_sandbox_case(b"print(1)", "--memory-mb", "-5"), "--memory-mb"),
    "sandbox: not UTF-8": (_sandbox_case(b"\xff\xfe"), "UTF-8"),
    "sandbox: missing file": (_sandbox_case(None), "program.py"),
})


def _stage_case(text: str | bytes, stage="sft"):
    def build(tmp):
        path = tmp / "recipe.yaml"
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text.replace("OUT", str(tmp / "o")))
        return [stage, "--config", str(path)]
    return build


SFT = (REPO / "recipes" / "tiny-mixtral" / "sft.yaml").read_text()
CASES.update({
    "sft: empty recipe": (_stage_case(""), "empty"),
    "sft: not UTF-8": (_stage_case(b"lr: \xff"), "UTF-8"),
    "sft: learning rate nan": (_stage_case(SFT + "\nlearning_rate: .nan\n"), "learning_rate"),
    "sft: lora_r 0": (_stage_case(SFT + "\nlora_r: 0\n"), "lora_r"),
    "sft: negative weight": (_stage_case(SFT.replace("- path: data/tiny/sft.jsonl", "- {path: data/tiny/sft.jsonl, weight: -1}")),
                             "weight"),
    "sft: datasets a number": (_stage_case(SFT.replace("datasets:\n  - path: data/tiny/sft.jsonl", "datasets: 5")), "datasets"),
})


def _pipeline_case(spec):
    def build(tmp):
        path = tmp / "pipeline.yaml"
        path.write_text(spec if isinstance(spec, str) else _yaml({"output_dir": str(tmp / "out"), **spec}))
        return ["run", str(path)]
    return build


CASES.update({
    "run: empty": (_pipeline_case(""), "empty"),
    "run: stages not a list": (_pipeline_case({"stages": {"a": 1}}), "stages"),
    "run: unknown kind": (_pipeline_case({"stages": [{"name": "a", "kind": "bake"}]}), "kind"),
    "run: unknown reference": (_pipeline_case({"stages": [{"name": "a", "kind": "eval", "problems": "${b}",
                                                           "models": {}}]}), "${b}"),
    "run: eval turns 7": (_pipeline_case({"stages": [{"name": "e", "kind": "eval", "problems": "arithmetic:2",
                                                      "models": {}, "turns": 7}]}), "turns"),
})


def _eval_case(spec):
    def build(tmp):
        path = tmp / "eval.yaml"
        path.write_text(_yaml(spec))
        return ["eval", "--config", str(path), "--output", str(tmp / "eval")]
    return build


CASES.update({
    "eval: no problems": (_eval_case({"models": {"m": {"model": "tiny-mixtral"}}}), "problems"),
    "eval: no models": (_eval_case({"problems": "arithmetic:2", "models": {}}), "models"),
    "eval: model not a mapping": (_eval_case({"problems": "arithmetic:2", "models": {"m": "tiny"}}), "models.m"),
    "eval: turns 0": (_eval_case({"problems": "arithmetic:2", "models": {"m": {"model": "tiny-mixtral"}}, "turns": 0}),
                      "turns"),
    "eval: limit -3": (_eval_case({"problems": "arithmetic:2", "models": {"m": {"model": "tiny-mixtral"}}, "limit": -3}),
                       "limit"),
})


def _written(path, text) -> bool:
    path.write_text(text)
    return True


def _trees_file_case(lines, action="export"):
    def build(tmp):
        folder = tmp / "trees"
        folder.mkdir()
        (folder / "trees.jsonl").write_text(lines)
        return ["trees", action, str(folder)] + (["--output", str(tmp / "export")] if action == "export" else [])
    return build


CASES.update({
    "export: no trees": (_trees_file_case(""), "no trees"),
    "export: corrupt middle line": (_trees_file_case('{"broken\n{"also": 1}\n'), "trees.jsonl:1"),
    "stats: corrupt middle line": (_trees_file_case('[1, 2]\n{"a": 1}\n', "stats"), "trees.jsonl:1"),
    "import: missing file": (lambda tmp: ["trees", "import", str(tmp / "nope.parquet"), "--output", str(tmp / "o")],
                             "nope.parquet"),
    "import: wrong columns": (lambda tmp: _written(tmp / "x.jsonl", '{"a": 1}\n')
                              and ["trees", "import", str(tmp / "x.jsonl"), "--output", str(tmp / "o")], "UltraInteract_pair"),
    "publish: not a stage output": (lambda tmp: ["publish", str(tmp), "--repo-id", "a/b", "--dry-run"], "align_config.yaml"),
    "publish: bad repo id": (lambda tmp: ["publish", str(tmp), "--repo-id", "nobody"], "ORG/NAME"),
})


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line(case, tmp_path, capsys, monkeypatch):
    import align.train.models

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(align.train.models, "_from_pretrained", no_model)
    from align.cli import main

    build, expected = CASES[case]
    argv = build(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 2, (case, err)
    assert len(err) == 1 and err[0].startswith("align: error: "), (case, err)
    assert expected in err[0], (case, err[0])


# ---------------------------------------------------------------- found by a red-team pass
def _file(tmp, name, text):
    path = tmp / name
    path.write_text(text)
    return str(path)


def _tree_line(**changes):
    tree = {"tree_id": "t", "problem": {"id": "p", "task": "math"}, "instruction": "1+1", "solved": False,
            "turns": [{"turn": 1, "history": [{"role": "user", "content": "1+1"}],
                       "actions": [{"text": "2", "correct": True}], "pair": None}]}
    tree.update(changes)
    return json.dumps(tree) + "\n"


HUGE = "9" * 5000
ALIAS_BOMB = ("a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
              "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n")
CASES.update({
    "problems: addition digits -1": (_trees_case(problems="addition:3:0:-1"), "digits"),
    "problems: addition digits 0 held out": (_trees_case(problems="addition:3:0:0:heldout"), "digits"),
    "problems: arithmetic with junk": (_trees_case(problems="arithmetic:2:0:junk"), "too many parts"),
    "problems: humaneval with a count": (_trees_case(problems="humaneval:5"), "too many parts"),
    "problems: a 5000-digit id": (_trees_case(problems_text='{"id": ' + HUGE + ', "task": "math"}\n'), "problems.jsonl:1"),
    "problems: entry point a keyword": (_trees_case(problems_text=json.dumps({**CODE_ROW, "entry_point": "None"})),
                                        "'entry_point'"),
    "problems: answer NaN": (_trees_case(problems_text='{"id": 1, "task": "math", "prompt": "p", "answer": NaN}\n'),
                             "finite"),
    "trees: a 5000-digit seed": (_trees_case(f"problems: arithmetic:2\nseed: {HUGE}\n"), "trees.yaml"),
    "trees: an alias bomb": (_trees_case("problems: arithmetic:2\nseed:\n  " + ALIAS_BOMB.replace("\n", "\n  ")), "seed"),
    "trees: actor adapter missing": (_trees_case(actor={"backend": "local", "model": "tiny-mixtral",
                                                        "adapter": "/nonexistent/adapter"}), "adapter"),
    "trees: actor dtype int4": (_trees_case(actor={"backend": "local", "model": "tiny-mixtral", "dtype": "int4"}), "dtype"),
    "trees: actor model empty": (_trees_case(actor={"backend": "local", "model": ""}), "'model' is empty"),
    "export: a problem without task": (_trees_file_case(_tree_line(problem={"id": "p"})), "trees.jsonl:1"),
    "export: no tree_id": (_trees_file_case(_tree_line(tree_id=None)), "trees.jsonl:1"),
    "export: turns of numbers": (_trees_file_case(_tree_line(turns=[1])), "trees.jsonl:1"),
    "stats: turn number a word": (_trees_file_case(_tree_line(turns=[{"turn": "one", "history": [], "actions": []}]),
                                                   "stats"), "trees.jsonl:1"),
    "export: a pair naming action 7": (_trees_file_case(_tree_line(turns=[{"turn": 1, "history": [], "pair": {"chosen": 7, "rejected": 0},
                                                                           "actions": [{"text": "2", "correct": True}]}])),
                                       "trees.jsonl:1"),
    "export: history a string": (_trees_file_case(_tree_line(turns=[{"turn": 1, "history": "text", "actions": []}])),
                                 "trees.jsonl:1"),
    "export: corrupt build_info": (lambda tmp: _trees_file_case(_tree_line())(tmp)
                                   and (tmp / "trees" / "build_info.json").write_text("{not json")
                                   and ["trees", "export", str(tmp / "trees"), "--output", str(tmp / "export")],
                                   "build_info.json"),
    "export: output is a file": (lambda tmp: _trees_file_case(_tree_line())(tmp)[:3]
                                 + ["--output", _file(tmp, "taken.txt", "x")], "is a file"),
    "import: a bad id": (lambda tmp: ["trees", "import", _file(tmp, "p.jsonl", json.dumps(
        {"id": "abc_x", "parent_id": "p", "trajectory": [{"from": "user", "value": "q"}], "chosen": "a", "rejected": "b"}) + "\n"),
        "--output", str(tmp / "o")], "row 0"),
    "import: an empty trajectory": (lambda tmp: ["trees", "import", _file(tmp, "p.jsonl", json.dumps(
        {"id": "a_1_1", "parent_id": "p", "trajectory": [], "chosen": "a", "rejected": "b"}) + "\n"),
        "--output", str(tmp / "o")], "trajectory"),
    "import: role/content turns": (lambda tmp: ["trees", "import", _file(tmp, "p.jsonl", json.dumps(
        {"id": "a_1_1", "parent_id": "p", "trajectory": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}) + "\n"),
        "--output", str(tmp / "o")], "trajectory"),
    "import: null parent": (lambda tmp: ["trees", "import", _file(tmp, "p.jsonl", json.dumps(
        {"id": "a_1_1", "parent_id": None, "trajectory": [{"from": "user", "value": "q"}], "chosen": None, "rejected": 5}) + "\n"),
        "--output", str(tmp / "o")], "parent_id"),
    "sft: env key empty": (_stage_case(SFT + "\nenv: {'': x}\n"), "env"),
    "sft: env key with =": (_stage_case(SFT + "\nenv: {'A=B': x}\n"), "env"),
    "sft: env value with NUL": (_stage_case(SFT + '\nenv: {A: "x\\0y"}\n'), "env"),
    "sft: env value a list": (_stage_case(SFT + "\nenv: {A: [1, 2]}\n"), "env"),
    "sft: batch size 0": (_stage_case(SFT.replace("per_device_train_batch_size: 4", "per_device_train_batch_size: 0")),
                          "per_device_train_batch_size"),
    "sft: accumulation 0": (_stage_case(SFT.replace("gradient_accumulation_steps: 1", "gradient_accumulation_steps: 0")),
                            "gradient_accumulation_steps"),
    "sft: max_length 0": (_stage_case(SFT.replace("max_length: 256", "max_length: 0")), "max_length"),
    "sft: max_length -5": (_stage_case(SFT.replace("max_length: 256", "max_length: -5")), "max_length"),
    "sft: seed -1": (_stage_case(SFT.replace("seed: 42", "seed: -1")), "seed"),
    "sft: lora_alpha -16": (_stage_case(SFT.replace("lora_alpha: 16", "lora_alpha: -16")), "lora_alpha"),
    "sft: output_dir a file": (lambda tmp: _stage_case(SFT)(tmp) + ["--output_dir", _file(tmp, "f.txt", "x")], "is a file"),
    "sft: model path empty": (_stage_case(SFT.replace("model_name_or_path: tiny-mixtral", "model_name_or_path: ''")),
                              "model_name_or_path"),
    "sft: dataset path empty": (_stage_case(SFT.replace("- path: data/tiny/sft.jsonl", "- path: ''")), "empty path"),
    "eval: model name a path": (_eval_case({"problems": "arithmetic:2", "models": {"../../x": {"model": "tiny-mixtral"}}}),
                                "not a usable name"),
    "eval: model name empty": (_eval_case({"problems": "arithmetic:2", "models": {"": {"model": "tiny-mixtral"}}}),
                               "not a usable name"),
    "run: data digits empty": (_pipeline_case({"stages": [{"name": "d", "kind": "data", "digits": []}]}), "digits"),
    "run: seed a list": (_pipeline_case({"seed": [1, 2], "stages": [{"name": "d", "kind": "data"}]}), "seed"),
    "run: output_dir a file": (lambda tmp: ["run", _file(tmp, "p.yaml", _yaml({"output_dir": _file(tmp, "o.txt", "x"),
                                                                              "stages": [{"name": "d", "kind": "data"}]}))],
                               "is a file"),
    "sandbox: memory 16": (_sandbox_case(b"print(1)", "--memory-mb", "16"), "--memory-mb"),
})


def test_error_lines_stay_short(tmp_path, capsys):
    from align.cli import main

    argv = CASES["trees: an alias bomb"][0](tmp_path)
    with pytest.raises(SystemExit):
        main(argv)
    assert len(capsys.readouterr().err) < 1000
