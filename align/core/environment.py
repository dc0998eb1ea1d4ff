"""What align's own processes guarantee about their surroundings: only align writes to the terminal, and
no code is fetched from the Hub unless the user opts in.

The terminal, by a rule rather than a list of logger names: a log record of any logger outside `align`,
and every Python warning, goes to the *library log* instead of the terminal. That holds for records that
propagate to the root logger (accelerate, peft, torch, huggingface_hub, ...) and for libraries that put
their own handler on stderr (transformers, datasets, kernels): such a handler's records are diverted when
it writes to a terminal-like stream (anything but a file it opened itself or an in-memory buffer). The
library log is

- the stage's `log.txt` when `align run` runs the stage (the pipeline sets `ALIGN_LIBRARY_LOG=-`, meaning
  "stderr", which it has pointed at that file),
- the file `ALIGN_LIBRARY_LOG` names, when set,
- else `$ALIGN_HOME/logs/<command>.log` (appended; created only when a record arrives).

`ALIGN_LOG_LEVEL=DEBUG` shows the library records on the terminal too, and align's own debug lines.

Hub code: bitsandbytes' CPU backend calls `kernels.get_kernel("kernels-community/...")` on import, and
transformers can swap layers for Hub kernels. Both download code and run it in the process, where the
user's `HF_TOKEN` lives. Importing align disarms the `kernels` package's entry points (they raise, so the
callers fall back to their built-in code) and sets `USE_HUB_KERNELS=NO` for transformers, unless
`ALIGN_HUB_KERNELS=1` is set.
"""

from __future__ import annotations

import atexit
import importlib.abc
import io
import logging
import os
import sys
import time
from pathlib import Path

HUB_KERNELS_ENV = "ALIGN_HUB_KERNELS"
LIBRARY_LOG_ENV = "ALIGN_LIBRARY_LOG"
LOG_LEVEL_ENV = "ALIGN_LOG_LEVEL"

# the entry points of the `kernels` package that fetch, or load and run, code from the Hub
KERNEL_ENTRY_POINTS = ("get_kernel", "get_locked_kernel", "get_local_kernel", "has_kernel", "install_kernel",
                       "load_kernel", "kernelize")


