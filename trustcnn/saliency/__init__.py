"""Differentiable, batched saliency maps computed inside the training step (pure torch)."""

from trustcnn.saliency.capture import (
    BatchCoupling,
    BatchStatisticsProbe,
    LayerCapture,
    uses_batch_statistics,
)
from trustcnn.saliency.gradcam import gradcam, score_gradients
from trustcnn.saliency.guided import GuidedBackprop, guided_gradcam, reduce_channels
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
from trustcnn.saliency.posthoc import posthoc_gradcam

__all__ = [
    "BatchCoupling",
    "BatchStatisticsProbe",
    "LayerCapture",
    "uses_batch_statistics",
    "score_gradients",
    "gradcam",
    "GuidedBackprop",
    "guided_gradcam",
    "reduce_channels",
    "SALIENCY_METHODS",
    "GradCAM",
    "GuidedGradCAM",
    "SaliencyMethod",
    "SaliencyOutput",
    "build_saliency",
    "select_targets",
    "normalize_maps",
    "posthoc_gradcam",
]
