"""Differentiable, batched saliency maps computed inside the training step (pure torch)."""

from trustcnn.saliency.capture import LayerCapture, LayerNotFoundError, get_module
from trustcnn.saliency.gradcam import cam_gradients, gradcam
from trustcnn.saliency.guided import GuidedBackprop, guided_gradcam, reduce_channels, upsample
from trustcnn.saliency.methods import (
    SALIENCY_METHODS,
    GradCAM,
    GuidedGradCAM,
    SaliencyMethod,
    SaliencyOutput,
    build_saliency,
    select_targets,
)
from trustcnn.saliency.normalize import normalize_maps

__all__ = [
    "LayerCapture",
    "LayerNotFoundError",
    "get_module",
    "cam_gradients",
    "gradcam",
    "GuidedBackprop",
    "guided_gradcam",
    "reduce_channels",
    "upsample",
    "SALIENCY_METHODS",
    "GradCAM",
    "GuidedGradCAM",
    "SaliencyMethod",
    "SaliencyOutput",
    "build_saliency",
    "select_targets",
    "normalize_maps",
]
