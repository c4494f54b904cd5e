"""Accuracy, macro precision and macro recall with 95% confidence intervals, over the predictions of one test set.

Accuracy is one binomial proportion: Wilson interval. A macro average is not, so macro precision and recall
get a percentile bootstrap over images (``scipy.stats.bootstrap``, images resampled with their labels and
predictions together, a seeded generator: the same data and seed give the same interval).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from trustcnn.metrics.stats import Estimate, wilson_estimate

__all__ = ["ClassificationEstimates", "classification_estimates", "macro_precision_recall"]

# Resamples evaluated per vectorized call: bounds the (resamples, n) index array to ~2M entries.
_BOOTSTRAP_ELEMENTS = 2_000_000


def macro_precision_recall(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Macro precision and recall of ``(..., C, C)`` confusion matrices (rows = label, cols = prediction).

    torchmetrics' ``average="macro"`` convention: a class's score is 0 when its denominator is 0, and a
    class with no label and no prediction (tp + fp + fn = 0) is left out of the average.
    """
    tp = np.diagonal(confusion, axis1=-2, axis2=-1).astype(np.float64)
    predicted = confusion.sum(axis=-2)
    actual = confusion.sum(axis=-1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    present = (predicted + actual) > 0
    count = np.maximum(present.sum(axis=-1), 1)
    return (precision * present).sum(axis=-1) / count, (recall * present).sum(axis=-1) / count


def classification_estimates(
    preds: np.ndarray, labels: np.ndarray, num_classes: int, bootstrap: int = 1000, seed: int = 0
) -> dict[str, Estimate]:
    """``{"accuracy", "precision", "recall"}``: accuracy with its Wilson interval, macro precision / recall with
    percentile-bootstrap intervals (``bootstrap`` resamples of the images, generator seeded by ``seed``).
    Fewer than two images, or ``bootstrap=0``, give no bootstrap interval (NaN)."""
    preds, labels = np.asarray(preds, np.int64), np.asarray(labels, np.int64)
    n, c = labels.size, num_classes
    codes = labels * c + preds  # confusion-matrix cell of each image

    def precision_recall(index: np.ndarray, axis: int = -1) -> np.ndarray:  # axis: scipy's calling convention
        """Macro (precision, recall) of the images ``index``: ``(2,)`` for ``(n,)`` indices, ``(2, resamples)``
        for ``(resamples, n)``."""
        rows = np.atleast_2d(index)
        b = rows.shape[0]
        offsets = np.arange(b)[:, None] * c * c
        confusion = np.bincount((codes[rows] + offsets).ravel(), minlength=b * c * c).reshape(b, c, c)
        out = np.stack(macro_precision_recall(confusion))
        return out if index.ndim > 1 else out[:, 0]

    point = precision_recall(np.arange(n))
    low = high = np.full(2, math.nan)
    if bootstrap and n >= 2:
        result = stats.bootstrap((np.arange(n),), precision_recall, n_resamples=bootstrap, vectorized=True,
                                 batch=max(1, _BOOTSTRAP_ELEMENTS // n), method="percentile",
                                 rng=np.random.default_rng(seed))
        low, high = result.confidence_interval
    method = f"bootstrap({bootstrap})"
    return {
        "accuracy": wilson_estimate(int((preds == labels).sum()), n),
        "precision": Estimate(float(point[0]), float(low[0]), float(high[0]), n, method),
        "recall": Estimate(float(point[1]), float(low[1]), float(high[1]), n, method),
    }


class ClassificationEstimates(Metric):
    """Accuracy, macro precision and macro recall with 95% confidence intervals (see
    :func:`classification_estimates`), from every prediction of a test pass.

    The states are the predictions and labels themselves (concatenated over processes): the intervals
    need the images, not only a confusion matrix.

    Args:
        num_classes: classes of the data.
        bootstrap: resamples of the precision / recall intervals; seed: their generator's seed.

    ``update(preds (N,) class indices or (N, C) logits, labels (N,))``.
    ``compute() -> dict[str, Tensor]``: ``accuracy``, ``precision``, ``recall`` and each one's ``_ci_low`` /
    ``_ci_high``; :meth:`estimates` gives the same as :class:`~trustcnn.metrics.stats.Estimate` objects.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    preds: list[Tensor]
    labels: list[Tensor]

    def __init__(self, num_classes: int, bootstrap: int = 1000, seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes, self.bootstrap, self.seed = int(num_classes), int(bootstrap), int(seed)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, labels: Tensor) -> None:
        if preds.ndim == 2:
            preds = preds.argmax(dim=1)
        if preds.shape != labels.shape or preds.ndim != 1:
            raise ValueError(f"preds {tuple(preds.shape)} and labels {tuple(labels.shape)} must both be (N,)")
        self.preds.append(preds.detach().long())
        self.labels.append(labels.detach().long().to(preds.device))

    def _estimates(self) -> dict[str, Estimate]:
        preds = dim_zero_cat(self.preds).cpu().numpy() if self.preds else np.zeros(0, np.int64)
        labels = dim_zero_cat(self.labels).cpu().numpy() if self.labels else np.zeros(0, np.int64)
        return classification_estimates(preds, labels, self.num_classes, self.bootstrap, self.seed)

    def estimates(self) -> dict[str, Estimate]:
        """The three estimates over every process's predictions."""
        with self.sync_context():
            return self._estimates()

    def compute(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, est in self._estimates().items():
            out[name] = torch.tensor(est.value)
            out[f"{name}_ci_low"] = torch.tensor(est.ci_low)
            out[f"{name}_ci_high"] = torch.tensor(est.ci_high)
        return out
