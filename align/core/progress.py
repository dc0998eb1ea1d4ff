"""Progress of a running stage: a bar on the terminal, and a small file `align run` shows live.

A stage process reports with `Progress(what, total, unit)` and `advance()` / `set(done)` / `note(text)`. On a terminal it draws
a tqdm bar (on stderr); when `align run` started it, the environment names a progress file
(`ALIGN_PROGRESS_FILE`) that it rewrites, at most a few times a second and atomically, with done / total,
the rate and a note (the last loss, pairs so far). `align run` reads that file and shows one live line:
rewritten in place on a terminal, a line every 30 s in a log, while the stage's whole output goes to its
`log.txt`.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

PROGRESS_ENV = "ALIGN_PROGRESS_FILE"
_MIN_INTERVAL_S = 0.5


class Progress:
    """done / total of one piece of work (trees, steps, problems, rows)."""

    def __init__(self, what: str, total: int | None, unit: str, bar: bool | None = None):
        from tqdm import tqdm

        self.what, self.total, self.unit = what, total, unit
        self.done, self.note_text = 0, ""
        self.start = time.monotonic()
        self._written = 0.0
        self._later: threading.Timer | None = None  # a write put off to the end of the interval
        self._lock = threading.Lock()
        self.file = os.environ.get(PROGRESS_ENV) or None
        # bar: None = on a terminal only (tqdm's own rule); under `align run` the live line shows it instead
        self.bar = tqdm(total=total, desc=what, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False,
                        disable=(bar is False or (bar is None and self.file is not None)) or None)

    def advance(self, n: int = 1, note: str | None = None) -> None:
        """n more done, and optionally a new note."""
        self.set(self.done + n, note)

    def note(self, text: str) -> None:
        """A new note (what it is doing now, the last loss), nothing more done."""
        self.set(self.done, text)

    def set(self, done: int, note: str | None = None, total: int | None = None) -> None:
        """How much is done, a short note, and the total when it becomes known."""
        if total is not None and total != self.total:
            self.total = self.bar.total = total
        step, self.done = done - self.done, done
        if note is not None:
            self.note_text = note
            self.bar.set_postfix_str(note, refresh=False)
        self.bar.update(step)
        if not self.file:
            return
        wait = _MIN_INTERVAL_S - (time.monotonic() - self._written)
        if wait <= 0 or (self.total and self.done >= self.total):
            self._write()
        elif self._later is None:
            # Written a moment ago: this state goes out when the interval is over, so that the last of a burst
            # (a batch of trees that end together) shows, not the first of it until the next burst.
            self._later = threading.Timer(wait, self._write)
            self._later.daemon = True
            self._later.start()

    def _write(self) -> None:
        with self._lock:
            if self._later is not None and self._later is not threading.current_thread():
                self._later.cancel()
            self._later = None
            self._written = time.monotonic()
            state = {"what": self.what, "unit": self.unit, "done": self.done, "total": self.total,
                     "note": self.note_text, "elapsed_s": round(self._written - self.start, 2), "pid": os.getpid()}
            self._save(state)

    def _save(self, state: dict) -> None:
        tmp = f"{self.file}.{os.getpid()}.tmp"
        try:
            Path(tmp).write_text(json.dumps(state))
            os.replace(tmp, self.file)
        except OSError:  # progress is never worth failing a stage for (a full disk, a removed folder)
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def close(self) -> None:
        if self.file:
            self._write()
        self.bar.close()


def describe(state: dict) -> str:
    """One line: `trees 1200/3000 40% 12.3 tree/s ETA 2m26s pairs=800`."""
    done, total, elapsed = state.get("done", 0), state.get("total"), state.get("elapsed_s", 0) or 0
    rate = done / elapsed if elapsed > 0 else 0.0
    parts = [f"{state.get('what', '')} {done}/{total}" if total else f"{state.get('what', '')} {done}"]
    if total:
        parts.append(f"{done / total:.0%}")
    if rate > 0:
        parts.append(f"{rate:.3g} {state.get('unit', '')}/s")
        if total and done < total:
            parts.append(f"ETA {_duration((total - done) / rate)}")
    if state.get("note"):
        parts.append(str(state["note"]))
    return " ".join(parts)


def read_progress(path: str | Path) -> str | None:
    """The line for a progress file, or None when there is none (yet) or it can't be read."""
    try:
        state = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return describe(state) if isinstance(state, dict) else None


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"
