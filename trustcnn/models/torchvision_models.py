"""Builders for torchvision backbones: the paper's two setups plus any torchvision classifier.

Every builder is a plain function for Hydra (``_target_`` + config kwargs; the caller adds
``num_classes``) and returns a :class:`~trustcnn.models.base.BuiltModel` whose ``net`` has

* its weights in place (torchvision enum via the hub cache / a download, or a local ``weights_path``;
  see :mod:`trustcnn.models.weights`),
* every parameter outside ``trainable`` frozen (:func:`~trustcnn.models.freeze.freeze_except`),
* eval mode. For training call :func:`~trustcnn.models.freeze.set_trainable_mode`
  ``(net, built.trainable)`` instead of ``net.train()``: only the trainable modules switch to training
  mode, so frozen BatchNorms keep their running statistics (``TrustModule`` does this itself).

``BuiltModel.input_size``, ``mean`` and ``std`` come from the weights' torchvision preset (224 px,
ImageNet normalization for the paper's models). ``BuiltModel.extra`` records the architecture, weights,
where they were loaded from, the head module, whether it was replaced, the ImageNet categories when the
pretrained head is kept, and the trainable parameter names.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from trustcnn.layers import get_module
from trustcnn.models.base import BuiltModel
from trustcnn.models.freeze import _inside, freeze_except
from trustcnn.models.weights import TorchvisionNet, build_torchvision_net

log = logging.getLogger(__name__)

__all__ = ["MobileNetV2Transfer", "mobilenet_v2_transfer", "vgg16", "torchvision_classifier", "last_linear"]


# --------------------------------------------------------------------------------------------------
# helpers


def _names(trainable: Sequence[str] | str | None, default: list[str]) -> list[str]:
    if trainable is None:
        return list(default)
    if isinstance(trainable, str):
        return [trainable]
    return [str(t) for t in trainable]


def _set_module(net: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = get_module(net, parent_name) if parent_name else net
    setattr(parent, child, module)


def last_linear(net: nn.Module) -> tuple[str, nn.Linear] | tuple[None, None]:
    """The last ``nn.Linear`` of ``net`` in registration order (the classification head of every
    torchvision classifier except SqueezeNet, whose head is a 1×1 convolution)."""
    found: tuple[str, nn.Linear] | tuple[None, None] = (None, None)
    for name, m in net.named_modules():
        if isinstance(m, nn.Linear):
            found = (name, m)
    return found


def _drop_aux_heads(net: nn.Module) -> None:
    """Inception v3 / GoogLeNet return a namedtuple with auxiliary logits in train mode; trustcnn needs
    one logits tensor, so the auxiliary classifiers are removed after loading (as torchvision does for
    ``aux_logits=False``)."""
    if getattr(net, "aux_logits", False):
        net.aux_logits = False
        for attr in ("AuxLogits", "aux1", "aux2"):
            if getattr(net, attr, None) is not None:
                setattr(net, attr, None)
        log.info("Removed the auxiliary classifiers of %s (trustcnn needs a single logits tensor)", type(net).__name__)


def _finish(
    net: nn.Module,
    tv: TorchvisionNet,
    target_layer: str,
    trainable: list[str],
    **extra: Any,
) -> BuiltModel:
    get_module(net, target_layer)  # validated here too, with close matches on a typo
    params = freeze_except(net, trainable)
    net.eval()
    info = tv.describe()
    info.update(extra)
    info["trainable_parameters"] = params
    info["num_trainable_parameters"] = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return BuiltModel(
        net=net,
        target_layer=target_layer,
        trainable=trainable,
        input_size=tv.input_size,
        mean=tv.mean,
        std=tv.std,
        extra=info,
    )


# --------------------------------------------------------------------------------------------------
# §4.1 transfer setup: MobileNetV2 + a new 1x1 conv


class MobileNetV2Transfer(nn.Module):
    """Frozen MobileNetV2 features → new 1×1 conv + ReLU → global average pool → linear.

    Module names: ``backbone`` (torchvision ``mobilenet_v2().features``, output (N, 1280, H/32, W/32),
    ending in Conv-BN-ReLU6), ``new_conv`` (``new_conv.conv``: ``Conv2d(1280, 256, 1, stride=1)``,
    ``new_conv.relu``: ``ReLU``), ``pool``, ``flatten``, ``classifier`` (``Linear(256, num_classes)``,
    logits; the paper's softmax lives in the loss).
    """

    def __init__(self, backbone: nn.Module, in_channels: int, num_classes: int, new_conv_channels: int = 256):
        super().__init__()
        self.backbone = backbone
        self.new_conv = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(in_channels, new_conv_channels, kernel_size=1, stride=1, bias=True),
                relu=nn.ReLU(inplace=False),
            )
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(new_conv_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.new_conv(self.backbone(x)))))


def mobilenet_v2_transfer(
    num_classes: int,
    weights: str | None = "IMAGENET1K_V1",
    weights_path: str | os.PathLike | None = None,
    new_conv_channels: int = 256,
    target_layer: str = "new_conv",
    trainable: Sequence[str] | None = None,
) -> BuiltModel:
    """The paper's transfer model (§4.1): ImageNet MobileNetV2, frozen, plus a new trained conv layer.

    A new convolution with ``new_conv_channels`` (256) filters, 1×1, stride 1, followed by a ReLU, is
    added after MobileNetV2's last conv layer (the 1280-channel output of ``features``), then global
    average pooling and a linear layer to ``num_classes`` logits.

    Design choices:
        * The ReLU after the new conv mirrors a Keras ``Conv2D(256, 1, activation="relu")``, the usual
          way to add such a layer; without a nonlinearity conv + pool + linear would collapse into one
          linear map of the pooled features.
        * ``target_layer="new_conv"`` is the conv+ReLU block, so Grad-CAM sees the *rectified* feature
          maps, as Keras Grad-CAM does on a conv layer with a fused activation and as Grad-CAM is
          defined (non-negative feature maps A^k; then Grad-CAM is exactly CAM for this
          conv → GAP → linear head). ``target_layer="new_conv.conv"`` gives the pre-ReLU output instead.
        * Only ``new_conv`` and ``classifier`` train (default ``trainable``); the backbone's BatchNorms
          are frozen, statistics included (train with ``set_trainable_mode``).
        * The new layers use PyTorch's default initialization.

    Args:
        num_classes: number of output logits (2 for cats vs dogs).
        weights: torchvision ``MobileNet_V2_Weights`` member name for the backbone, or ``None`` for random.
        weights_path: local state dict of torchvision's ``mobilenet_v2`` (the whole ImageNet classifier,
            ``features.*`` and ``classifier.*``), used instead of the download/cache.
        new_conv_channels: filters of the new conv (256 in the paper).
        target_layer: the saliency layer, ``"new_conv"`` (post-ReLU) or ``"new_conv.conv"`` (pre-ReLU).
        trainable: module names that train; default ``["new_conv", "classifier"]``.
    """
    tv = build_torchvision_net("mobilenet_v2", weights, weights_path)
    base = tv.net
    in_channels = int(getattr(base, "last_channel", 1280))
    net = MobileNetV2Transfer(base.features, in_channels, int(num_classes), int(new_conv_channels))
    return _finish(
        net,
        tv,
        target_layer,
        _names(trainable, ["new_conv", "classifier"]),
        head="classifier",
        head_replaced=True,
        categories=None,
    )


# --------------------------------------------------------------------------------------------------
# §4.2 setup: VGG-16, only block5_conv3 trains


def vgg16(
    num_classes: int = 1000,
    weights: str | None = "IMAGENET1K_V1",
    weights_path: str | os.PathLike | None = None,
    target_layer: str = "features.29",
    trainable: Sequence[str] | None = None,
    head_dropout: bool = False,
) -> BuiltModel:
    """The paper's VGG-16 setup (§4.2): ImageNet VGG-16 with its 1000-way head kept; only
    ``features.28`` (Keras ``block5_conv3``) trains.

    Design choices:
        * ``num_classes`` must be 1000: the paper keeps the pretrained 1000-way head (frozen), and the
          ImageNet-subset data keep the standard 1000-way label indices. For another head use
          ``torchvision_classifier(arch="vgg16", target_layer="features.28", num_classes=N)``, which
          replaces the last linear layer and trains it.
        * ``head_dropout=False`` (default) replaces the two ``Dropout(0.5)`` of torchvision's frozen
          classifier (``classifier.2``, ``classifier.5``) by ``nn.Identity``: the paper's Keras VGG16 has
          no dropout, and in a frozen head it would only add noise to both the loss and the saliency map.
        * ``target_layer="features.29"``: Keras' ``block5_conv3`` output, which is post-ReLU (an in-place
          ReLU in torchvision; ``LayerCapture`` clones the output, so it can be captured), as in
          ``conf/model/vgg16.yaml``. ``features.28`` is the conv's pre-ReLU output.
        * Default ``trainable=["features.28"]`` whatever the target layer (the paper's setting).

    Args:
        num_classes: must be 1000 (see above).
        weights: torchvision ``VGG16_Weights`` member name, or ``None`` for random init.
        weights_path: local state dict of torchvision's ``vgg16`` used instead of the download/cache.
        target_layer: the saliency layer (module name).
        trainable: module names that train; default ``["features.28"]``.
        head_dropout: keep torchvision's classifier dropout layers.
    """
    if int(num_classes) != 1000:
        raise ValueError(
            f"vgg16 keeps the pretrained 1000-way ImageNet head (the paper's setting), so num_classes must be "
            f"1000, got {num_classes}. Keep the standard 1000-way label indices, or use "
            "`trustcnn.models.torchvision_classifier` with arch=vgg16, target_layer=features.28, which replaces "
            "the last linear layer (classifier.6) by a new trainable one with num_classes outputs."
        )
    tv = build_torchvision_net("vgg16", weights, weights_path)
    net = tv.net
    if not head_dropout:
        for name, m in list(net.classifier.named_children()):
            if isinstance(m, nn.Dropout):
                setattr(net.classifier, name, nn.Identity())
    return _finish(
        net,
        tv,
        target_layer,
        _names(trainable, ["features.28"]),
        head="classifier.6",
        head_replaced=False,
        categories=tv.categories,
    )


# --------------------------------------------------------------------------------------------------
# any torchvision classifier


def torchvision_classifier(
    num_classes: int,
    arch: str,
    target_layer: str,
    trainable: Sequence[str] | None = None,
    weights: str | None = "DEFAULT",
    weights_path: str | os.PathLike | None = None,
    replace_head: bool | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> BuiltModel:
    """Any torchvision classification model by name, e.g. ``arch="resnet50", target_layer="layer4"``.

    Args:
        num_classes: number of output logits.
        arch: a name from ``torchvision.models.list_models(module=torchvision.models)`` (an unknown
            name raises ``UnknownArchError`` listing close matches).
        target_layer: the saliency layer, a module name from ``net.named_modules()``.
        trainable: module names that train; default ``[target_layer]`` (plus the head if replaced).
        weights: torchvision weight enum member (``"DEFAULT"``, ``"IMAGENET1K_V2"``, ...) or ``None``.
        weights_path: local state dict of torchvision's default ``arch`` (1000-way head), used
            instead of the download/cache; ``weights`` then only sets input size and normalization.
            Architecture settings torchvision derives from a weight enum are then *not* applied (e.g.
            ``transform_input=True`` for Inception v3 / GoogLeNet, ``image_size`` for 384-px ViTs):
            pass them in ``model_kwargs``.
        replace_head: ``None`` (default): replace the head iff its output count differs from
            ``num_classes``. ``True``: always put a new head (fresh init). ``False``: never; a mismatch
            is an error.
        model_kwargs: extra keyword arguments for ``torchvision.models.get_model``.

    The head is found generically as the last ``nn.Linear`` (``fc`` for ResNets, ``classifier.6`` for
    VGG, ``heads.head`` for ViT, ...); a replacement is a new ``nn.Linear(in_features, num_classes)``
    with PyTorch's default init, and it is added to ``trainable`` (a new head cannot stay frozen at
    random). Inception v3 / GoogLeNet auxiliary classifiers are removed after loading.
    """
    num_classes = int(num_classes)
    tv = build_torchvision_net(arch, weights, weights_path, **dict(model_kwargs or {}))
    net = tv.net
    _drop_aux_heads(net)
    get_module(net, target_layer)
    trainable_names = _names(trainable, [target_layer])

    head_name, head = last_linear(net)
    if head is None:
        # e.g. SqueezeNet, whose classifier is a 1x1 convolution
        current = getattr(net, "num_classes", None)
        if replace_head or current != num_classes:
            raise ValueError(
                f"{arch} has no nn.Linear classification head to replace (its classifier is not a linear layer), "
                f"so num_classes={num_classes} cannot be set generically (the model has {current} outputs). "
                "Use num_classes equal to the pretrained head's outputs, or another arch."
            )
        replaced = False
    else:
        mismatch = head.out_features != num_classes
        if replace_head is False and mismatch:
            raise ValueError(
                f"{arch}'s head {head_name!r} has {head.out_features} outputs but num_classes={num_classes} and "
                "replace_head=False. Set replace_head=null (auto) or true to put a new trainable head."
            )
        replaced = bool(replace_head) or (replace_head is None and mismatch)
        if replaced:
            new_head = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
            new_head.to(device=head.weight.device, dtype=head.weight.dtype)
            _set_module(net, head_name, new_head)
            if not _inside(head_name, trainable_names):
                trainable_names.append(head_name)
            log.info(
                "Replaced %s's head %r by Linear(%d, %d) (trainable)", arch, head_name, head.in_features, num_classes
            )
    return _finish(
        net,
        tv,
        target_layer,
        trainable_names,
        head=head_name,
        head_replaced=replaced,
        categories=None if replaced else tv.categories,
    )
