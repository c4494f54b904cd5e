"""Post-hoc Grad-CAM maps for evaluation: batched end to end, no graph in front of the target layer.

A post-hoc map needs no parameter gradient, so the model runs without autograd up to the target
layer; autograd starts at the layer's output and the backward spans only the layers after it. The
maps are pytorch-grad-cam's (``GradCAM``, ``ClassifierOutputTarget``): ``ReLU(sum_k alpha_k A_k)``,
min-max normalized per map, resized to the input (bilinear, half-pixel centres as ``cv2.resize``),
normalized again; as torch tensors on the model's device, for the whole batch at once.
"""

from __future__ import annotations

import torch
from torch import nn

from trustcnn.layers import get_module
from trustcnn.maps import upsample
from trustcnn.saliency.capture import uses_batch_statistics
from trustcnn.saliency.gradcam import score_gradients
from trustcnn.saliency.methods import select_targets
from trustcnn.saliency.normalize import normalize_maps


def posthoc_gradcam(
    model: nn.Module,
    target_layer: str,
    x: torch.Tensor,
    targets: torch.Tensor | None = None,
    size: tuple[int, int] | None = None,
    interpolate_mode: str = "bilinear",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grad-CAM maps of a batch, as pytorch-grad-cam computes them, without parameter gradients.

    Args:
        model: a classifier ``x (N, C, H, W) -> logits (N, classes)``.
        target_layer: dotted module name of the layer to explain (its output ``(N, K, h, w)``).
        x: ``(N, C, H, W)`` inputs.
        targets: ``(N,)`` classes to explain; ``None``: the predicted ones.
        size: the maps' resolution; ``None``: the input's. ``(h, w)`` of the layer keeps them unresized.
        interpolate_mode: ``F.interpolate`` mode of the resize.

    Returns:
        ``logits (N, classes)``, ``targets (N,)`` and ``maps (N, *size)`` in [0, 1], all detached.
    """
    layer = get_module(model, target_layer)
    kept: list[torch.Tensor] = []

    def start_graph(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if kept:
            raise RuntimeError(f"Layer {target_layer!r} ran twice in one forward; post-hoc Grad-CAM needs one output.")
        # Autograd from here on: the layers after the target are all the backward needs.
        torch.set_grad_enabled(True)
        leaf = output.detach().requires_grad_(True)
        kept.append(leaf)
        return leaf.clone()  # a later in-place op must not touch the leaf

    handle = layer.register_forward_hook(start_graph)
    try:
        with torch.inference_mode(False), torch.no_grad():
            x = x.clone() if x.is_inference() else x
            if x.dim() == 4 and x.device.type == "cpu":
                # oneDNN then runs the convolutions on channels-last tensors without reordering every layer's
                # input and output: ResNet-18 at batch 16, 0.43 s instead of 0.53-0.59 s on 2 cores, maps
                # equal to 2e-6.
                x = x.contiguous(memory_format=torch.channels_last)
            logits = model(x)
    finally:
        handle.remove()
    if not kept:
        raise RuntimeError(f"Layer {target_layer!r} did not run in the forward of {type(model).__name__}.")
    (activations,) = kept
    with torch.inference_mode(False), torch.enable_grad():
        targets = select_targets(logits, targets, "predicted" if targets is None else "label")
        scores = logits.gather(1, targets[:, None]).squeeze(1)
        # A BatchNorm after the layer that uses batch statistics couples the samples' scores.
        coupled = logits.shape[0] > 1 and any(uses_batch_statistics(m) for m in model.modules())
        grads = score_gradients(scores, activations, create_graph=False, per_sample=coupled)
    with torch.no_grad():
        cam = torch.relu((grads.mean(dim=(2, 3), keepdim=True) * activations).sum(dim=1))
        maps = normalize_maps(cam, "minmax")
        maps = upsample(maps, size or tuple(x.shape[-2:]), interpolate_mode)
        return logits.detach(), targets, normalize_maps(maps, "minmax")
