"""Which checkpoint a run tests, and how a metric's direction is decided.

One rule for the checkpoint callback, the tested checkpoint, the value ``train`` returns to sweepers and
the report's ranking of jobs, so none of them can disagree:

* a metric whose last path segment names a loss or an error (``val/loss``, ``val/ce``, ``val/pwce``,
  ``val/error``) is minimized; every other metric (accuracy, pointing games, ...) is maximized, unless
  the mode is given explicitly;
* a run tests ``test_checkpoint: last`` (the end of the last epoch, the paper's protocol) or ``best``
  (the epoch with the best validation ``optimized_metric``), and records which one in ``run.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

Mode = Literal["max", "min"]
TEST_CHECKPOINT_RULES: tuple[str, ...] = ("last", "best")

#: Last path segments of metrics that are minimized (losses and the loss terms the module logs).
MINIMIZED_NAMES: frozenset[str] = frozenset({"loss", "ce", "c", "reg", "r1", "r2", "pwce", "error", "err"})

#: Per-run record of the tested checkpoint (metrics.json stays a flat name -> number map).
RUN_RECORD = "run.json"


def metric_mode(metric: str, mode: str | None = None) -> Mode:
    """``"max"`` or ``"min"`` for ``metric``: ``mode`` when given, else inferred from the metric's name."""
    if mode is not None:
        if mode not in ("max", "min"):
            raise ValueError(f"A metric's mode must be 'max' or 'min', got {mode!r}.")
        return mode  # type: ignore[return-value]
    last = metric.rsplit("/", 1)[-1].lower()
    if last in MINIMIZED_NAMES or last.endswith("_loss") or last.endswith("loss"):
        return "min"
    return "max"


def check_test_checkpoint(rule: str) -> str:
    """Validate the ``test_checkpoint`` setting (before any training)."""
    if rule not in TEST_CHECKPOINT_RULES:
        raise ValueError(f"test_checkpoint must be 'last' (the end of the last epoch) or 'best' (the best "
                         f"validation optimized_metric), got {rule!r}; set e.g. test_checkpoint=last.")
    return rule


def read_run_record(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's ``run.json`` (tested checkpoint, its epoch and step, the optimized metric), if written."""
    path = Path(run_dir) / RUN_RECORD
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
