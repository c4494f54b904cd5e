"""Pictures: image | mask | one saliency map per model, for the same images (the paper's Figure 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
# Figures are built without pyplot, so no global backend is switched (a notebook keeps its own) and
# rendering works headless on servers and in CI.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from trustcnn.maps import upsample


def overlay_map(image: np.ndarray, saliency: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """A saliency map over its image, as every trustcnn picture shows it: the image in gray (stretched to
    its own range), the map in ``jet`` colours on the fixed range [0, 1] (values outside are clipped), at
    opacity ``alpha``.

    Args:
        image: ``(H, W, 3)`` in [0, 1].
        saliency: ``(H, W)``; 0 is blue, 1 is red.

    Returns:
        ``(H, W, 3)`` float RGB in [0, 1].
    """
    gray = image.mean(axis=-1, keepdims=True)
    low, high = float(gray.min()), float(gray.max())
    gray = (gray - low) / (high - low) if high > low else np.zeros_like(gray)
    colours = colormaps["jet"](np.clip(saliency, 0.0, 1.0))[..., :3]
    return (1 - alpha) * gray + alpha * colours


def saliency_figure(
    images: torch.Tensor,
    masks: torch.Tensor | None,
    maps: dict[str, torch.Tensor],
    labels: torch.Tensor | None = None,
    preds: dict[str, torch.Tensor] | torch.Tensor | None = None,
    class_names: list[str] | None = None,
) -> Figure:
    """One row per image: the image, its mask (if any), then each model's map over the image.

    Args:
        images: ``(N, 3, H, W)`` in [0, 1] (denormalized).
        masks: ``(N, 1, H, W)`` / ``(N, H, W)`` object masks, or ``None`` / empty.
        maps: model name -> ``(N, h, w)`` maps (any resolution; upsampled to ``H, W``).
        labels, preds: shown in the titles; ``preds`` per model name or one tensor for all.
    """
    n = images.shape[0]
    show_mask = masks is not None and masks.numel() > 0
    cols = 1 + int(show_mask) + len(maps)
    fig = Figure(figsize=(2.2 * cols, 2.2 * n))
    axes = fig.subplots(n, cols, squeeze=False)
    size = tuple(images.shape[-2:])
    name_of = (lambda c: class_names[c] if class_names and c < len(class_names) else str(c))
    pics = images.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        col = 0
        axes[i, col].imshow(pics[i])
        axes[i, col].set_title(f"label {name_of(int(labels[i]))}" if labels is not None else "image", fontsize=8)
        col += 1
        if show_mask:
            axes[i, col].imshow(masks.detach().float().cpu().reshape(n, *size)[i], cmap="gray", vmin=0, vmax=1)
            axes[i, col].set_title("mask", fontsize=8)
            col += 1
        for name, m in maps.items():
            up = upsample(m.detach().float().cpu(), size)[i].numpy()
            axes[i, col].imshow(overlay_map(pics[i], up / max(float(up.max()), 1e-8)))
            pred = preds.get(name) if isinstance(preds, dict) else preds
            title = name if pred is None else f"{name}: pred {name_of(int(pred[i]))}"
            axes[i, col].set_title(title, fontsize=8)
            col += 1
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


def save_saliency_grid(path: str | Path, *args: object, **kwargs: object) -> Path:
    """Render :func:`saliency_figure` to a PNG at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    saliency_figure(*args, **kwargs).savefig(path, dpi=100)
    return path


def saliency_grid_array(*args: object, **kwargs: object) -> np.ndarray:
    """Render :func:`saliency_figure` to an ``(H, W, 3)`` uint8 array (for W&B image panels)."""
    canvas = FigureCanvasAgg(saliency_figure(*args, **kwargs))
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
