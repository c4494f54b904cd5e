"""The two confidence intervals the project reports, on plain numbers, through scipy.stats (no torch: the report
imports this without loading any model code). :mod:`trustcnn.metrics.stats` wraps them for tensors and
:class:`~trustcnn.metrics.stats.Estimate`; :mod:`trustcnn.report.stats` uses them as they are."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def wilson(successes: float, total: float, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of ``successes / total`` (``binomtest(...).proportion_ci``); ``(nan, nan)`` for
    ``total == 0``. binomtest takes whole counts: a non-whole ``successes`` (a rate times n) is rounded.

    Raises:
        ValueError: ``successes`` (rounded) is not in ``[0, total]``.
    """
    if total == 0:
        return math.nan, math.nan
    k = round(successes)
    if not 0 <= k <= total:
        raise ValueError(f"wilson_interval needs 0 <= successes <= total, got {successes}/{total}")
    ci = stats.binomtest(int(k), int(round(total))).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def t_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: ``mean ± t((1+level)/2, n−1)·sd/√n`` (``stats.t.interval``); NaN bounds below two
    values, the point itself when every value is equal."""
    mean = float(values.mean()) if values.size else math.nan
    if values.size < 2:
        return mean, math.nan, math.nan
    sem = float(stats.sem(values))
    if sem == 0:
        return mean, mean, mean
    low, high = stats.t.interval(level, values.size - 1, loc=mean, scale=sem)
    return mean, float(low), float(high)
