"""Freezing: which parameters train, and keeping frozen normalization statistics frozen.

"Frozen" in trustcnn means frozen *parameters* (``requires_grad=False``) **and** frozen running
statistics: a BatchNorm outside the trainable modules must stay in eval mode, otherwise a forward pass
in train mode would both normalize with batch statistics (changing the function the frozen network
computes) and overwrite its ImageNet running mean/var. ``nn.Module.train()`` switches every sub-module
to train mode, so :func:`set_frozen_batchnorm_eval` must be called after *every* ``net.train()``
(in Lightning: in ``on_train_epoch_start`` / an overridden ``train()``, since validation toggles modes).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd

from trustcnn.saliency.capture import get_module


def _inside(name: str, roots: Iterable[str]) -> bool:
    """Whether module ``name`` is one of ``roots`` or nested in one of them."""
    return any(name == r or name.startswith(r + ".") for r in roots)


def freeze_except(net: nn.Module, trainable: list[str]) -> list[str]:
    """Freeze every parameter of ``net`` except those of the modules named in ``trainable``.

    Args:
        net: the model, modified in place.
        trainable: dotted module names (as in ``net.named_modules()``), each validated with
            :func:`trustcnn.saliency.capture.get_module` (an unknown name raises ``LayerNotFoundError``
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


def set_frozen_batchnorm_eval(net: nn.Module, trainable: list[str], *, dropout: bool = False) -> list[str]:
    """Put every normalization layer with running statistics outside ``trainable`` in eval mode.

    Covers every ``_NormBase`` subclass (all BatchNorm variants, ``SyncBatchNorm``, and InstanceNorm with
    ``track_running_stats``); BatchNorms *inside* a trainable module keep the mode ``net`` is in (they
    train normally). Call it after every ``net.train()``; calling it in eval mode is harmless.

    Args:
        net: the model, modified in place.
        trainable: dotted module names that train (as given to :func:`freeze_except`).
        dropout: also put Dropout layers outside ``trainable`` in eval mode (off by default: dropout
            in front of a trained layer is regularization; set it when frozen dropout should not
            perturb the frozen function).

    Returns:
        The names of the modules switched to eval mode.
    """
    if isinstance(trainable, str):
        trainable = [trainable]
    roots = list(trainable or [])
    for name in roots:
        get_module(net, name)  # validate, with close matches on a typo
    switched = []
    kinds: tuple[type, ...] = (_NormBase, _DropoutNd) if dropout else (_NormBase,)
    for name, m in net.named_modules():
        if isinstance(m, kinds) and not _inside(name, roots):
            m.eval()
            switched.append(name)
    return switched
