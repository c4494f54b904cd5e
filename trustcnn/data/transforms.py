"""The photo transforms (applied jointly to an image and its mask) and their inverse normalization."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2


def build_transforms(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    augment: bool = True,
    resize_ratio: float = 256 / 224,
    crop_scale: tuple[float, float] = (0.5, 1.0),
) -> v2.Compose:
    """The photo transform, applied jointly to an image and (optionally) a ``tv_tensors.Mask``.

    - train with ``augment``: ``RandomResizedCrop(image_size, scale=crop_scale)`` + horizontal flip;
    - otherwise (eval, or train without augment): ``Resize(round(image_size * resize_ratio))`` +
      ``CenterCrop(image_size)`` (the classic 256 → 224 evaluation crop, scaled to ``image_size``).

    Masks follow the same geometry with nearest-neighbour interpolation and are left unnormalized.
    """
    ops: list = [v2.ToImage()]
    if train and augment:
        ops += [
            v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True),
            v2.RandomHorizontalFlip(0.5),
        ]
    else:
        ops += [
            v2.Resize(int(round(image_size * resize_ratio)), antialias=True),
            v2.CenterCrop(image_size),
        ]
    ops += [
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        v2.Normalize(list(mean), list(std)),
    ]
    return v2.Compose(ops)


def denormalize(
    x: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Undo ``Normalize(mean, std)`` on ``(3, H, W)`` or ``(N, 3, H, W)`` and clamp to [0, 1]."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x * s + m).clamp(0.0, 1.0)
