"""Faithfulness without masks: deletion and insertion curves / AUCs (Petsiuk et al. 2018, RISE)."""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from torchvision.transforms.functional import gaussian_blur

from trustcnn.metrics._utils import as_maps, resize_maps
from trustcnn.metrics.stats import Estimate, mean_estimate

__all__ = ["DeletionInsertion", "deletion_insertion", "make_baseline", "BASELINES"]

BASELINES = ("blur", "zeros", "mean")


def make_baseline(images: Tensor, baseline: str = "blur", blur_kernel_size: int = 11, blur_sigma: float = 5.0) -> Tensor:
    """The "removed pixel" substrate for ``(N, C, H, W)`` images.

    * ``"blur"``: Gaussian blur (kernel ``blur_kernel_size``, σ ``blur_sigma``; RISE's 11 / 5), reflect
      padding — removes detail, keeps colors; RISE uses it for insertion.
    * ``"zeros"``: all zeros — in normalized input space this is the dataset-mean color; RISE uses it
      for deletion.
    * ``"mean"``: each image's own per-channel mean.
    """
    if baseline == "blur":
        return gaussian_blur(images, kernel_size=[blur_kernel_size] * 2, sigma=[blur_sigma] * 2)
    if baseline == "zeros":
        return torch.zeros_like(images)
    if baseline == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images).contiguous()
    raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")


