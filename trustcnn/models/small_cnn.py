"""A small CNN for the embedded decoy-digits data (CPU-trainable in seconds).

Layout (``width = w``)::

    features.conv1  Conv2d(in, w, 3, pad 1)   → features.bn1 → features.relu1 → features.pool1 (2×2 max)
    features.conv2  Conv2d(w, 2w, 3, pad 1)   → features.bn2 → features.relu2 → features.pool2 (2×2 max)
    features.conv3  Conv2d(2w, 4w, 3, pad 1)  → features.relu3          ← the saliency target layer
    head.pool       AdaptiveAvgPool2d(1) → head.flatten → head.fc Linear(4w, num_classes)

With a 32 px input the target conv ``features.conv3`` has an 8×8 output, so Grad-CAM maps have spatial
extent. ``bn1``/``bn2`` are ``nn.Identity`` when ``batch_norm=False``; there is no BatchNorm after the
target conv. All ReLUs are ``inplace=False`` (guided backprop and captum oracles expect that).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from trustcnn.models.base import BuiltModel
from trustcnn.normalization import DECOY_MEAN, DECOY_STD


TARGET_LAYER = "features.conv3"

#: Named trainable depths (``model.trainable``): the target conv alone (the paper's setting), the last block
#: (the target conv and the classifier above it), or the whole network.
DEPTHS: dict[str, list[str] | None] = {
    "last_conv": [TARGET_LAYER],
    "last_block": [TARGET_LAYER, "head.fc"],
    "all": None,  # every module with parameters
}


class SmallCNN(nn.Module):
    """Three 3×3 conv blocks (two 2×2 max-pools) + global-average-pool + linear head."""

    def __init__(
        self, num_classes: int, width: int = 16, in_channels: int = 3, batch_norm: bool = False
    ) -> None:
        super().__init__()
        w = int(width)

        def norm(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if batch_norm else nn.Identity()

        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, w, 3, padding=1),
                bn1=norm(w),
                relu1=nn.ReLU(inplace=False),
                pool1=nn.MaxPool2d(2),
                conv2=nn.Conv2d(w, 2 * w, 3, padding=1),
                bn2=norm(2 * w),
                relu2=nn.ReLU(inplace=False),
                pool2=nn.MaxPool2d(2),
                conv3=nn.Conv2d(2 * w, 4 * w, 3, padding=1),
                relu3=nn.ReLU(inplace=False),
            )
        )
        self.head = nn.Sequential(
            OrderedDict(
                pool=nn.AdaptiveAvgPool2d(1),
                flatten=nn.Flatten(1),
                fc=nn.Linear(4 * w, num_classes),
            )
        )

    def forward(self, x):
        return self.head(self.features(x))


def small_cnn(
    num_classes: int,
    width: int = 16,
    in_channels: int = 3,
    batch_norm: bool = False,
    input_size: int = 32,
    trainable: list[str] | str | None = None,
) -> BuiltModel:
    """Build a :class:`SmallCNN` as a :class:`~trustcnn.models.base.BuiltModel`.

    Args:
        num_classes: output classes.
        width: channels of the first conv (then 2×, 4×).
        in_channels: input channels (3 for the decoy digits, which replicate gray to RGB).
        batch_norm: BatchNorm after ``conv1`` and ``conv2`` (off by default: with it, the few-epoch
            decoy-digits training gave erratic eval-mode accuracy, see experiments/decoy_digits/TUNING.md).
        input_size: the square input resolution (the decoy-digits ``image_size``, default 32).
        trainable: module names whose parameters train, or a depth of :data:`DEPTHS`: ``last_conv``
            (the default, also for ``None``: the target conv, as in the paper's setups), ``last_block``
            (the target conv and the classifier), ``all`` (every module with parameters: end-to-end
            training, e.g. the cross-entropy pretraining that learns the decoy shortcut).

    Returns:
        ``BuiltModel`` with ``target_layer="features.conv3"`` and mean/std 0.5 (the decoy-digits
        normalization).
    """
    net = SmallCNN(num_classes, width=width, in_channels=in_channels, batch_norm=batch_norm)
    if trainable is None:
        trainable = "last_conv"
    if trainable == "all":
        names = [
            n for n, m in net.named_modules()
            if n and any(True for _ in m.parameters(recurse=False))
        ]
    elif isinstance(trainable, str) and trainable in DEPTHS:
        names = list(DEPTHS[trainable])
    elif isinstance(trainable, str):
        names = [trainable]
    else:
        names = list(trainable)
    modules = dict(net.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ValueError(f"model.trainable: no module {', '.join(map(repr, unknown))} in the small CNN; use a depth "
                         f"({', '.join(DEPTHS)}) or module names such as {', '.join(n for n in modules if n)}.")
    return BuiltModel(
        net=net,
        target_layer=TARGET_LAYER,
        trainable=names,
        input_size=int(input_size),
        mean=DECOY_MEAN,
        std=DECOY_STD,
        extra={"width": int(width), "batch_norm": bool(batch_norm)},
    )
