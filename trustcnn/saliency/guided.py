"""Guided backpropagation that touches only the saliency gradient, and Guided Grad-CAM."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Literal

import torch
from torch import nn

from trustcnn.maps import upsample
from trustcnn.saliency.capture import Armable
from trustcnn.saliency.gradcam import score_gradients

ChannelReduce = Literal["abs_sum", "abs_max", "sum", "none"]


class _GuidedSwitch:
    """Mutable flag shared by all gates of one model (a plain attribute, not thread-local, because
    CUDA autograd runs backward on its own threads)."""

    def __init__(self) -> None:
        self.on = False


class _GuidedGate(torch.autograd.Function):
    """Identity in forward; in backward, passes only positive gradients while the switch is on.

    Placed right after a ReLU/ReLU6 module, so the full backward through the pair is
    ``relu(grad_out) * relu'(x)``: guided backprop. The backward is written with ordinary
    differentiable ops, so under ``create_graph=True`` the guided gradient is itself part of the graph
    and a loss on it trains the layers it depends on. While the switch is off (the loss gradient),
    the gate is a no-op.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, switch: _GuidedSwitch) -> torch.Tensor:  # type: ignore[override]
        ctx.switch = switch
        # A clone, not a view: downstream in-place ops on a custom Function's view output are illegal.
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        if ctx.switch.on:
            return grad.clamp(min=0), None
        return grad, None


GUIDED_ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)


class GuidedBackprop(Armable):
    """Installs guided-backward gates on every ``ReLU``/``ReLU6`` module of ``model``.

    Works with ``inplace=True`` activations (VGG, MobileNetV2, ResNet): the gate sits on the module's
    output, whatever tensor that is. Functional ``F.relu`` calls are not seen (as in captum); use
    modules. The gates are inert until :meth:`gradients` (or :meth:`active`) turns them on, so the
    same forward pass serves the loss gradient unchanged. With ``armed=False`` no gate is inserted at
    all (no clone per activation) except in forwards run inside :meth:`armed_for`.
    """

    def __init__(self, model: nn.Module, armed: bool = True) -> None:
        self.armed = armed
        self._switch = _GuidedSwitch()
        # Set by GuidedGradCAM's fast path: gives the stem's activations gates that record their masks.
        self.stem_gate: Callable[[nn.Module, torch.Tensor], torch.Tensor | None] | None = None
        self._handles = [
            m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, GUIDED_ACTIVATIONS)
        ]
        if not self._handles:
            raise ValueError(
                f"{type(model).__name__} has no nn.ReLU/nn.ReLU6 modules, so guided backprop would equal "
                "the plain gradient; use saliency=gradcam, or a model built from activation modules."
            )

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not self.armed or not torch.is_grad_enabled():
            return None
        if self.stem_gate is not None:
            gated = self.stem_gate(module, output)
            if gated is not None:
                return gated
        return _GuidedGate.apply(output, self._switch)


    @contextmanager
    def active(self) -> Iterator[None]:
        self._switch.on = True
        try:
            yield
        finally:
            self._switch.on = False

    def gradients(
        self,
        scores: torch.Tensor,
        inputs: torch.Tensor,
        create_graph: bool = True,
        per_sample: bool = False,
        per_sample_from: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Guided-backprop gradient ``(N, C, H, W)`` of each ``scores[i]`` w.r.t. ``inputs[i]``.

        ``per_sample`` (and ``per_sample_from``) for a model that normalizes with batch statistics
        between the input and the scores: see :func:`~trustcnn.saliency.gradcam.score_gradients`.
        The gates' backward is plain tensor code, so it also runs batched over the samples' gradients.
        """
        with self.active():
            return score_gradients(
                scores, inputs, create_graph=create_graph, per_sample=per_sample, per_sample_from=per_sample_from
            )

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def reduce_channels(maps: torch.Tensor, how: ChannelReduce = "abs_sum") -> torch.Tensor:
    """``(N, C, H, W) -> (N, H, W)``: ``abs_sum`` (default; sign-agnostic evidence per pixel),
    ``abs_max``, ``sum`` (signed), or ``none`` (returns the input unchanged)."""
    if how == "abs_sum":
        return maps.abs().sum(dim=1)
    if how == "abs_max":
        return maps.abs().amax(dim=1)
    if how == "sum":
        return maps.sum(dim=1)
    if how == "none":
        return maps
    raise ValueError(f"Unknown channel reduction {how!r}; use one of abs_sum, abs_max, sum, none.")


def guided_gradcam(
    cam: torch.Tensor,
    guided_grads: torch.Tensor,
    interpolate_mode: str = "bilinear",
    channel_reduce: ChannelReduce = "abs_sum",
) -> torch.Tensor:
    """Guided Grad-CAM: ``guided_grads (N, C, H, W) * upsample(cam (N, h, w))`` at input resolution.

    With ``channel_reduce="none"`` the ``(N, C, H, W)`` product is returned (what captum's
    ``GuidedGradCam`` returns); otherwise the channels are reduced to an ``(N, H, W)`` map.
    """
    up = upsample(cam, tuple(guided_grads.shape[-2:]), interpolate_mode)
    return reduce_channels(guided_grads * up.unsqueeze(1), channel_reduce)
