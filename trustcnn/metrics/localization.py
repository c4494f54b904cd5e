"""Mask-based saliency localization metrics: pointing game, energy pointing game, IoU of the thresholded map.

Conventions (see :mod:`trustcnn.metrics._utils`): maps ``(N, h, w)``/``(N, 1, h, w)`` are bilinearly
upsampled to the masks' resolution ``(H, W)``; masks are binarized at 0.5 (object = 1). A sample whose
mask has no object pixel cannot be scored: functionals return ``NaN`` for it and the metrics skip it and
count it in the ``skipped`` state (it does not enter the denominator).

Each functional returns per-sample scores ``(N,)``; each :class:`~torchmetrics.Metric` accumulates sums
and counts (``dist_reduce_fx="sum"``) so results over several batches and processes equal the result on
the concatenated data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MetricCollection

from trustcnn.metrics._utils import PerSampleMean, align_maps_to_masks, minmax_normalize
from trustcnn.metrics.stats import Estimate, wilson_estimate, wilson_interval

__all__ = [
    "pointing_game",
    "energy_pointing_game",
    "saliency_iou",
    "PointingGame",
    "EnergyPointingGame",
    "SaliencyIoU",
    "localization_metrics",
]


# --------------------------------------------------------------------------------------------------------
# functionals


def _disk(radius: int, device: torch.device) -> Tensor:
    r = torch.arange(-radius, radius + 1, device=device)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius


def _pointing_game(maps: Tensor, masks: Tensor, tolerance: int) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(hit (N,) bool, empty (N,) bool, flat (N,) bool)`` at mask resolution."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    m, k = align_maps_to_masks(maps, masks)
    n, h, w = m.shape
    flat_maps = m.flatten(1)
    idx = flat_maps.argmax(dim=1)  # ties: first maximum in row-major order
    flat = flat_maps.amax(dim=1) <= flat_maps.amin(dim=1)
    empty = ~k.flatten(1).any(dim=1)
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=m.device), empty, flat
    if tolerance == 0:
        hit = k.flatten(1).gather(1, idx[:, None])[:, 0]
    else:
        # Dilating the mask by a disk of radius t and looking up the argmax pixel is the same as asking
        # whether any object pixel lies in the disk around the argmax: look only at that (2t+1)^2 patch.
        t = int(tolerance)
        py, px = idx // w, idx % w
        padded = F.pad(k, (t, t, t, t), value=False)
        off = torch.arange(2 * t + 1, device=m.device)
        rows = (py[:, None] + off[None, :])[:, :, None]  # (N, 2t+1, 1) in padded coordinates
        cols = (px[:, None] + off[None, :])[:, None, :]  # (N, 1, 2t+1)
        patch = padded[torch.arange(n, device=m.device)[:, None, None], rows, cols]  # (N, 2t+1, 2t+1)
        hit = (patch & _disk(t, m.device)).flatten(1).any(dim=1)
    hit = hit & ~flat
    return hit, empty, flat


def pointing_game(maps: Tensor, masks: Tensor, tolerance: int = 15) -> Tensor:
    """Per-sample pointing game (Zhang et al. 2018).

    A hit when the map's maximum lies within ``tolerance`` pixels (Euclidean, at mask resolution) of an
    object pixel, i.e. inside the mask dilated by a disk of radius ``tolerance``; ``tolerance=0`` means
    strictly inside the mask. The maximum is taken *after* upsampling the map to mask resolution; ties
    resolve to the first maximum in row-major order. A constant (flat) map has no maximum and scores a miss.

    Args:
        maps: ``(N, h, w)`` or ``(N, 1, h, w)`` saliency maps.
        masks: ``(N, H, W)`` or ``(N, 1, H, W)`` object masks (object = 1).
        tolerance: radius in mask pixels.

    Returns:
        ``(N,)`` float: 1.0 hit, 0.0 miss, ``NaN`` where the mask is empty.
    """
    hit, empty, _ = _pointing_game(maps, masks, tolerance)
    out = hit.to(torch.get_default_dtype())
    return out.masked_fill(empty, float("nan"))


def energy_pointing_game(maps: Tensor, masks: Tensor) -> Tensor:
    """Per-sample energy pointing game (a.k.a. relevance mass accuracy): map mass inside the mask / total mass.

    The map is upsampled to mask resolution and clamped to ``>= 0`` (negative evidence carries no mass).
    A map with zero total mass points nowhere and scores 0 (not NaN), so "accurate map" decisions based
    on it are always "inaccurate" for such maps.

    Args:
        maps: ``(N, h, w)`` or ``(N, 1, h, w)`` saliency maps.
        masks: ``(N, H, W)`` or ``(N, 1, H, W)`` object masks (object = 1).

    Returns:
        ``(N,)`` float in ``[0, 1]``; ``NaN`` where the mask is empty.
    """
    m, k = align_maps_to_masks(maps, masks)
    m = m.clamp_min(0).flatten(1)
    k = k.flatten(1)
    total = m.sum(dim=1)
    inside = (m * k).sum(dim=1)
    score = torch.where(total > 0, inside / total.clamp_min(torch.finfo(m.dtype).tiny), torch.zeros_like(total))
    return score.masked_fill(~k.any(dim=1), float("nan"))


def saliency_iou(maps: Tensor, masks: Tensor, threshold: float = 0.5) -> Tensor:
    """Per-sample IoU between the thresholded map and the mask.

    The map is upsampled to mask resolution, min-max normalized per sample to ``[0, 1]`` (a flat map
    becomes all zeros), and binarized as ``normalized >= threshold``.

    Args:
        maps: ``(N, h, w)`` or ``(N, 1, h, w)`` saliency maps.
        masks: ``(N, H, W)`` or ``(N, 1, H, W)`` object masks (object = 1).
        threshold: binarization level on the normalized map.

    Returns:
        ``(N,)`` float in ``[0, 1]``; ``NaN`` where the mask is empty.
    """
    m, k = align_maps_to_masks(maps, masks)
    pred = (minmax_normalize(m) >= threshold).flatten(1)
    k = k.flatten(1)
    inter = (pred & k).sum(dim=1)
    union = (pred | k).sum(dim=1)
    score = inter.to(m.dtype) / union.clamp_min(1).to(m.dtype)
    return score.masked_fill(~k.any(dim=1), float("nan"))


# --------------------------------------------------------------------------------------------------------
# metrics


class _MeanOverScored(PerSampleMean):
    """Mean of a per-sample score over samples with a non-empty mask; empty masks counted in ``skipped``."""

    higher_is_better = True
    missing = "skipped"

    skipped: Tensor


class PointingGame(_MeanOverScored):
    """Pointing-game hit rate (see :func:`pointing_game` for the per-sample rule).

    Args:
        tolerance: radius in mask pixels of the disk the mask is dilated by (0 = strictly inside;
            15 is Zhang et al.'s choice for full-resolution images).

    States: ``hits`` (== ``score_sum``), ``total`` (scored samples), ``skipped`` (empty masks),
    ``flat`` (constant maps, scored as misses).

    ``update(maps, masks)``: maps ``(N, h, w)``/``(N, 1, h, w)``, masks ``(N, H, W)``/``(N, 1, H, W)``.
    ``compute() -> Tensor`` scalar hit rate ``hits / total``.
    """

    flat: Tensor

    def __init__(self, tolerance: int = 15, **kwargs) -> None:
        super().__init__(**kwargs)
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        self.tolerance = int(tolerance)
        self.add_state("flat", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, maps: Tensor, masks: Tensor) -> None:
        hit, empty, flat = _pointing_game(maps, masks, self.tolerance)
        scores = hit.double().masked_fill(empty, float("nan"))
        self._accumulate(scores)
        self.flat += (flat & ~empty).sum().to(self.flat)

    @property
    def hits(self) -> Tensor:
        """Number of hits accumulated so far."""
        return self.score_sum.round().long()

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        """Wilson confidence interval of the hit rate (95% for ``z=1.96``)."""
        return wilson_interval(int(self.hits), int(self.total), z=z)

    def estimate(self) -> Estimate:
        """The hit rate over every process's samples with its 95% Wilson interval (a proportion: no per-sample
        scores needed)."""
        with self.sync_context():
            return wilson_estimate(int(self.hits), int(self.total))


class EnergyPointingGame(_MeanOverScored):
    """Mean energy pointing game over samples (see :func:`energy_pointing_game`).

    States: ``score_sum``, ``total``, ``skipped`` (empty masks), ``zero_maps`` (maps with no positive mass,
    scored 0).

    ``update(maps, masks)``: maps ``(N, h, w)``/``(N, 1, h, w)``, masks ``(N, H, W)``/``(N, 1, H, W)``.
    ``compute() -> Tensor`` scalar in ``[0, 1]``.
    """

    zero_maps: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("zero_maps", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, maps: Tensor, masks: Tensor) -> None:
        scores = energy_pointing_game(maps, masks)
        self._accumulate(scores)
        zero = maps.flatten(1).clamp_min(0).sum(dim=1) == 0
        self.zero_maps += (zero & ~torch.isnan(scores)).sum().to(self.zero_maps)


class SaliencyIoU(_MeanOverScored):
    """Mean IoU between the thresholded, min-max-normalized map and the mask (see :func:`saliency_iou`).

    Args:
        threshold: binarization level on the per-sample min-max-normalized map.

    ``update(maps, masks)``: maps ``(N, h, w)``/``(N, 1, h, w)``, masks ``(N, H, W)``/``(N, 1, H, W)``.
    ``compute() -> Tensor`` scalar in ``[0, 1]``.
    """

    def __init__(self, threshold: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold = float(threshold)

    def update(self, maps: Tensor, masks: Tensor) -> None:
        self._accumulate(saliency_iou(maps, masks, self.threshold))


def localization_metrics(tolerance: int = 15, keep_scores: bool = False) -> MetricCollection:
    """The mask metrics of a test set, keyed as they are logged and written (``pointing_game``,
    ``energy_pointing_game``): training's test step and ``trustcnn.evaluate`` (with ``keep_scores=True`` for the
    intervals) build them here."""
    # No compute groups: the metrics' states have the same names, never the same meaning.
    return MetricCollection({"pointing_game": PointingGame(tolerance=tolerance),
                             "energy_pointing_game": EnergyPointingGame(keep_scores=keep_scores)},
                            compute_groups=False)
