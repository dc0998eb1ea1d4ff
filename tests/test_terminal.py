"""Only align writes to the terminal, whatever the installed libraries log; and no code comes from the Hub
unless the user opts in (align/core/environment.py). Every test runs the real entry point in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from conftest import REPO

# Loaded by every Python process started with this folder on PYTHONPATH, before align: a third-party
# library that logs through its own stderr handler, one that logs through the root logger and one that
# warns, all while transformers is being imported (as kernels and bitsandbytes do today, and as the next
# library release may do with any other name).
NOISY_SITECUSTOMIZE = '''
import importlib.abc, logging, sys, warnings

noisy = logging.getLogger("some_new_library.backends")
noisy.addHandler(logging.StreamHandler(sys.stderr))  # its own handler, made before align is imported
noisy.propagate = False

class _Noise(importlib.abc.MetaPathFinder):
    done = False
    def find_spec(self, name, path=None, target=None):
        if name == "transformers" and not self.done:
            self.done = True
            noisy.warning("Skipping publisher trust check for 'some/kernel' because the Hub is offline.")
            logging.getLogger("another_library").warning("a record through the root logger")
            warnings.warn("a library's FutureWarning", FutureWarning)
        return None

sys.meta_path.insert(0, _Noise())
'''

# Records every call of the real kernels.get_kernel (patched where it is defined, so any import of it sees
# the recorder) and makes bitsandbytes take its Hub-kernel path on any CPU (it does so only where the CPU
# has AVX512-BF16).
KERNEL_SPY_SITECUSTOMIZE = '''
import importlib.abc, os, sys

class _Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name not in ("kernels._internals.load", "bitsandbytes.functional"):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        real_exec = spec.loader.exec_module
        def exec_module(module):
            real_exec(module)
            if name == "bitsandbytes.functional":
                module.has_avx512bf16 = lambda: True
            else:
                def get_kernel(repo_id, *args, **kwargs):
                    with open(os.environ["KERNEL_CALLS"], "a") as f:
                        f.write(repo_id + "\\n")
                    raise RuntimeError("no network in this test")
                module.get_kernel = get_kernel
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _Spy())
'''


def _env(tmp_path, sitecustomize: str, **extra):
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(textwrap.dedent(sitecustomize))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "ALIGN_"))}
    env.update(ALIGN_HOME=str(tmp_path / "home"), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(site), str(REPO)]), **extra)
    return env


def _bad_recipe(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text((REPO / "recipes" / "tiny-mixtral" / "sft.yaml").read_text() + "\nlearning_rat: 0.1\n")
    return path


def _align(env, *argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "align", *map(str, argv)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=timeout)


def test_a_bad_recipe_is_one_line_whatever_the_libraries_log(tmp_path):
    env = _env(tmp_path, NOISY_SITECUSTOMIZE)
    proc = _align(env, "sft", "--config", _bad_recipe(tmp_path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("align: error: ") and "learning_rat" in lines[0], proc.stderr
    # nothing was lost: the records are in the library log
    log = (tmp_path / "home" / "logs" / "sft.log").read_text()
    assert "Skipping publisher trust check" in log and "a record through the root logger" in log
    assert "a library's FutureWarning" in log


def test_the_noise_reaches_the_terminal_without_align(tmp_path):
    """The control: the same sitecustomize, a process that imports transformers without align's CLI, and the
    three records are on stderr. So the test above would fail if align let them through."""
    env = _env(tmp_path, NOISY_SITECUSTOMIZE)
    proc = subprocess.run([sys.executable, "-W", "always", "-c", "import transformers"], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)
    assert "Skipping publisher trust check" in proc.stderr and "through the root logger" in proc.stderr
    assert "FutureWarning" in proc.stderr


def test_help_is_clean_and_debug_shows_the_library_records(tmp_path):
    env = _env(tmp_path, NOISY_SITECUSTOMIZE)
    proc = _align(env, "sft", "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: align sft") and proc.stderr == ""
    proc = _align({**env, "ALIGN_LOG_LEVEL": "DEBUG"}, "sft", "--config", _bad_recipe(tmp_path))
    assert proc.returncode == 2 and "Skipping publisher trust check" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("align: error: ")


def test_a_pipeline_stage_sends_library_records_to_its_log(tmp_path):
    """Under `align run` a stage's stderr is its log.txt: ALIGN_LIBRARY_LOG=- writes the records there."""
    env = _env(tmp_path, NOISY_SITECUSTOMIZE, ALIGN_LIBRARY_LOG="-")
    proc = _align(env, "sft", "--config", _bad_recipe(tmp_path))
    assert proc.returncode == 2 and "Skipping publisher trust check" in proc.stderr
    assert not (tmp_path / "home" / "logs").exists()


def _kernel_calls(tmp_path, code: str | None = None, argv=(), **extra):
    calls = tmp_path / "kernel-calls.txt"
    calls.unlink(missing_ok=True)
    env = _env(tmp_path, KERNEL_SPY_SITECUSTOMIZE, KERNEL_CALLS=str(calls), **extra)
    env.pop("HF_HUB_OFFLINE")  # as on a user's machine with the Hub reachable
    if code is not None:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                              timeout=300)
    else:
        proc = _align(env, *argv)
    return proc, (calls.read_text().split() if calls.exists() else [])


def test_importing_align_fetches_no_kernel(tmp_path):
    proc, calls = _kernel_calls(tmp_path, "import align, bitsandbytes, transformers, peft, trl; print('ok')")
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
    assert calls == []
    proc, calls = _kernel_calls(tmp_path, argv=["--help"])
    assert proc.returncode == 0 and calls == []
    proc, calls = _kernel_calls(tmp_path, argv=["sft", "--config", _bad_recipe(tmp_path)])
    assert proc.returncode == 2 and calls == [] and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_the_kernel_spy_sees_bitsandbytes_fetch_without_the_guard(tmp_path):
    """The control: with the opt-in, bitsandbytes asks the Hub for its CPU kernel on import, and the spy sees
    it. So the test above would fail if the guard were gone."""
    proc, calls = _kernel_calls(tmp_path, "import align, bitsandbytes; print('ok')", ALIGN_HUB_KERNELS="1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert calls == ["kernels-community/quantization-bitsandbytes"]


def test_the_guard_refuses_with_a_reason_and_sets_transformers_off():
    code = ("import align, os, kernels\n"
            "try:\n    kernels.get_kernel('kernels-community/x', version=1)\n"
            "except Exception as e:\n    print(json.dumps([type(e).__name__, str(e), os.environ['USE_HUB_KERNELS']]))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("ALIGN_HUB_KERNELS", "USE_HUB_KERNELS")}
    proc = subprocess.run([sys.executable, "-c", "import json\n" + code], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    name, message, flag = json.loads(proc.stdout.strip().splitlines()[-1])
    assert name == "HubKernelsDisabled" and "ALIGN_HUB_KERNELS=1" in message and flag == "NO"
