"""Differentiable, batched Grad-CAM (Selvaraju et al. 2017; eq. 2-3 of the paper)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def score_gradients(
    scores: torch.Tensor,
    inputs: torch.Tensor,
    create_graph: bool = True,
    per_sample: bool = False,
    per_sample_from: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each sample's own gradient ``d scores[i] / d inputs[i]``, stacked like ``inputs``.

    Args:
        scores: ``(N,)`` the target logit of each sample.
        inputs: ``(N, ...)`` a tensor of the graph that produced ``scores``, one row per sample.
        create_graph: keep the graph of the gradient itself (second order).
        per_sample: how the samples are told apart.

            ``False``: one backward of ``scores.sum()``. Its row ``i`` is
            ``sum_j d scores[j] / d inputs[i]``, sample ``i``'s own gradient only while no score
            depends on another sample's row: true for BatchNorm with running statistics (eval mode,
            frozen), false once a normalization layer between ``inputs`` and ``scores`` normalizes
            with the statistics of the batch (train-mode BatchNorm), which makes every score a
            function of every sample.

            ``True``: the diagonal blocks ``j = i`` of the Jacobian ``d scores[j] / d inputs[i]``,
            from one batched backward whose ``grad_outputs`` are the rows of the identity
            (``is_grads_batched``, i.e. vmap over the ``N`` vector-Jacobian products). Exact in both
            cases, at about ``N`` times the backward's compute and memory.
        per_sample_from: with ``per_sample``, a tensor of the graph, batched like ``scores``, through
            which alone the samples interact: every dependence of a score on another sample's
            ``inputs`` passes through it, and between ``inputs`` and it the samples are independent
            (e.g. the input of the only block whose BatchNorms use batch statistics). The
            per-sample backward then runs only from ``scores`` down to this tensor; one backward of
            the summed scores, with its gradient at this tensor replaced by the per-sample one,
            carries each sample's own gradient on to ``inputs`` (rows stay apart upstream). Same
            result, at ``N`` times the cost of the part after this tensor only. Also exact for
            the (non-linear) guided backward, because the replacement happens where the gradient
            arrives, before any gate upstream sees it.
    """
    if scores.dim() != 1 or scores.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"scores must have shape (N,) = ({inputs.shape[0]},), got {tuple(scores.shape)}; "
            "pass the target logit of each sample, e.g. logits.gather(1, target[:, None]).squeeze(1)."
        )
    if per_sample and (per_sample_from is None or per_sample_from is inputs):
        return _diagonal_blocks(scores, inputs, create_graph)
    handle = None
    if per_sample:
        own = _diagonal_blocks(scores, per_sample_from, create_graph)
        handle = per_sample_from.register_hook(lambda summed: own)
    try:
        (grads,) = torch.autograd.grad(scores.sum(), inputs, create_graph=create_graph, retain_graph=True)
    finally:
        if handle is not None:
            handle.remove()
    return grads


def _diagonal_blocks(scores: torch.Tensor, inputs: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """``d scores[i] / d inputs[i]``: the Jacobian's diagonal blocks, from ``N`` vector-Jacobian
    products (the rows of the identity) run as one vmapped backward."""
    n = scores.shape[0]
    eye = torch.eye(n, dtype=scores.dtype, device=scores.device)
    (jacobian,) = torch.autograd.grad(
        scores, inputs, grad_outputs=eye, is_grads_batched=True, create_graph=create_graph, retain_graph=True
    )
    rows = torch.arange(n, device=scores.device)
    return jacobian[rows, rows]


def gradcam(
    activations: torch.Tensor, scores: torch.Tensor, create_graph: bool = True, per_sample: bool = False
) -> torch.Tensor:
    """Raw Grad-CAM ``ReLU(sum_k alpha_k A_k)`` with ``alpha = mean_hw d score / d A``.

    Args:
        activations: ``(N, K, h, w)`` target-layer output still attached to the graph.
        scores: ``(N,)`` target logit per sample.
        create_graph: ``True`` (default) keeps ``alpha`` differentiable (full second order, what the
            paper's loss needs). ``False`` detaches ``alpha``: the map is still differentiable through
            ``A`` but not through the weights, a cheaper first-order approximation.
        per_sample: take each sample's gradient on its own, for a model whose layers after the
            target normalize with batch statistics (see :func:`score_gradients`).

    Returns:
        ``(N, h, w)`` non-negative maps, differentiable w.r.t. everything ``activations`` depends on.
    """
    if activations.dim() != 4:
        raise ValueError(
            f"activations must be a (N, K, h, w) feature map, got shape {tuple(activations.shape)}; "
            "choose a convolutional target layer."
        )
    grads = score_gradients(scores, activations, create_graph=create_graph, per_sample=per_sample)
    alpha = grads.mean(dim=(2, 3), keepdim=True)
    if not create_graph:
        alpha = alpha.detach()
    return F.relu((alpha * activations).sum(dim=1))
