"""The paper's Table 3 (prediction correctness × map accuracy), automated with object masks."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torchmetrics import Metric

from trustcnn.metrics.localization import energy_pointing_game
from trustcnn.metrics.stats import wilson_interval

__all__ = ["CaseTable", "CASE_NAMES", "case_counts", "case_fractions", "format_case_table"]

#: case number -> description, as in Table 3 of Halliwell & Lecue.
CASE_NAMES: dict[int, str] = {
    1: "correct prediction, accurate map",
    2: "wrong prediction, accurate map",
    3: "correct prediction, inaccurate map",
    4: "wrong prediction, inaccurate map",
}


class CaseTable(Metric):
    """Counts of the four cases of the paper's Table 3, each fraction with a Wilson confidence interval.

    A map is **accurate** when ``score_fn(maps, masks) >= accurate_threshold``; the default score is the
    energy pointing game (share of the map's mass inside the object mask, :func:`energy_pointing_game`),
    so the default reads "at least half of the saliency mass lies on the object". Any per-sample
    ``(maps, masks) -> (N,)`` score with the same NaN-for-empty-mask convention can be plugged in
    (e.g. ``functools.partial(pointing_game, tolerance=15)`` with threshold 0.5).

    Samples whose mask is empty (score NaN) are skipped and counted in ``skipped``; fractions are over
    the scored samples.

    Args:
        accurate_threshold: minimum score for an accurate map.
        score_fn: per-sample map-accuracy score, default :func:`energy_pointing_game`.
        z: normal quantile for the confidence intervals (1.96 → 95%).

    ``update(preds, labels, maps, masks)``:
        preds ``(N,)`` predicted class indices (or ``(N, C)`` logits/probabilities, arg-maxed),
        labels ``(N,)``, maps ``(N, h, w)``/``(N, 1, h, w)``, masks ``(N, H, W)``/``(N, 1, H, W)``.

    ``compute() -> dict[str, Tensor]`` with, for ``c`` in 1..4: ``case{c}_count``, ``case{c}_fraction``,
    ``case{c}_ci_low``, ``case{c}_ci_high``; plus ``total`` (scored) and ``skipped``. Flat scalar tensors,
    so the dict can go straight to ``LightningModule.log_dict``.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    counts: Tensor
    skipped: Tensor

    def __init__(
        self,
        accurate_threshold: float = 0.5,
        score_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        z: float = 1.96,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.accurate_threshold = float(accurate_threshold)
        self.score_fn = score_fn if score_fn is not None else energy_pointing_game
        self.z = float(z)
        # counts[c-1] = number of samples in case c
        self.add_state("counts", default=torch.zeros(4, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("skipped", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: Tensor, labels: Tensor, maps: Tensor, masks: Tensor) -> None:
        if preds.ndim == 2:
            preds = preds.argmax(dim=1)
        if preds.ndim != 1 or labels.ndim != 1 or preds.shape != labels.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and labels {tuple(labels.shape)} must both be (N,)")
        scores = self.score_fn(maps, masks)
        if scores.shape != preds.shape:
            raise ValueError(f"score_fn returned shape {tuple(scores.shape)}, expected {tuple(preds.shape)}")
        valid = ~torch.isnan(scores)
        correct = (preds == labels.to(preds.device)).to(scores.device)[valid]
        accurate = (scores[valid] >= self.accurate_threshold)
        self.counts += case_counts(correct, accurate).to(self.counts)
        self.skipped += (~valid).sum().to(self.skipped)

    def compute(self) -> dict[str, Tensor]:
        return case_fractions(self.counts, self.skipped, z=self.z)


def case_counts(correct: Tensor, accurate: Tensor) -> Tensor:
    """``(4,)`` counts of cases 1..4 (:data:`CASE_NAMES`) from per-sample ``(N,)`` booleans: was the
    prediction correct, was the map accurate (however a caller judges that: a mask score, or people's votes)."""
    # case index 0..3: (correct, accurate) -> 0, (wrong, accurate) -> 1, (correct, inacc) -> 2, (wrong, inacc) -> 3
    case = (~correct.bool()).long() + 2 * (~accurate.bool()).long()
    return torch.bincount(case, minlength=4)


def case_fractions(counts: Tensor, skipped: Tensor | int = 0, z: float = 1.96) -> dict[str, Tensor]:
    """:meth:`CaseTable.compute`'s dict from ``(4,)`` case counts: each case's count, fraction of the
    scored samples and Wilson interval; ``total`` (scored) and ``skipped`` (not scored)."""
    counts = torch.as_tensor(counts)
    total = counts.sum()
    low, high = wilson_interval(counts, total.expand(4), z=z)
    frac = counts.double() / total.clamp_min(1)
    if total == 0:
        frac = torch.full_like(frac, float("nan"))
    out: dict[str, Tensor] = {}
    for c in range(4):
        out[f"case{c + 1}_count"] = counts[c]
        out[f"case{c + 1}_fraction"] = frac[c].float()
        out[f"case{c + 1}_ci_low"] = low[c].float()
        out[f"case{c + 1}_ci_high"] = high[c].float()
    out["total"] = total
    out["skipped"] = torch.as_tensor(skipped).clone()
    return out


def format_case_table(result: dict[str, Tensor]) -> str:
    """Render :meth:`CaseTable.compute`'s dict as a small plain-text table (one row per case)."""
    lines = [f"{'case':<5}{'description':<38}{'count':>7}{'fraction':>10}  95% CI"]
    for c in range(1, 5):
        lines.append(
            f"{c:<5}{CASE_NAMES[c]:<38}{int(result[f'case{c}_count']):>7}"
            f"{float(result[f'case{c}_fraction']):>10.3f}  "
            f"[{float(result[f'case{c}_ci_low']):.3f}, {float(result[f'case{c}_ci_high']):.3f}]"
        )
    lines.append(f"scored {int(result['total'])}, skipped (empty mask) {int(result['skipped'])}")
    return "\n".join(lines)
