"""Per-sample normalization of saliency maps to [0, 1]."""

from __future__ import annotations

from typing import Literal

import torch

Normalization = Literal["max", "minmax", "none"]
EPS = 1e-7


def normalize_maps(maps: torch.Tensor, how: Normalization = "max", eps: float = EPS) -> torch.Tensor:
    """Normalize each map of ``(N, ...)`` independently (differentiably).

    - ``max`` (default): ``L / max(L)``. Keeps zero at zero, so ``mean(L)`` is the fraction of the
      peak saliency spread over the image (the Ŝ of the paper); needs non-negative maps.
    - ``minmax``: ``(L - min) / (max - min)``, the convention of pytorch-grad-cam.
    - ``none``: unchanged (only valid for losses that do not need [0, 1]).

    An all-zero map (e.g. a Grad-CAM whose weighted sum is negative everywhere) stays all zero.
    """
    if how == "none":
        return maps
    # In float32 even under mixed precision: EPS = 1e-7 is below float16's resolution near 1 and the
    # peak's division is where bf16 loses the most; the [0, 1] map the losses need comes out exact.
    maps = maps.float() if maps.dtype in (torch.float16, torch.bfloat16) else maps
    flat = maps.flatten(1)
    if how == "max":
        peak = flat.amax(dim=1).clamp(min=0)
        return maps / (peak + eps).view(-1, *[1] * (maps.dim() - 1))
    if how == "minmax":
        low = flat.amin(dim=1).view(-1, *[1] * (maps.dim() - 1))
        span = flat.amax(dim=1).view_as(low) - low
        return (maps - low) / (span + eps)
    raise ValueError(f"Unknown saliency normalization {how!r}; use one of max, minmax, none.")
