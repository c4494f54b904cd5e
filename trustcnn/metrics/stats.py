"""Confidence intervals of the case table, the metrics' ``estimate()``, ``trustcnn.evaluate`` and the report,
all computed by scipy.stats: Wilson (``binomtest(...).proportion_ci``), Student's t (``stats.t.interval``) and
the percentile bootstrap (``stats.bootstrap``, in :mod:`trustcnn.metrics.classification`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from trustcnn.intervals import t_interval, wilson


def _wilson(successes: float, total: float, z: float) -> tuple[float, float]:
    # The level whose two-sided normal quantile is z (z = 1.96 -> 0.950004...), so z keeps its meaning.
    return wilson(successes, total, level=1.0 - 2.0 * float(stats.norm.sf(z)))


def wilson_interval(
    successes: int | float | Tensor, total: int | float | Tensor, z: float = 1.96
) -> tuple[float, float] | tuple[Tensor, Tensor]:
    """Wilson score interval for a binomial proportion ``successes / total`` (scipy's ``binomtest``).

    Unlike the normal (Wald) interval it stays inside ``[0, 1]`` and is sensible for ``p`` near 0 or 1
    and small ``n`` (e.g. 8/10 → [0.490, 0.943]). ``z = 1.96`` gives a 95% CI.

    Args:
        successes: number of successes ``k`` (scalar or tensor, elementwise); a non-whole number is rounded
            to the nearest count.
        total: number of trials ``n`` (same shape as ``successes`` or broadcastable).
        z: standard-normal quantile of the two-sided level.

    Returns:
        ``(low, high)`` as Python floats for scalar inputs, or as float64 tensors (on ``successes``' device)
        if either input is a tensor. ``total == 0`` gives ``(nan, nan)`` (undefined).
    """
    if isinstance(successes, Tensor) or isinstance(total, Tensor):
        k = torch.as_tensor(successes, dtype=torch.float64)
        k, n = torch.broadcast_tensors(k, torch.as_tensor(total, dtype=torch.float64, device=k.device))
        bounds = [_wilson(a, b, z) for a, b in zip(k.flatten().tolist(), n.flatten().tolist())]
        out = torch.tensor(bounds, dtype=torch.float64).reshape(*k.shape, 2).to(k.device)
        return out[..., 0], out[..., 1]
    return _wilson(float(successes), float(total), z)


@dataclass
class Estimate:
    """A point estimate with its 95% confidence interval; ``method`` names how the interval was made."""

    value: float
    ci_low: float
    ci_high: float
    n: int
    method: str

    def format(self, digits: int = 3) -> str:
        if not math.isfinite(self.value):
            return "n/a"
        if not (math.isfinite(self.ci_low) and math.isfinite(self.ci_high)):
            return f"{self.value:.{digits}f}"
        return f"{self.value:.{digits}f} [{self.ci_low:.{digits}f}, {self.ci_high:.{digits}f}]"


def wilson_estimate(successes: int, total: int, z: float = 1.96) -> Estimate:
    """Proportion ``successes / total`` with its Wilson interval."""
    low, high = wilson_interval(successes, total, z=z)
    value = successes / total if total else math.nan
    return Estimate(value, low, high, int(total), "wilson")


def mean_estimate(values: np.ndarray | torch.Tensor, level: float = 0.95) -> Estimate:
    """Mean of per-image scores (NaNs dropped) with the t-interval ``mean ± t·sd/√n`` (``stats.t.interval``)."""
    v = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    v = v[np.isfinite(v)]
    n = v.size
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, "t")
    return Estimate(*t_interval(v, level), n, "t")  # all scores equal (SSIM of a map with itself): the point