# ------------------------------------------------------------------------------------------- Hub code
def hub_kernels_allowed(environ=None) -> bool:
    environ = os.environ if environ is None else environ
    return environ.get(HUB_KERNELS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class HubKernelsDisabled(RuntimeError):
    pass


def _refusing(name: str):
    def refuse(*args, **kwargs):
        what = args[0] if args and isinstance(args[0], str) else "a kernel"
        raise HubKernelsDisabled(f"kernels.{name}({what!r}) refused: align fetches and runs no code from the Hub "
                                 f"unless {HUB_KERNELS_ENV}=1 is set")

    refuse.__name__ = name
    refuse._align_refusing = True
    return refuse


def _disarm(module) -> None:
    for name in KERNEL_ENTRY_POINTS:
        if hasattr(module, name) and not getattr(getattr(module, name), "_align_refusing", False):
            setattr(module, name, _refusing(name))


class _DisarmingLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _disarm(module)


class _KernelsGuard(importlib.abc.MetaPathFinder):
    """Finds `kernels` through the other finders, and disarms it once it has run."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "kernels":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _DisarmingLoader(spec.loader)
                return spec
        return None


def guard_hub_kernels() -> None:
    """Idempotent; a no-op when the user opted in."""
    if hub_kernels_allowed():
        return
    os.environ.setdefault("USE_HUB_KERNELS", "NO")
    if "kernels" in sys.modules:
        _disarm(sys.modules["kernels"])
    if not any(isinstance(f, _KernelsGuard) for f in sys.meta_path):
        sys.meta_path.insert(0, _KernelsGuard())


# ------------------------------------------------------------------------------------------- terminal
class _StderrHandler(logging.StreamHandler):
    """align's own records: written to whatever sys.stderr is when a record comes (not the stream of the
    first call, which a caller that redirects stderr, such as a test's capture, may since have closed)."""

    _align_handler = True

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _is_align(name: str) -> bool:
    return name == "align" or name.startswith("align.")


def log_level() -> str:
    from align.core.errors import AlignError

    level = os.environ.get(LOG_LEVEL_ENV, "INFO").upper()
    if not isinstance(logging.getLevelName(level), int):
        raise AlignError(f"{LOG_LEVEL_ENV}: {level!r} is not a log level (DEBUG, INFO, WARNING, ERROR)")
    return level


class LibraryLog:
    """Where other libraries' records and Python's warnings go in an align process (see the module doc)."""

    def __init__(self):
        self.command = "align"
        self.verbose = False
        self._file = None
        self._path: Path | None = None
        self.records = 0

    def configure(self, command: str) -> None:
        self.command = command or "align"
        self.verbose = log_level() == "DEBUG"

    def destination(self) -> Path | str:
        value = os.environ.get(LIBRARY_LOG_ENV, "").strip()
        if value in ("-", "stderr"):
            return "stderr"
        if value:
            return Path(value).expanduser()
        from align.core.tiny_mixtral import default_home

        return default_home() / "logs" / f"{self.command}.log"

    def write(self, text: str) -> None:
        self.records += 1
        if self.verbose:
            sys.stderr.write(text + "\n")
        where = self.destination()
        if where == "stderr":
            if not self.verbose:
                sys.stderr.write(text + "\n")
            return
        try:
            if self._file is None or self._file.closed or self._path != where:
                where.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(where, "a", encoding="utf-8")
                atexit.register(self._file.close)  # closed before the interpreter tears its modules down
                self._path = where
                self._file.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: "
                                 f"align {' '.join(sys.argv[1:])[:300]}\n")
            self._file.write(text + "\n")
            self._file.flush()
        except OSError:  # a full disk or an unwritable home must not turn a library's warning into a crash
            pass


LIBRARY_LOG = LibraryLog()
_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def _divert(record: logging.LogRecord) -> None:
    if getattr(record, "_align_diverted", False):
        return  # one record through two handlers (its own and the root's) is written once
    record._align_diverted = True
    try:
        LIBRARY_LOG.write(_FORMAT.format(record))
    except Exception:
        pass


class _LibraryHandler(logging.Handler):
    """The root logger's handler: whatever propagates there from outside align."""

    _align_handler = True

    def emit(self, record):
        if not _is_align(record.name):
            _divert(record)


def _writes_to_terminal(handler: logging.StreamHandler) -> bool:
    if getattr(handler, "_align_handler", False) or isinstance(handler, logging.FileHandler):
        return False
    stream = getattr(handler, "stream", None)
    return stream is not None and not isinstance(stream, (io.StringIO, io.BytesIO))


_original_emit = logging.StreamHandler.emit


def _guarded_emit(self, record):
    if _ROUTING["on"] and not _is_align(record.name) and _writes_to_terminal(self):
        return _divert(record)
    return _original_emit(self, record)


_ROUTING = {"on": False}


def configure_logging(command: str = "align") -> None:
    """Our records as `[align] message` on stderr; everything else to the library log. Idempotent."""
    level = log_level()
    logger = logging.getLogger("align")
    if not any(getattr(h, "_align_handler", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[align] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    LIBRARY_LOG.configure(command)
    root = logging.getLogger()
    if not any(isinstance(h, _LibraryHandler) for h in root.handlers):
        root.addHandler(_LibraryHandler())
    if root.level > logging.WARNING or root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)
    if level == "DEBUG":
        root.setLevel(logging.DEBUG)
    logging.captureWarnings(True)  # warnings.warn -> the 'py.warnings' logger -> the library log
    _ROUTING["on"] = True
    logging.StreamHandler.emit = _guarded_emit
