"""The documentation site (mkdocs.yml, docs/) builds strictly, its generated key reference is what the code
says, and what the README and the pages show is real: every path exists, every stage key is a key, every
YAML block parses, and the cheap commands (`--help`, `--check`) run. Every command they show has a smoke
run in tests/test_readme_commands.py (which reads the same pages)."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys

import yaml

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _code(text: str) -> list[str]:
    """Fenced blocks and inline code spans."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S))
    return blocks + inline


def _command_lines() -> list[tuple[str, str]]:
    """(page, line) of every shell line of a bash block, comments cut."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            for line in block.splitlines():
                line = line.split("  #")[0].strip()
                if line:
                    found.append((page.name, line))
    return found


def _gen_keys():
    spec = importlib.util.spec_from_file_location("gen_keys", REPO / "docs" / "gen_keys.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`: a broken link or anchor, a page missing from the nav or a nav entry without
    its page, and a missing included file (benchmarks/RESULTS.md) all fail the build."""
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = (tmp_path / "site" / "results" / "index.html").read_text()
    assert "Tree builder" in results  # the lab notebook is included, not only linked
    keys = (tmp_path / "site" / "keys" / "index.html").read_text()
    assert "model_name_or_path" in keys and "beta" in keys


def test_the_strict_build_fails_on_a_broken_link(tmp_path):
    """The check above can fail: the same site with one broken link does not build."""
    import shutil

    shutil.copytree(REPO / "docs", tmp_path / "docs")
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(REPO / "benchmarks" / "RESULTS.md", tmp_path / "benchmarks" / "RESULTS.md")
    with (tmp_path / "docs" / "index.md").open("a") as f:
        f.write("\n[gone](no-such-page.md)\n")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode != 0 and "no-such-page.md" in proc.stderr


def test_the_key_reference_is_generated_from_the_code():
    """docs/keys.md is exactly what `python docs/gen_keys.py` writes from the dataclasses behind `--help`."""
    expected = _gen_keys().render()
    assert (REPO / "docs" / "keys.md").read_text() == expected, "docs/keys.md is stale: run python docs/gen_keys.py"


def test_the_key_reference_holds_every_key_of_help():
    """Every `--key` that `align STAGE --help` lists is a row of the reference page."""
    from align.train.config import stage_help

    page = (REPO / "docs" / "keys.md").read_text()
    rows = set(re.findall(r"^\| `([\w.]+)` \|", page, re.M))
    for stage in ("sft", "dpo", "kto", "nca"):
        listed = set(re.findall(r"^  --(\w+)  ", stage_help(stage), re.M))
        assert listed and listed <= rows, (stage, sorted(listed - rows)[:5])


def test_every_path_shown_exists():
    """Recipes, benchmarks, tests, modules and shipped data that the README and the pages name are there
    (`{a,b}` expanded; placeholders such as `X.yaml`, `<model>` and globs skipped)."""
    missing = []
    pattern = re.compile(r"(?<![\w/.-])((?:recipes|benchmarks|tests|align|data/problems|data/tiny)/[\w./{},*<>-]*)")
    for page in PAGES:
        for snippet in _code(page.read_text()):
            for path in pattern.findall(snippet):
                path = path.rstrip(".,;:)")
                if any(c in path for c in "*<>") or re.search(r"/(X|NAME|FILE)\.", path):
                    continue
                expanded = [path]
                while any("{" in p for p in expanded):
                    p = next(p for p in expanded if "{" in p)
                    head, rest = p.split("{", 1)
                    options, tail = rest.split("}", 1)
                    expanded.remove(p)
                    expanded += [head + o + tail for o in options.split(",")]
                missing += [f"{page.name}: {p}" for p in expanded if not (REPO / p).exists()]
    assert not missing, missing


def test_every_stage_key_shown_is_a_key():
    """`--key` after `align sft|dpo|kto|nca` in a command line of the README or a page is a recipe key (or a
    TRL name we take): a renamed key cannot linger in the docs."""
    from align.train.config import TRL_NAMES, DataArguments, ModelArguments
    from align.stages import TRAINING_STAGES

    import dataclasses

    checked, wrong = 0, []
    for page in PAGES:
        for snippet in _code(page.read_text()):
            for stage, rest in re.findall(r"(?<![\w/.-])align (sft|dpo|kto|nca)((?: [^\n#]*)?)", snippet):
                spec = TRAINING_STAGES[stage]
                fields = {f.name for cls in (ModelArguments, DataArguments, spec.config_class())
                          for f in dataclasses.fields(cls)} | set(TRL_NAMES) | {"config", "accelerate_config", "help"}
                for key in re.findall(r"(?<!\S)--(\w+)", rest):
                    checked += 1
                    if key not in fields:
                        wrong.append(f"{page.name}: align {stage} --{key}")
    assert checked >= 10 and not wrong, wrong


def test_every_yaml_block_parses():
    blocks = [(page.name, b) for page in PAGES for b in re.findall(r"```yaml\n(.*?)```", page.read_text(), re.S)]
    assert blocks
    for name, block in blocks:
        assert isinstance(yaml.safe_load(block), dict), name


CHEAP = re.compile(r"^align (?:\S+ )*--(?:help|check)$")


def test_the_cheap_commands_shown_run(capsys, monkeypatch):
    """Every `align ... --help` and `align run PIPELINE --check` line of a bash block runs and succeeds
    (in this process: `--check` loads no model). The real models' hub ids are taken as there: offline, with
    an empty cache, --check says they are not (tests/test_model_check.py, test_pipeline.py)."""
    import align.train.model_check
    from align.cli import main

    monkeypatch.setattr(align.train.model_check, "_check_hub", lambda name, *a, **k: align.train.model_check.ModelInput(name, name))

    lines = sorted({line for _, line in _command_lines() if CHEAP.match(line)})
    assert "align run recipes/quickstart/pipeline.yaml --check" in lines and "align --help" in lines
    for line in lines:
        assert main(shlex.split(line)[1:]) == 0, line
    out = capsys.readouterr().out
    assert "usage: align sft" in out and "stages check out" in out


def test_readme_is_a_front_door():
    """At most about 150 lines, and every page it links to exists."""
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 160
    links = re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)", text)
    assert len(links) >= 10 and all((REPO / link).exists() for link in links), links
