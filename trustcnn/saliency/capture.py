"""Capture a named layer's output on any ``nn.Module`` with its autograd graph intact."""

from __future__ import annotations

import difflib
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class LayerNotFoundError(ValueError):
    """A target layer name that is not a module of the model."""


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Return ``model``'s sub-module called ``name`` (dotted, as in ``named_modules()``).

    Raises:
        LayerNotFoundError: naming the bad value, the closest valid names and how to list them all.
    """
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise LayerNotFoundError(
        f"Layer {name!r} is not a module of {type(model).__name__}.{hint} "
        f"Set the target layer to one of the names printed by "
        f"`[n for n, _ in model.named_modules()]` (e.g. `model.target_layer=<name>`)."
    )


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
