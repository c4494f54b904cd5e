"""Freezing: which parameters train, and keeping frozen normalization statistics frozen.

"Frozen" in trustcnn means frozen *parameters* (``requires_grad=False``) **and** a frozen function: every
module outside the trainable ones stays in eval mode, otherwise a forward pass in train mode would
normalize with batch statistics (changing the function the frozen network computes), overwrite its
ImageNet running mean/var, and draw dropout masks in front of the trained layer.
:func:`set_trainable_mode` puts the trainable modules (and only them) in train mode;
``TrustModule.train`` calls it on every mode change.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from trustcnn.layers import get_module


def _inside(name: str, roots: Iterable[str]) -> bool:
    """Whether module ``name`` is one of ``roots`` or nested in one of them."""
    return any(name == r or name.startswith(r + ".") for r in roots)


def freeze_except(net: nn.Module, trainable: list[str]) -> list[str]:
    """Freeze every parameter of ``net`` except those of the modules named in ``trainable``.

    Args:
        net: the model, modified in place.
        trainable: dotted module names (as in ``net.named_modules()``), each validated with
            :func:`trustcnn.layers.get_module` (an unknown name raises ``LayerNotFoundError``
            listing close matches).

    Returns:
        The names (``net.named_parameters()``) of the parameters left trainable.

    Raises:
        ValueError: ``trainable`` is empty or its modules hold no parameters (nothing would train).
    """
    if isinstance(trainable, str):
        trainable = [trainable]
    trainable = list(trainable or [])
    if not trainable:
        raise ValueError(
            "freeze_except got no trainable modules; name at least one module with parameters "
            "(e.g. `model.trainable=[layer4]`)."
        )
    modules = [get_module(net, name) for name in trainable]
    for p in net.parameters():
        p.requires_grad_(False)
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(True)
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError(
            f"The trainable modules {trainable} hold no parameters (e.g. a ReLU or pooling layer), so nothing "
            "would train. Name a module with parameters, e.g. the convolution before it."
        )
    return names


def set_trainable_mode(net: nn.Module, trainable: list[str], training: bool = True) -> list[str]:
    """Training mode for the modules named in ``trainable`` (and everything inside them), eval mode for
    every other module of ``net``; ``training=False`` puts all of ``net`` in eval mode.

    Returns:
        The names of the modules left in training mode.
    """
    roots = [trainable] if isinstance(trainable, str) else list(trainable or [])
    modules = [get_module(net, name) for name in roots]  # validates, with close matches on a typo
    net.train(False)
    if training:
        for m in modules:
            m.train(True)
    return [name for name, m in net.named_modules() if m.training]
