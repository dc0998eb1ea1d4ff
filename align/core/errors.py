"""One-line user errors: bad input ends the run with a single readable line and exit code 2."""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import warnings


class AlignError(Exception):
    """An error in what the user gave us (a recipe, a dataset, a path). Printed as one line, exit 2."""

    exit_code = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are AlignErrors: one line, exit 2, like every other bad input."""

    def error(self, message):
        raise AlignError(f"{self.prog}: {message}")


def exit_on_user_error(fn):
    """Turn an AlignError raised anywhere under `fn` into `align: error: ...` on stderr and exit 2.

    In one of several processes of a launch (torchrun / `accelerate launch` set RANK and WORLD_SIZE) every
    process meets the same recipe and raises the same error: the main process prints it and hands it to the
    launcher (TORCHELASTIC_ERROR_FILE, which torch's failure report shows as the root cause); the others
    stay quiet and wait, so that the launcher, seeing the main process fail, stops them, and the main
    process is not stopped before it has printed. One that is still running after OTHER_RANK_WAIT_S met
    an error of its own: it prints it, naming its rank."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AlignError as err:
            from align.core.redact import mask_text

            message = mask_text(" ".join(str(err).split("\n")))  # a credential a bad value quotes stays out of logs
            rank = launch_rank()
            if rank:
                import time

                try:
                    time.sleep(OTHER_RANK_WAIT_S)
                except BaseException as stop:  # the launcher stopped this process (align's signal handler raises
                    # its Interrupted): the main process has said it, so this one leaves without a word
                    code = getattr(stop, "code", None)
                    raise SystemExit(code if isinstance(code, int) else err.exit_code) from None
                message = f"[process {rank}] {message}"
            print(f"align: error: {message}", file=sys.stderr, flush=True)
            if rank == 0:
                _hand_to_launcher(f"align: error: {message}")
            raise SystemExit(err.exit_code) from None

    return wrapper


OTHER_RANK_WAIT_S = 20.0


def launch_rank() -> int | None:
    """This process's rank in a launch of several processes, None when it runs alone."""
    import os

    try:
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    except ValueError:
        return None
    return rank if world > 1 else None


def _hand_to_launcher(line: str) -> None:
    """torch's elastic launcher reads a failed process's error from TORCHELASTIC_ERROR_FILE (what its
    `@record` writes) and shows it in its report, where the report would otherwise say 'To enable
    traceback see ...'."""
    import json
    import os
    import time

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"message": line, "timestamp": int(time.time())}, f)
    except OSError:
        pass


@contextlib.contextmanager
def warnings_unless_user_error():
    """Hold back the warnings raised inside (libraries warn while parsing configs, e.g. about their own
    deprecated defaults): re-issued as usual when the block succeeds; when it ends in an AlignError, whose
    one line must stay the only line, they go to the library log only (align/core/environment.py)."""
    import logging

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    except AlignError:
        for w in caught:  # (under the CLI, the library log takes every record of a logger outside align)
            logging.getLogger("py.warnings").warning(
                warnings.formatwarning(w.message, w.category, w.filename, w.lineno).rstrip())
        raise
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def read_user_text(path, what: str = "file") -> str:
    """A file the user named, as text: missing, unreadable or not UTF-8 is one line naming it."""
    from pathlib import Path

    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AlignError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise AlignError(f"{path}: is a folder, not a {what}") from None
    except UnicodeDecodeError as err:
        raise AlignError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    except OSError as err:
        raise AlignError(f"{path}: cannot be read ({err.strerror})") from None
