"""moe-align: preference trees and SFT / DPO / KTO / NCA with LoRA on Mixture-of-Experts models."""

__version__ = "0.1.0"

import sys as _sys
from importlib.machinery import ModuleSpec as _ModuleSpec

from align.core.environment import guard_hub_kernels as _guard_hub_kernels

_guard_hub_kernels()  # no code from the Hub in a process that imports align, unless ALIGN_HUB_KERNELS=1

# The top-level modules of 0.1 moved into packages by the stage they serve (docs/contributors.md). Until the
# next release each old path still imports, with a DeprecationWarning naming the new one: `import align.config`
# and `from align.config import X` give the module align.train.config itself (one module, not a copy, so
# monkeypatching either name patches both), and `python -m align.launch` runs align.train.launch.
MOVED = {
    **{name: f"align.core.{name}" for name in (
        "environment", "errors", "hub", "leaks", "lifecycle", "progress", "redact", "tiny_mixtral")},
    **{name: f"align.train.{name}" for name in (
        "chat", "checkpoints", "config", "cpu_fsdp", "data", "extras", "launch", "model_check", "models",
        "preflight", "tracking", "training")},
    **{name: f"align.evaluation.{name}" for name in ("backends", "evaluate", "plots")},
    "publish": "align.publishing.publish",
    **{name: f"align.runner.{name}" for name in ("pipeline", "quickstart")},
}


class _MovedModules:
    """A meta-path finder and loader for the old paths (align.config -> align.train.config, ...). It stands
    first on sys.meta_path: it answers only for the names in MOVED, which no file of align holds any more, and
    must answer before an editable install's finder looks for them in another checkout. It reads nothing but
    its own attributes when asked for another name (at interpreter exit this module's globals may be gone)."""

    moved = {f"align.{old}": new for old, new in MOVED.items()}
    spec = _ModuleSpec

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        new = cls.moved.get(fullname)
        if new is None:
            return None
        import importlib.util

        return cls.spec(fullname, cls, origin=importlib.util.find_spec(new).origin)

    @classmethod
    def create_module(cls, spec):
        import importlib
        import warnings

        new = cls.moved[spec.name]
        warnings.warn(f"{spec.name} is deprecated and will be removed in the next release: import {new}",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    @staticmethod
    def exec_module(module):
        pass  # the module it returned is already the new one, executed

    @classmethod
    def get_code(cls, fullname):  # `python -m align.launch`: runpy runs the new module's code as __main__
        import importlib.util
        import warnings

        new = cls.moved[fullname]
        # runpy's frames call this, so it is said as a warning of __main__'s, which Python shows by default
        warnings.warn_explicit(f"python -m {fullname} is deprecated and will be removed in the next release: "
                               f"python -m {new}", DeprecationWarning, f"python -m {fullname}", 0, "__main__")
        return importlib.util.find_spec(new).loader.get_code(new)


if not any(finder is _MovedModules for finder in _sys.meta_path):
    _sys.meta_path.insert(0, _MovedModules)
