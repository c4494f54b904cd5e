"""Capture a named layer's output on any ``nn.Module`` with its autograd graph intact, and watch
which normalization layers couple the samples of a forward through batch statistics."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.instancenorm import _InstanceNorm

from trustcnn.layers import get_module


class Armable:
    """A hook owner whose hooks act only while ``armed``; :meth:`armed_for` arms it for one block."""

    armed: bool = True

    @contextmanager
    def armed_for(self) -> Iterator[None]:
        previous, self.armed = self.armed, True
        try:
            yield
        finally:
            self.armed = previous


class LayerCapture(Armable):
    """Forward hook that records the output ``A`` of one layer, ready for ``autograd.grad``.

    The hook keeps the layer's original output as ``activations`` and hands a *clone* downstream, so a
    later in-place op (``ReLU(inplace=True)``, ``out += identity``) modifies the clone, never the
    captured tensor, while gradients still flow from the output back to ``activations``. When nothing
    upstream requires grad (a fully frozen stem), the output is made a leaf that requires grad so the
    Grad-CAM gradient exists.

    Use as a context manager or call :meth:`remove` when done::

        with LayerCapture(net, "features.28") as cap:
            logits = net(x)
            A = cap.activations  # (N, K, h, w)

    With ``armed=False`` the hook stays passive (no clone, nothing kept) except inside
    :meth:`armed_for`, so plain forwards of the same model (a cross-entropy step, a deletion curve)
    neither pay for the clone nor keep the last batch's graph alive.
    """

    def __init__(self, model: nn.Module, layer: str, armed: bool = True) -> None:
        self.layer_name = layer
        self.layer = get_module(model, layer)
        self.activations: torch.Tensor | None = None
        self.armed = armed
        self._handle = self.layer.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not self.armed:
            return None
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"Layer {self.layer_name!r} returns {type(output).__name__}, not a tensor; "
                "choose a layer whose output is a (N, K, h, w) feature map."
            )
        if torch.is_grad_enabled() and not output.requires_grad:
            output.requires_grad_(True)
        self.activations = output
        return output.clone()

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> "LayerCapture":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def uses_batch_statistics(module: nn.Module) -> bool:
    """Whether ``module``, run now, normalizes with statistics of the whole batch, so that each
    sample's output depends on every other sample of the batch.

    True for the BatchNorm family (``_NormBase``) in train mode, or without running statistics
    (``track_running_stats=False``, which uses the batch's statistics in eval mode too), as
    ``F.batch_norm`` decides. InstanceNorm shares the base class but normalizes each sample on its
    own; GroupNorm and LayerNorm are per-sample and not ``_NormBase`` at all.
    """
    return (
        isinstance(module, _NormBase)
        and not isinstance(module, _InstanceNorm)
        and (module.training or module.running_mean is None)
    )


@dataclass(frozen=True)
class BatchCoupling:
    """Which saliency gradients of one forward must be taken sample by sample, because a
    normalization layer that used batch statistics lies on their way (see
    :func:`~trustcnn.saliency.gradcam.score_gradients`).

    Attributes:
        layer: a score may depend on another sample's target-layer output (Grad-CAM's gradient).
        input: a score may depend on another sample's input (the guided gradient).
        input_via: the target layer's input, when every such normalization layer ran inside the
            target layer: the samples then interact only through this tensor, and the input
            gradient needs the per-sample backward only from the scores down to it.
    """

    layer: bool
    input: bool
    input_via: torch.Tensor | None = None


class BatchStatisticsProbe(Armable):
    """Watches, in armed forwards, the normalization layers that normalize with batch statistics
    (:func:`uses_batch_statistics`): how many ran before ``layer`` was called, inside it, and after
    it returned, and keeps ``layer``'s input; :meth:`coupling` turns that into a
    :class:`BatchCoupling`.

    A layer that ran after ``layer`` may lie between ``layer``'s output and the logits, so it may
    couple the samples in the gradient w.r.t. that output; one that ran before it or inside it
    cannot. A later layer on a parallel branch counts too: the answer errs on the safe side.
    """

    def __init__(self, model: nn.Module, layer: str, armed: bool = True) -> None:
        self.armed = armed
        self.reset()
        target = get_module(model, layer)
        self._handles = [
            m.register_forward_hook(self._count)
            for m in model.modules()
            if isinstance(m, _NormBase) and not isinstance(m, _InstanceNorm)
        ]
        self._handles.append(target.register_forward_pre_hook(self._enter))
        self._handles.append(target.register_forward_hook(self._leave))

    def reset(self) -> None:
        """Forget the last forward; call before each one."""
        self.total = self.on_entry = self.on_exit = self.calls = 0
        self.layer_input: torch.Tensor | None = None
        self._input_version = 0

    def _count(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if self.armed and uses_batch_statistics(module):
            self.total += 1

    def _enter(self, module: nn.Module, inputs: tuple) -> None:
        if not self.armed:
            return
        self.calls += 1
        self.on_entry = self.total
        single = len(inputs) == 1 and isinstance(inputs[0], torch.Tensor)
        self.layer_input = inputs[0] if single else None
        # An in-place op on the input after this point would move a gradient hook off this value.
        self._input_version = inputs[0]._version if single else 0

    def _leave(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if self.armed:
            self.on_exit = self.total

    def coupling(self, n: int) -> BatchCoupling:
        """What the last armed forward, of ``n`` samples, coupled. Hands the kept input over (it is
        not kept any longer, like :class:`LayerCapture`'s activations)."""
        via, self.layer_input = self.layer_input, None
        if n < 2 or self.total == 0:
            return BatchCoupling(layer=False, input=False)
        after = self.total - self.on_exit
        only_inside = (
            self.on_entry == 0
            and after == 0
            and self.calls == 1
            and via is not None
            and via.requires_grad
            and via._version == self._input_version
        )
        return BatchCoupling(layer=after > 0, input=True, input_via=via if only_inside else None)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
