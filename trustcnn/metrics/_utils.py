"""Shared input handling for the saliency metrics: shapes, mask binarization, resolution alignment.

Every metric in :mod:`trustcnn.metrics` goes through these helpers, so the conventions are stated once:

* **Maps** are float tensors ``(N, h, w)`` or ``(N, 1, h, w)``, non-negative by convention, any resolution.
* **Masks** are ``(N, H, W)`` or ``(N, 1, H, W)`` with values in ``[0, 1]``; object = ``mask >= 0.5``
  (binary masks pass through unchanged, soft masks are thresholded at 0.5). Values outside ``[0, 1]``
  (e.g. 0/255 PNGs or raw Oxford-IIIT trimaps 1/2/3) are rejected with an error rather than guessed at.
* **Resolution**: when a map and its mask differ in size, the map is upsampled *bilinearly*
  (``align_corners=False``) to the mask's resolution (:func:`align_maps_to_masks`); all mask-based
  metrics are scored at mask resolution.

:class:`PerSampleMean` is the base of every metric that averages a per-sample score.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from trustcnn.maps import upsample
from trustcnn.metrics.stats import Estimate, mean_estimate


def as_maps(maps: Tensor, name: str = "maps") -> Tensor:
    """Return saliency maps as a floating ``(N, h, w)`` tensor.

    Args:
        maps: ``(N, h, w)`` or ``(N, 1, h, w)``.
        name: argument name used in error messages.

    Raises:
        ValueError: wrong rank, a channel dimension other than 1, or non-finite values.
    """
    if not isinstance(maps, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(maps).__name__}")
    if maps.ndim == 4:
        if maps.shape[1] != 1:
            raise ValueError(
                f"`{name}` has shape {tuple(maps.shape)}; expected (N, h, w) or (N, 1, h, w). "
                "Reduce multi-channel maps (e.g. guided backprop) to one channel first."
            )
        maps = maps[:, 0]
    elif maps.ndim != 3:
        raise ValueError(f"`{name}` has shape {tuple(maps.shape)}; expected (N, h, w) or (N, 1, h, w).")
    if not maps.is_floating_point():
        maps = maps.float()
    if not torch.isfinite(maps).all():
        raise ValueError(f"`{name}` contains NaN or inf values.")
    return maps


def as_masks(masks: Tensor, name: str = "masks") -> Tensor:
    """Return object masks as a boolean ``(N, H, W)`` tensor (object = ``mask >= 0.5``).

    Args:
        masks: ``(N, H, W)`` or ``(N, 1, H, W)``; bool, or numbers in ``[0, 1]``.
        name: argument name used in error messages.

    Raises:
        ValueError: wrong rank / channel count, or values outside ``[0, 1]``.
    """
    if not isinstance(masks, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(masks).__name__}")
    if masks.ndim == 4:
        if masks.shape[1] != 1:
            raise ValueError(f"`{name}` has shape {tuple(masks.shape)}; expected (N, H, W) or (N, 1, H, W).")
        masks = masks[:, 0]
    elif masks.ndim != 3:
        raise ValueError(f"`{name}` has shape {tuple(masks.shape)}; expected (N, H, W) or (N, 1, H, W).")
    if masks.dtype == torch.bool:
        return masks
    if masks.numel() and (masks.min() < 0 or masks.max() > 1):
        raise ValueError(
            f"`{name}` has values in [{masks.min().item()}, {masks.max().item()}]; expected values in [0, 1] "
            "with object = 1 (convert 0/255 masks or raw trimaps first)."
        )
    return masks >= 0.5


def resize_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly resize ``(N, h, w)`` maps to ``size`` (``align_corners=False``); no-op if already there."""
    return upsample(maps, tuple(size))


def align_maps_to_masks(maps: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """Validate and bring maps to the masks' resolution.

    Args:
        maps: ``(N, h, w)`` or ``(N, 1, h, w)`` saliency maps.
        masks: ``(N, H, W)`` or ``(N, 1, H, W)`` object masks.

    Returns:
        ``(maps, masks)``: float maps ``(N, H, W)`` (bilinearly upsampled if ``(h, w) != (H, W)``) and
        boolean masks ``(N, H, W)``.
    """
    maps = as_maps(maps)
    masks = as_masks(masks)
    if maps.shape[0] != masks.shape[0]:
        raise ValueError(f"maps and masks disagree on N: {maps.shape[0]} vs {masks.shape[0]}")
    return resize_maps(maps, tuple(masks.shape[-2:])), masks.to(maps.device)


def minmax_normalize(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Per-sample min-max normalization of ``(N, ...)`` maps to ``[0, 1]``.

    A constant (flat) map has no range and becomes all zeros.
    """
    flat = maps.flatten(1)
    lo = flat.amin(dim=1, keepdim=True)
    hi = flat.amax(dim=1, keepdim=True)
    rng = hi - lo
    out = torch.where(rng > eps, (flat - lo) / rng.clamp_min(eps), torch.zeros_like(flat))
    return out.view_as(maps)


class PerSampleMean(Metric):
    """Mean of a per-sample score over the samples that have one; a NaN score (no score: an empty mask, an
    undefined correlation) is left out and counted in the state named by the class attribute ``missing``.

    States: ``score_sum``, ``total`` (scored samples), ``<missing>``; all summed over processes. With
    ``keep_scores=True`` every score is kept too (state ``scores``, concatenated over processes), for
    :meth:`estimate`'s confidence interval; the mean itself never needs them.
    """

    is_differentiable = False
    full_state_update = False
    missing = "skipped"

    score_sum: Tensor
    total: Tensor
    scores: list[Tensor]

    def __init__(self, keep_scores: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.keep_scores = bool(keep_scores)
        self.add_state("score_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state(self.missing, default=torch.tensor(0), dist_reduce_fx="sum")
        if self.keep_scores:
            self.add_state("scores", default=[], dist_reduce_fx="cat")

    def _accumulate(self, scores: Tensor) -> None:
        valid = ~torch.isnan(scores)
        self.score_sum += scores[valid].to(self.score_sum).sum()
        self.total += valid.sum().to(self.total)
        missing = getattr(self, self.missing)
        missing += (~valid).sum().to(missing)
        if self.keep_scores:
            self.scores.append(scores[valid].detach().double())

    def compute(self) -> Tensor:
        """Mean score over scored samples (``NaN`` if none were scored)."""
        if self.total == 0:
            return torch.tensor(float("nan"), device=self.score_sum.device)
        return (self.score_sum / self.total).float()

    def estimate(self) -> Estimate:
        """The mean over every process's scored samples with its 95% t-interval
        (:func:`~trustcnn.metrics.stats.mean_estimate`); needs ``keep_scores=True``."""
        if not self.keep_scores:
            raise RuntimeError(f"{type(self).__name__}.estimate() needs the per-sample scores: create it with "
                               "keep_scores=True.")
        with self.sync_context():
            scores = dim_zero_cat(self.scores) if self.scores else torch.zeros(0, dtype=torch.float64)
            return mean_estimate(scores)
