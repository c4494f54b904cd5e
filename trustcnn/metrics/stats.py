"""Confidence intervals shared by the case table, `trustcnn.evaluate` and `trustcnn.report`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import Tensor


def wilson_interval(
    successes: int | float | Tensor, total: int | float | Tensor, z: float = 1.96
) -> tuple[float, float] | tuple[Tensor, Tensor]:
    """Wilson score interval for a binomial proportion ``successes / total``.

    ``center = (p + z²/2n) / (1 + z²/n)``, ``half = z·sqrt(p(1−p)/n + z²/4n²) / (1 + z²/n)``;
    the interval is ``[center − half, center + half]`` clipped to ``[0, 1]``. ``z = 1.96`` gives a 95% CI.
    Unlike the normal (Wald) interval it stays inside ``[0, 1]`` and is sensible for ``p`` near 0 or 1
    and small ``n`` (e.g. 8/10 → [0.490, 0.943]).

    Args:
        successes: number of successes ``k`` (scalar or tensor, elementwise).
        total: number of trials ``n`` (same shape as ``successes`` or broadcastable).
        z: standard-normal quantile of the two-sided level.

    Returns:
        ``(low, high)`` as Python floats for scalar inputs, or as float tensors if either input is a
        tensor. ``total == 0`` gives ``(nan, nan)`` (undefined).
    """
    if isinstance(successes, Tensor) or isinstance(total, Tensor):
        k = torch.as_tensor(successes, dtype=torch.float64)
        n = torch.as_tensor(total, dtype=torch.float64, device=k.device)
        if (k < 0).any() or (k > n).any():
            raise ValueError("wilson_interval needs 0 <= successes <= total")
        n_safe = n.clamp_min(1)
        p = k / n_safe
        z2 = z * z
        denom = 1 + z2 / n_safe
        center = (p + z2 / (2 * n_safe)) / denom
        half = z * torch.sqrt(p * (1 - p) / n_safe + z2 / (4 * n_safe * n_safe)) / denom
        nan = torch.full_like(center, float("nan"))
        low = torch.where(n > 0, (center - half).clamp(0, 1), nan)
        high = torch.where(n > 0, (center + half).clamp(0, 1), nan)
        return low, high
    k, n = float(successes), float(total)
    if k < 0 or k > n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= total, got {successes}/{total}")
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


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
    """Mean of per-image scores (NaNs dropped) with the t-interval ``mean ± t·sd/√n``."""
    v = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    v = v[np.isfinite(v)]
    n = v.size
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, "t")
    mean = float(v.mean())
    if n < 2:
        return Estimate(mean, math.nan, math.nan, 1, "t")
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return Estimate(mean, mean - half, mean + half, n, "t")
