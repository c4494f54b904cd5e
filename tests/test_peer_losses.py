"""The peer losses of the shortcut study (``rrr``, ``cam_outside``): hand-computed values, finite-difference
checks of their gradients, and their refusals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trustcnn.loss import LOSSES, CamOutsideLoss, RightForRightReasonsLoss


# ------------------------------------------------------------------------------------------- cam_outside


def test_cam_outside_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    maps = torch.tensor([[[1.0, 0.0], [0.5, 0.5]],     # energy 2.0, 1.0 of it outside the mask below
                         [[0.0, 0.0], [0.0, 0.0]]])    # an empty map: fully outside
    masks = torch.tensor([[[1.0, 1.0], [0.0, 0.0]],
                          [[1.0, 0.0], [0.0, 0.0]]])
    terms = CamOutsideLoss(weight=3.0)(logits, labels, maps, masks)
    ce = [math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(1.0))]
    outside = [1.0 / 2.0, 1.0]
    assert terms["outside"].item() == pytest.approx(sum(outside) / 2)
    assert terms["ce"].item() == pytest.approx(sum(ce) / 2)
    assert terms["loss"].item() == pytest.approx(sum(c + 3.0 * o for c, o in zip(ce, outside)) / 2)


def test_cam_outside_resizes_masks_by_area() -> None:
    maps = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    masks = torch.zeros(1, 4, 4)
    masks[0, 0, 0] = 1.0  # a quarter of the top-left map cell is object
    terms = CamOutsideLoss(weight=1.0)(torch.zeros(1, 2), torch.tensor([0]), maps, masks)
    assert terms["outside"].item() == pytest.approx((0.75 + 1.0) / 2)


def test_cam_outside_gradient_matches_finite_differences() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    maps = (torch.rand(3, 5, 5, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    masks = (torch.rand(3, 10, 10, generator=g) > 0.5).double()
    labels = torch.tensor([0, 3, 1])
    loss = CamOutsideLoss(weight=0.7)
    assert torch.autograd.gradcheck(lambda lo, m: loss(lo, labels, m, masks)["loss"], (logits, maps))


# -------------------------------------------------------------------------------------------------- rrr


class Linear(nn.Module):
    """logits = W vec(x) + b: the input gradient of Σ_k log p_k is Σ_k W_k - C Σ_k p_k W_k, by hand."""

    def __init__(self, classes: int, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.fc = nn.Linear(math.prod(shape), classes).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_rrr_by_hand_on_a_linear_model() -> None:
    torch.manual_seed(0)
    shape, classes = (2, 3, 3), 4
    net = Linear(classes, shape)
    x = torch.randn(5, *shape, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 0])
    masks = (torch.rand(5, 3, 3) > 0.5).double()
    terms = RightForRightReasonsLoss(weight=2.5)(net(x), labels, None, masks, inputs=x)

    W = net.fc.weight.detach()  # (C, D)
    p = F.softmax(net(x).detach(), dim=1)  # (N, C)
    grad = W.sum(0) - classes * p @ W  # (N, D): d/dx Σ_k log p_k
    irrelevant = (1 - masks).unsqueeze(1).expand(5, *shape).flatten(1)
    penalty = ((irrelevant * grad) ** 2).sum(1)
    ce = F.cross_entropy(net(x).detach(), labels, reduction="none")
    assert terms["rrr"].item() == pytest.approx(penalty.mean().item(), rel=1e-12)
    assert terms["loss"].item() == pytest.approx((ce + 2.5 * penalty).mean().item(), rel=1e-12)


def test_rrr_parameter_gradient_matches_finite_differences() -> None:
    """The penalty trains the network: its double backward to the weights equals finite differences."""
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    head = nn.Linear(3, 3).double()
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    masks = (torch.rand(2, 6, 6) > 0.5).double()
    labels = torch.tensor([0, 2])
    loss = RightForRightReasonsLoss(weight=1.3)

    def f(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        inputs = x.clone().requires_grad_()
        hidden = torch.tanh(F.conv2d(inputs, weight, bias, padding=1))  # smooth: the penalty has a gradient
        logits = head(hidden.mean(dim=(2, 3)))
        return loss(logits, labels, None, masks, inputs=inputs)["loss"]

    weight, bias = conv.weight.detach().clone().requires_grad_(), conv.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (weight, bias))


def test_rrr_ignores_gradients_inside_the_relevant_region() -> None:
    torch.manual_seed(2)
    net = Linear(3, (1, 4, 4))
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    terms = RightForRightReasonsLoss()(net(x), torch.tensor([0, 1]), None, torch.ones(2, 4, 4), inputs=x)
    assert terms["rrr"].item() == 0.0  # everything is relevant: no penalty


# ------------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("name", ["rrr", "cam_outside"])
def test_weight_must_be_positive_and_finite(name: str, weight: float) -> None:
    with pytest.raises(ValueError, match="loss.weight must be a positive finite number"):
        LOSSES[name](weight=weight)


def test_weight_is_not_bound_by_lambdas_range() -> None:
    assert CamOutsideLoss(weight=25.0).weight == 25.0 and RightForRightReasonsLoss(weight=1e3).weight == 1e3


def test_peer_losses_need_masks_and_rrr_needs_inputs() -> None:
    logits, labels, maps = torch.zeros(2, 3), torch.tensor([0, 1]), torch.rand(2, 4, 4)
    with pytest.raises(ValueError, match="loss=cam_outside needs ground-truth masks"):
        CamOutsideLoss()(logits, labels, maps, None)
    with pytest.raises(ValueError, match="loss=rrr differentiates through the input"):
        RightForRightReasonsLoss()(logits, labels, None, torch.ones(2, 4, 4))
    assert RightForRightReasonsLoss.needs_inputs and not CamOutsideLoss.needs_inputs
