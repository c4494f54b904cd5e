"""Operations on saliency-map tensors ``(N, h, w)`` that the saliency methods, the metrics and the
pictures all need (a leaf module importing only torch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def upsample(maps: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize ``(N, h, w)`` maps to ``size`` (``align_corners=False`` for the modes that take it);
    maps already at ``size`` are returned as they are."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(maps.unsqueeze(1), size=size, mode=mode, **kwargs).squeeze(1)
