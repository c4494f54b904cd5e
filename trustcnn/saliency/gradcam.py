"""Differentiable, batched Grad-CAM (Selvaraju et al. 2017; eq. 2-3 of the paper)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cam_gradients(activations: torch.Tensor, scores: torch.Tensor, create_graph: bool = True) -> torch.Tensor:
    """``d scores / d activations`` for every sample at once.

    Args:
        activations: ``(N, K, h, w)`` target-layer output, attached to the graph that produced ``scores``.
        scores: ``(N,)`` the target logit of each sample.
        create_graph: keep the graph of the gradient itself, so a loss on a map built from it is
            differentiable to second order.

    Summing the scores gives each sample's gradient in one call because samples do not interact
    (frozen BatchNorm statistics; see DESIGN §2).
    """
    if scores.dim() != 1 or scores.shape[0] != activations.shape[0]:
        raise ValueError(
            f"scores must have shape (N,) = ({activations.shape[0]},), got {tuple(scores.shape)}; "
            "pass the target logit of each sample, e.g. logits.gather(1, target[:, None]).squeeze(1)."
        )
    (grads,) = torch.autograd.grad(scores.sum(), activations, create_graph=create_graph, retain_graph=True)
    return grads


def gradcam(activations: torch.Tensor, scores: torch.Tensor, create_graph: bool = True) -> torch.Tensor:
    """Raw Grad-CAM ``ReLU(sum_k alpha_k A_k)`` with ``alpha = mean_hw d score / d A``.

    Args:
        activations: ``(N, K, h, w)`` target-layer output still attached to the graph.
        scores: ``(N,)`` target logit per sample.
        create_graph: ``True`` (default) keeps ``alpha`` differentiable (full second order, what the
            paper's loss needs). ``False`` detaches ``alpha``: the map is still differentiable through
            ``A`` but not through the weights, a cheaper first-order approximation.

    Returns:
        ``(N, h, w)`` non-negative maps, differentiable w.r.t. everything ``activations`` depends on.
    """
    if activations.dim() != 4:
        raise ValueError(
            f"activations must be a (N, K, h, w) feature map, got shape {tuple(activations.shape)}; "
            "choose a convolutional target layer."
        )
    grads = cam_gradients(activations, scores, create_graph=create_graph)
    alpha = grads.mean(dim=(2, 3), keepdim=True)
    if not create_graph:
        alpha = alpha.detach()
    return F.relu((alpha * activations).sum(dim=1))
