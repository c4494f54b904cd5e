"""What every model builder returns: a classifier plus the facts trustcnn needs about it."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from trustcnn.normalization import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class BuiltModel:
    """A classifier ``net`` (``x (N, 3, H, W) -> logits (N, C)``) and how trustcnn trains it.

    Attributes:
        net: the full classifier, eval-mode semantics expected for every frozen part.
        target_layer: dotted module name (as in ``net.named_modules()``) whose output is the
            saliency layer ``A``.
        trainable: dotted module names whose parameters train; every other parameter is frozen
            (``requires_grad=False``) and every BatchNorm outside them keeps its running statistics.
        input_size: the square input resolution the weights expect.
        mean, std: the input normalization the weights expect.
    """

    net: nn.Module
    target_layer: str
    trainable: list[str]
    input_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    extra: dict = field(default_factory=dict)
