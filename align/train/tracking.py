"""Metrics of the stages that are not training (trees, eval) to the trackers named in `report_to`, through
accelerate's trackers (the ones TRL's trainers use too): TensorBoard, Weights & Biases, Trackio, MLflow,
and the others accelerate knows. A tracker that is not installed is a one-line error before any model
loads (align/train/extras.py); a tracker that fails while logging is a warning, never lost work."""

from __future__ import annotations

import sys
from pathlib import Path

from align.core.errors import AlignError
from align.train.extras import check_report_to


def _known() -> dict:
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return LOGGER_TYPE_TO_CLASS


def check_trackers(report_to, source: str) -> list[str]:
    """`report_to` as a list of tracker names accelerate can log to, each installed; "none" is none."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    names = [n for n in names if n not in ("none", "", None)]
    if "all" in names:  # as in transformers: every tracker that is installed
        from align.train.extras import TRACKERS, importable

        names = [n for n in sorted(_known()) if n in TRACKERS and importable(*TRACKERS[n][0])]
    check_report_to(names, source)
    for name in names:
        if name not in _known():
            raise AlignError(f"{source}: key 'report_to': {name} can't log this stage's metrics "
                             f"(these can: {', '.join(sorted(_known()))})")
    return names


class Trackers:
    """Open trackers of one run; `log(metrics, step)` sends flat numeric metrics to every one."""

    def __init__(self, names: list[str], run_name: str, logging_dir: Path, config: dict | None = None):
        self.trackers = []
        for name in names:
            cls = _known()[name]
            tracker = None
            try:
                tracker = cls(run_name, logging_dir=str(logging_dir)) if name == "tensorboard" else cls(run_name)
                tracker.start()
                if config:
                    tracker.store_init_configuration(_flat(config, numbers_only=False))
                self.trackers.append(tracker)
            except Exception as err:  # a tracker's own failure (a server, a login) must not end the stage
                try:
                    if tracker is not None:
                        tracker.finish()
                except Exception:
                    pass
                print(f"[align] WARNING: report_to {name}: could not start ({type(err).__name__}: {err})",
                      file=sys.stderr, flush=True)

    def log(self, metrics: dict, step: int = 0) -> None:
        values = _flat(metrics)
        for tracker in self.trackers:
            try:
                tracker.log(values, step=step)
            except Exception as err:
                print(f"[align] WARNING: report_to {tracker.name}: {type(err).__name__}: {err}", file=sys.stderr,
                      flush=True)

    def close(self) -> None:
        for tracker in self.trackers:
            try:
                tracker.finish()
            except Exception:
                pass


def _flat(values: dict, prefix: str = "", numbers_only: bool = True) -> dict:
    """{"sft": {"pass@1": 0.7}} -> {"sft/pass@1": 0.7}; lists and, with numbers_only, strings left out."""
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}/", numbers_only))
        elif isinstance(value, bool):
            out[name] = int(value)
        elif isinstance(value, (int, float)):
            out[name] = value
        elif not numbers_only and isinstance(value, (str, type(None))):
            out[name] = "" if value is None else value
    return out