def _step_counts(num_pixels: int, steps: int, device: torch.device) -> Tensor:
    k = torch.arange(steps + 1, device=device)
    return (k * num_pixels + steps // 2) // steps  # round(k * P / steps), 0 .. P


def _auc(curves: Tensor) -> Tensor:
    """Trapezoid area under ``(N, S+1)`` curves sampled at x = 0, 1/S, ..., 1 → values in [0, 1]."""
    s = curves.shape[1] - 1
    return (curves.sum(dim=1) - 0.5 * (curves[:, 0] + curves[:, -1])) / s


@torch.no_grad()
def deletion_insertion(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    steps: int = 20,
    baseline: str = "blur",
    batch_size: int = 64,
    apply_softmax: bool = True,
    blur_kernel_size: int = 11,
    blur_sigma: float = 5.0,
) -> dict[str, Tensor]:
    """Per-sample deletion and insertion curves and AUCs.

    Pixels are ranked by the map (upsampled bilinearly to image resolution; ties broken in row-major
    order). At step ``k = 0..steps`` the ``round(k·H·W/steps)`` most salient pixels (all channels) are

    * **deletion**: replaced by the baseline in the original image (k = 0: original, k = steps: baseline);
    * **insertion**: copied from the original into the baseline (k = 0: baseline, k = steps: original),

    and the model's probability of ``targets`` is recorded. AUC = trapezoid rule over the fraction of
    pixels in ``[0, 1]``, so AUCs lie in ``[0, 1]``. Lower deletion AUC / higher insertion AUC = more
    faithful map. The ``2·(steps+1)`` perturbed copies of ``max(1, batch_size // (2·(steps+1)))`` images
    are built at once by broadcasting and evaluated in forward passes of at most ``batch_size``.

    Args:
        model: ``(B, C, H, W) -> (B, num_classes)`` logits (or probabilities with ``apply_softmax=False``);
            called as is under ``torch.no_grad()`` — put it in eval mode first.
        images: ``(N, C, H, W)`` model inputs.
        maps: ``(N, h, w)`` or ``(N, 1, h, w)`` saliency maps (higher = more salient).
        targets: ``(N,)`` class whose probability is tracked (usually the class the map explains).
        steps: number of perturbation steps (curve has ``steps + 1`` points).
        baseline: ``"blur"``, ``"zeros"`` or ``"mean"`` (see :func:`make_baseline`), for both curves.
        batch_size: perturbed images per forward pass.
        apply_softmax: apply softmax to the model output.

    Returns:
        ``{"deletion_auc": (N,), "insertion_auc": (N,), "deletion_curve": (N, steps+1),
        "insertion_curve": (N, steps+1)}``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
    n, _, h, w = images.shape
    maps = as_maps(maps).to(images.device)
    if maps.shape[0] != n or targets.shape != (n,):
        raise ValueError(
            f"images {tuple(images.shape)}, maps {tuple(maps.shape)} and targets {tuple(targets.shape)} disagree on N"
        )
    p = h * w
    targets = targets.to(images.device).long()
    base = make_baseline(images, baseline, blur_kernel_size, blur_sigma)
    # rank[i, pixel] = 0 for the most salient pixel
    order = resize_maps(maps.to(torch.float32), (h, w)).flatten(1).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(p, device=images.device).expand(n, p))
    counts = _step_counts(p, steps, images.device)

    per = 2 * (steps + 1)  # perturbed images per sample: deletion steps, then insertion steps
    probs = torch.empty(n, per, dtype=torch.float32, device=images.device)
    img_flat = images.flatten(2)[:, None]  # (N, 1, C, P)
    base_flat = base.flatten(2)[:, None]
    group = max(1, batch_size // per)  # samples whose perturbed copies are built together
    for s0 in range(0, n, group):
        sl = slice(s0, min(s0 + group, n))
        top = rank[sl, None, :] < counts[None, :, None]  # (G, S+1, P): the k-th step's most salient pixels
        # which pixels come from the original: deletion k = 0..S (all but the top), then insertion k = 0..S
        show = torch.cat([~top, top], dim=1)[:, :, None, :]  # (G, per, 1, P)
        x = torch.where(show, img_flat[sl], base_flat[sl]).view(-1, *images.shape[1:])  # (G*per, C, H, W)
        tgt = targets[sl].repeat_interleave(per)
        out_probs = []
        for b0 in range(0, x.shape[0], batch_size):
            out = model(x[b0 : b0 + batch_size])
            if out.ndim != 2:
                raise ValueError(f"model must return (B, num_classes), got {tuple(out.shape)}")
            out = out.float().softmax(dim=1) if apply_softmax else out.float()
            out_probs.append(out.gather(1, tgt[b0 : b0 + batch_size, None].to(out.device))[:, 0])
        probs[sl] = torch.cat(out_probs).to(probs.device).view(-1, per)
    probs = probs.view(n, 2, steps + 1)
    deletion, insertion_c = probs[:, 0], probs[:, 1]
    return {
        "deletion_auc": _auc(deletion),
        "insertion_auc": _auc(insertion_c),
        "deletion_curve": deletion,
        "insertion_curve": insertion_c,
    }


class DeletionInsertion(Metric):
    """Mean deletion and insertion AUC and mean curves over samples (see :func:`deletion_insertion`).

    The model is held as a plain reference, not registered as a sub-module: ``metric.to(device)`` does not
    move it and it does not appear in the metric's ``state_dict`` (so a LightningModule carrying this
    metric does not checkpoint the model twice).

    Args:
        model: ``(B, C, H, W) -> (B, num_classes)`` logits; in eval mode (a warning is issued otherwise).
        steps: perturbation steps; ``baseline``: ``"blur"`` | ``"zeros"`` | ``"mean"``;
        batch_size: perturbed images per forward; apply_softmax: whether the model returns logits;
        blur_kernel_size / blur_sigma: the ``"blur"`` baseline;
        keep_scores: keep every sample's AUCs (states ``deletion_scores``, ``insertion_scores``) for
            :meth:`estimates`' confidence intervals.

    ``update(images (N, C, H, W), maps (N, h, w) | (N, 1, h, w), targets (N,))``.
    ``compute() -> dict[str, Tensor]``: ``deletion_auc``, ``insertion_auc`` (scalars, mean over samples),
    ``deletion_curve``, ``insertion_curve`` (``(steps+1,)`` mean curves, x = fraction of pixels 0..1).
    ``estimates() -> dict[str, Estimate]``: ``deletion_auc``, ``insertion_auc`` with 95% t-intervals.
    """

    is_differentiable = False
    higher_is_better = None  # deletion: lower is better; insertion: higher is better
    full_state_update = False

    deletion_sum: Tensor
    insertion_sum: Tensor
    deletion_curve_sum: Tensor
    insertion_curve_sum: Tensor
    total: Tensor
    deletion_scores: list[Tensor]
    insertion_scores: list[Tensor]

    def __init__(
        self,
        model: Callable[[Tensor], Tensor],
        steps: int = 20,
        baseline: str = "blur",
        batch_size: int = 64,
        apply_softmax: bool = True,
        blur_kernel_size: int = 11,
        blur_sigma: float = 5.0,
        keep_scores: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.__dict__["model"] = model  # plain attribute: bypass nn.Module sub-module registration
        self.steps, self.baseline, self.batch_size = int(steps), baseline, int(batch_size)
        self.apply_softmax, self.blur_kernel_size, self.blur_sigma = apply_softmax, blur_kernel_size, blur_sigma
        f64 = torch.float64
        self.add_state("deletion_sum", default=torch.tensor(0.0, dtype=f64), dist_reduce_fx="sum")
        self.add_state("insertion_sum", default=torch.tensor(0.0, dtype=f64), dist_reduce_fx="sum")
        self.add_state("deletion_curve_sum", default=torch.zeros(self.steps + 1, dtype=f64), dist_reduce_fx="sum")
        self.add_state("insertion_curve_sum", default=torch.zeros(self.steps + 1, dtype=f64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")
        self.keep_scores = bool(keep_scores)
        if self.keep_scores:
            self.add_state("deletion_scores", default=[], dist_reduce_fx="cat")
            self.add_state("insertion_scores", default=[], dist_reduce_fx="cat")

    def update(self, images: Tensor, maps: Tensor, targets: Tensor) -> None:
        model = self.__dict__["model"]
        if isinstance(model, nn.Module) and model.training:
            warnings.warn("DeletionInsertion: the model is in training mode; call model.eval() first.", stacklevel=2)
        r = deletion_insertion(
            model, images, maps, targets, self.steps, self.baseline, self.batch_size,
            self.apply_softmax, self.blur_kernel_size, self.blur_sigma,
        )
        dev = self.total.device
        self.deletion_sum += r["deletion_auc"].to(dev, torch.float64).sum()
        self.insertion_sum += r["insertion_auc"].to(dev, torch.float64).sum()
        self.deletion_curve_sum += r["deletion_curve"].to(dev, torch.float64).sum(dim=0)
        self.insertion_curve_sum += r["insertion_curve"].to(dev, torch.float64).sum(dim=0)
        self.total += images.shape[0]
        if self.keep_scores:
            self.deletion_scores.append(r["deletion_auc"].to(dev, torch.float64))
            self.insertion_scores.append(r["insertion_auc"].to(dev, torch.float64))

    def estimates(self) -> dict[str, Estimate]:
        """Mean deletion and insertion AUC over every process's samples, each with its 95% t-interval
        (:func:`~trustcnn.metrics.stats.mean_estimate`); needs ``keep_scores=True``."""
        if not self.keep_scores:
            raise RuntimeError("DeletionInsertion.estimates() needs the per-sample AUCs: create it with keep_scores=True.")
        with self.sync_context():
            return {name: mean_estimate(dim_zero_cat(scores) if scores else torch.zeros(0))
                    for name, scores in (("deletion_auc", self.deletion_scores),
                                         ("insertion_auc", self.insertion_scores))}

    def compute(self) -> dict[str, Tensor]:
        n = self.total.clamp_min(1).double()
        nan = float("nan")
        out = {
            "deletion_auc": (self.deletion_sum / n).float(),
            "insertion_auc": (self.insertion_sum / n).float(),
            "deletion_curve": (self.deletion_curve_sum / n).float(),
            "insertion_curve": (self.insertion_curve_sum / n).float(),
        }
        if self.total == 0:
            out = {k: torch.full_like(v, nan) for k, v in out.items()}
        return out
