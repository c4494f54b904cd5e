"""The composite losses of the paper (DESIGN §1) and their peers, each term returned separately for logging.

Every loss is called as ``loss(logits, labels, maps[, masks][, inputs=x])`` and returns a dict of tensors:
``loss`` (the scalar to minimize) and its terms, each the batch mean of the per-sample term. A loss says
what it needs: ``needs_maps`` (the in-step saliency maps), ``needs_masks`` (ground-truth object masks) and
``needs_inputs`` (the input images, with ``requires_grad``, that ``logits`` were computed from: the loss
differentiates through them, so the feature cache cannot serve it).

Peers of the paper's loss (the established explanation penalties, compared in the shortcut study):

* ``rrr``: "Right for the Right Reasons" (Ross, Hughes & Doshi-Velez 2017);
* ``cam_outside``: the share of the saliency map's energy outside the object mask (attention supervision).

Their strength is ``weight`` ∈ (0, ∞); λ's [0, 1] range is a rule of the trust losses only.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

LossForm = Literal["paper", "prose"]
FORMS: tuple[str, ...] = ("paper", "prose")


def _check_lam(lam: float) -> float:
    lam = float(lam)
    if not 0.0 <= lam <= 1.0:  # also rejects NaN
        raise ValueError(f"loss.lam must lie in [0, 1] (eq. 7 weighs CE by λ and saliency by 1-λ), got {lam}; "
                         "set e.g. loss.lam=0.9.")
    return lam


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision maps or logits (mixed precision) upcast, so every term is computed in float32."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _check_logits(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(
            f"Expected logits (N, C) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}."
        )


def _check_maps(maps: torch.Tensor, n: int, name: str = "maps") -> None:
    if maps.dim() != 3 or maps.shape[0] != n:
        raise ValueError(
            f"{name} must have shape (N, h, w) with N={n} (one map per sample), got {tuple(maps.shape)}."
        )
    if not torch.isfinite(maps).all():
        bad = int((~torch.isfinite(maps)).flatten(1).any(1).sum())
        raise FloatingPointError(
            f"{bad} of {n} saliency maps contain NaN/Inf. This usually means the model diverged "
            "(lower optim.lr) or a map was normalized by a zero span; check the inputs and the learning rate."
        )


def _check_unit_range(maps: torch.Tensor, name: str, tol: float = 1e-4) -> None:
    lo, hi = (float(v) for v in torch.aminmax(maps.detach()))
    if lo < -tol or hi > 1 + tol:
        raise ValueError(
            f"{name} must lie in [0, 1] for this loss, got values in [{lo:.4g}, {hi:.4g}]; "
            "normalize them (saliency.normalize=max or minmax)."
        )


def _check_weight(weight: float) -> float:
    weight = float(weight)
    if not (weight > 0.0 and math.isfinite(weight)):  # also rejects NaN
        raise ValueError(f"loss.weight must be a positive finite number (the penalty's strength), got {weight}; "
                         "set e.g. loss.weight=1.")
    return weight


def _check_masks(masks: torch.Tensor | None, n: int, loss: str) -> torch.Tensor:
    if masks is None or masks.numel() == 0:
        raise ValueError(f"loss={loss} needs ground-truth masks, but this data has none; "
                         "use a data config with masks (decoy_digits, oxford_pet) or loss=trust.")
    masks = masks if masks.dim() == 3 else masks.squeeze(1)
    _check_maps(masks, n, "masks")
    _check_unit_range(masks, "Masks")
    return masks


class CrossEntropyLoss:
    """The baseline (eq. 1): plain mean cross-entropy. Ignores the maps."""

    needs_maps = False
    needs_masks = False
    needs_inputs = False

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, maps: torch.Tensor | None = None,
                 masks: torch.Tensor | None = None, inputs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = _at_least_float32(logits)
        _check_logits(logits, labels)
        ce = F.cross_entropy(logits, labels)
        return {"loss": ce, "ce": ce}


class TrustLoss:
    """The paper's gradient-penalized loss (eq. 4-7), averaged over the batch.

    Per sample, with ``c = CE/|C|`` and ``s = mean(L)/|C|`` when ``scale_by_classes`` (the paper's
    footnote; both then lie in [0, 1]), otherwise unscaled::

        paper (eq. 5-6, as printed; default):  R1 = c (1 - s),   R2 = s (1 - c)
        prose (the text's reading):            R1 = c s,         R2 = (1 - c)(1 - s)
        L = mean[ λ c + w_s (1-λ) s + w1 R1 + w2 R2 ]

    The printed equations and the prose disagree (``∂(R1+R2)/∂s = 1 - 2c`` for ``paper``); both are
    offered so experiments can compare them. The paper sums over samples; the mean has the same
    optimum and makes the learning rate independent of the batch size. ``c`` is clamped to [0, 1]
    inside R1/R2 (``clamp_ce``) because CE is unbounded while the equations assume it is not.

    Args:
        lam: λ ∈ [0, 1], the weight of the classification term.
        form: ``paper`` or ``prose``.
        w1, w2, w_s: ablation weights of R1, R2 and the ``(1-λ)s`` term (1 = on, 0 = ablated).
        scale_by_classes: divide CE and Ŝ by the number of classes.
        clamp_ce: clamp ``c`` to [0, 1] inside R1/R2.

    Returns (from ``__call__``): ``loss``, ``ce`` (mean raw CE), ``c``, ``s_hat`` (mean Ŝ before
    scaling), ``reg`` (the weighted ``(1-λ)s`` term), ``r1``, ``r2`` (weighted).
    """

    needs_maps = True
    needs_masks = False
    needs_inputs = False

    def __init__(self, lam: float = 0.9, form: LossForm = "paper", w1: float = 1.0, w2: float = 1.0,
                 w_s: float = 1.0, scale_by_classes: bool = True, clamp_ce: bool = True) -> None:
        self.lam = _check_lam(lam)
        if form not in FORMS:
            raise ValueError(f"Unknown loss.form {form!r}; use 'paper' (eq. 5-6 as printed) or 'prose'.")
        self.form = form
        self.w1, self.w2, self.w_s = float(w1), float(w2), float(w_s)
        self.scale_by_classes = scale_by_classes
        self.clamp_ce = clamp_ce

    def _scaled_ce(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ce = F.cross_entropy(logits, labels, reduction="none")
        c = ce / logits.shape[1] if self.scale_by_classes else ce
        return ce, c

    def _combine(self, ce: torch.Tensor, c: torch.Tensor, s: torch.Tensor, s_in_r: torch.Tensor) -> dict[str, torch.Tensor]:
        """``s`` enters the (1-λ) term; ``s_in_r`` (s clamped where needed) enters R1/R2."""
        c_r = c.clamp(0.0, 1.0) if self.clamp_ce else c
        if self.form == "paper":
            r1, r2 = c_r * (1 - s_in_r), s_in_r * (1 - c_r)
        else:
            r1, r2 = c_r * s_in_r, (1 - c_r) * (1 - s_in_r)
        reg = self.w_s * (1 - self.lam) * s
        r1, r2 = self.w1 * r1, self.w2 * r2
        total = self.lam * c + reg + r1 + r2
        return {"loss": total.mean(), "ce": ce.mean(), "c": c.mean(), "reg": reg.mean(),
                "r1": r1.mean(), "r2": r2.mean()}

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, maps: torch.Tensor,
                 masks: torch.Tensor | None = None, inputs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits, maps = _at_least_float32(logits), _at_least_float32(maps)
        _check_logits(logits, labels)
        _check_maps(maps, logits.shape[0])
        _check_unit_range(maps, "Saliency maps")
        ce, c = self._scaled_ce(logits, labels)
        s_hat = maps.flatten(1).mean(dim=1)
        s = s_hat / logits.shape[1] if self.scale_by_classes else s_hat
        terms = self._combine(ce, c, s, s)
        terms["s_hat"] = s_hat.mean()
        return terms


class MaskTrustLoss(TrustLoss):
    """The mask loss (eq. 8-10) for data with ground-truth object masks.

    ``P = mean_pixels BCE(L, M)`` with ``L`` in [0, 1] clamped to ``[eps, 1-eps]`` and ``M`` resized to
    ``L``'s resolution (area-weighted, so ``M`` becomes the object fraction of each map cell); then
    ``R1 = c (1 - p)``, ``R2 = p (1 - c)`` with ``p = clamp(P, 0, 1)`` (``form=prose`` swaps as in
    :class:`TrustLoss`) and ``L = mean[λ c + w_s (1-λ) P + w1 R1 + w2 R2]``.

    Returns the :class:`TrustLoss` terms plus ``pwce`` (mean P). Called with ``masks (N, 1, H, W)`` or
    ``(N, H, W)``, object = 1.
    """

    needs_masks = True

    def __init__(self, lam: float = 0.9, form: LossForm = "paper", w1: float = 1.0, w2: float = 1.0,
                 w_s: float = 1.0, scale_by_classes: bool = True, clamp_ce: bool = True, eps: float = 1e-6) -> None:
        super().__init__(lam, form, w1, w2, w_s, scale_by_classes, clamp_ce)
        self.eps = eps

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, maps: torch.Tensor,
                 masks: torch.Tensor | None = None, inputs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits, maps = _at_least_float32(logits), _at_least_float32(maps)
        _check_logits(logits, labels)
        _check_maps(maps, logits.shape[0])
        _check_unit_range(maps, "Saliency maps")
        masks = _check_masks(masks, logits.shape[0], "trust_mask")
        pwce = _pixelwise_bce(maps, masks, self.eps)
        ce, c = self._scaled_ce(logits, labels)
        terms = self._combine(ce, c, pwce, pwce.clamp(0.0, 1.0))
        terms["pwce"] = pwce.mean()
        terms["s_hat"] = maps.flatten(1).mean(dim=1).mean()
        return terms


def _pixelwise_bce(maps: torch.Tensor, masks: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-sample mean BCE between ``maps`` and the masks resized to them, always in float32 or wider.

    Under mixed precision the maps arrive in float16/bfloat16: CUDA autocast refuses
    ``binary_cross_entropy`` there ("unsafe to autocast"), and ``eps`` = 1e-6 would round to 0 or 1 in
    half precision, making the log infinite. So autocast is switched off and the inputs are upcast.
    """
    dtype = torch.promote_types(maps.dtype, torch.float32)
    with torch.autocast(device_type=maps.device.type, enabled=False):
        target = resize_masks(masks.to(dtype), tuple(maps.shape[-2:]))
        probs = maps.to(dtype).clamp(eps, 1 - eps)
        return F.binary_cross_entropy(probs, target, reduction="none").flatten(1).mean(dim=1)


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(N, H, W)`` masks to ``size``: area-averaged when shrinking (soft object fraction), bilinear
    when growing."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    shrinking = masks.shape[-2] >= size[0] and masks.shape[-1] >= size[1]
    mode = "area" if shrinking else "bilinear"
    kwargs = {} if shrinking else {"align_corners": False}
    return F.interpolate(masks.unsqueeze(1), size=size, mode=mode, **kwargs).squeeze(1)


class CamOutsideLoss:
    """Cross-entropy plus ``weight`` × the share of the saliency map's energy outside the object mask.

    Per sample, with the map ``L ≥ 0`` and the mask ``M`` resized to the map (area-weighted: the object
    fraction of each map cell): ``outside = Σ L (1 - M) / Σ L``, the common attention-supervision penalty;
    ``L = mean[CE + weight · outside]``. A map that is zero everywhere has no energy on the object and counts
    as fully outside (1; it has no gradient there either), so an empty map is never the cheap way out.
    Either saliency method; ``saliency.normalize`` does not change the share.

    Returns ``loss``, ``ce`` and ``outside`` (mean share).
    """

    needs_maps = True
    needs_masks = True
    needs_inputs = False

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = _check_weight(weight)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, maps: torch.Tensor,
                 masks: torch.Tensor | None = None, inputs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = _at_least_float32(logits)
        _check_logits(logits, labels)
        _check_maps(maps, logits.shape[0])
        if float(maps.detach().min()) < -1e-6:
            raise ValueError("loss=cam_outside needs non-negative maps (an energy); use saliency.normalize=max or "
                             "minmax.")
        masks = _check_masks(masks, logits.shape[0], "cam_outside")
        dtype = torch.promote_types(maps.dtype, torch.float32)
        with torch.autocast(device_type=maps.device.type, enabled=False):
            maps = maps.to(dtype)
            target = resize_masks(masks.to(dtype), tuple(maps.shape[-2:]))
            energy = maps.flatten(1).sum(dim=1)
            outside_energy = (maps * (1 - target)).flatten(1).sum(dim=1)
            empty = energy <= 0
            outside = torch.where(empty, torch.ones_like(energy), outside_energy / energy.masked_fill(empty, 1.0))
        ce = F.cross_entropy(logits, labels, reduction="none")
        total = ce + self.weight * outside
        return {"loss": total.mean(), "ce": ce.mean(), "outside": outside.mean()}


class RightForRightReasonsLoss:
    """"Right for the Right Reasons" (Ross, Hughes & Doshi-Velez 2017, eq. 1), averaged over the batch.

    ``L = mean_n[ CE_n + weight · Σ_d (A_nd ∂/∂x_nd Σ_k log p̂_nk)² ]`` with ``A = 1 - M`` the region the
    mask marks as irrelevant (the mask at the input's resolution, broadcast over channels) and ``p̂`` the
    softmax of the logits. The input gradient is taken with ``create_graph`` while autograd records, so
    the penalty trains the network (a double backward through everything between the input and the
    trainable layers). The paper sums over samples and adds an L2 weight penalty; the mean keeps the
    learning rate independent of the batch size, and weight decay belongs to the optimizer.

    Called with ``inputs``: the images, with ``requires_grad``, that ``logits`` were computed from.
    Returns ``loss``, ``ce`` and ``rrr`` (the mean penalty before ``weight``).
    """

    needs_maps = False
    needs_masks = True
    needs_inputs = True

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = _check_weight(weight)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, maps: torch.Tensor | None = None,
                 masks: torch.Tensor | None = None, inputs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if inputs is None or not inputs.requires_grad or not logits.requires_grad:
            raise ValueError("loss=rrr differentiates through the input: call it with inputs=<the images, "
                             "requires_grad=True> and logits computed from them with autograd recording.")
        logits = _at_least_float32(logits)
        _check_logits(logits, labels)
        masks = _check_masks(masks, logits.shape[0], "rrr")
        with torch.autocast(device_type=logits.device.type, enabled=False):
            log_probs = F.log_softmax(logits, dim=1)
            (grad,) = torch.autograd.grad(log_probs.sum(), inputs, create_graph=torch.is_grad_enabled())
            grad = grad.to(torch.promote_types(grad.dtype, torch.float32))
            irrelevant = 1 - resize_masks(masks.to(grad.dtype), tuple(grad.shape[-2:]))
            penalty = (irrelevant.unsqueeze(1) * grad).pow(2).flatten(1).sum(dim=1)
        ce = F.cross_entropy(logits, labels, reduction="none")
        total = ce + self.weight * penalty
        return {"loss": total.mean(), "ce": ce.mean(), "rrr": penalty.mean()}


LOSSES: dict[str, type] = {"ce": CrossEntropyLoss, "trust": TrustLoss, "trust_mask": MaskTrustLoss,
                           "rrr": RightForRightReasonsLoss, "cam_outside": CamOutsideLoss}
