"""Saliency-quality metrics (DESIGN.md §4) as torchmetrics ``Metric`` subclasses, plus their functionals.

Conventions shared by all: maps ``(N, h, w)`` / ``(N, 1, h, w)``; masks ``(N, H, W)`` / ``(N, 1, H, W)``
with object = 1 (thresholded at 0.5); maps are upsampled bilinearly to the mask resolution; samples
with an empty mask are skipped and counted. See each module's docstring for the exact definitions.

Confidence intervals (95%) come from scipy.stats (:mod:`trustcnn.metrics.stats`): each metric's ``estimate()``
(``estimates()``) gives its value with an interval, from per-sample scores kept with ``keep_scores=True``.
"""

from trustcnn.metrics._utils import (
    PerSampleMean,
    align_maps_to_masks,
    as_maps,
    as_masks,
    minmax_normalize,
    resize_maps,
)
from trustcnn.metrics.case_table import CASE_NAMES, CaseTable, case_counts, case_fractions, format_case_table
from trustcnn.metrics.classification import ClassificationEstimates, classification_estimates, macro_precision_recall
from trustcnn.metrics.faithfulness import BASELINES, DeletionInsertion, deletion_insertion, make_baseline
from trustcnn.metrics.localization import (
    EnergyPointingGame,
    PointingGame,
    SaliencyIoU,
    energy_pointing_game,
    localization_metrics,
    pointing_game,
    saliency_iou,
)
from trustcnn.metrics.similarity import (
    MapRankCorrelation,
    MapSSIM,
    map_ssim,
    randomization_similarity,
    randomize_layer,
    spearman_per_sample,
)
from trustcnn.metrics.stats import Estimate, mean_estimate, wilson_estimate, wilson_interval

__all__ = [
    # localization (masks)
    "PointingGame",
    "EnergyPointingGame",
    "SaliencyIoU",
    "pointing_game",
    "energy_pointing_game",
    "saliency_iou",
    "localization_metrics",
    # case table
    "CaseTable",
    "CASE_NAMES",
    "case_counts",
    "case_fractions",
    "format_case_table",
    # map similarity / randomization check
    "MapSSIM",
    "MapRankCorrelation",
    "map_ssim",
    "spearman_per_sample",
    "randomization_similarity",
    "randomize_layer",
    # faithfulness
    "DeletionInsertion",
    "deletion_insertion",
    "make_baseline",
    "BASELINES",
    # classification with confidence intervals
    "ClassificationEstimates",
    "classification_estimates",
    "macro_precision_recall",
    # statistics
    "Estimate",
    "wilson_interval",
    "wilson_estimate",
    "mean_estimate",
    # shared input handling, the base of per-sample means
    "PerSampleMean",
    "align_maps_to_masks",
    "as_maps",
    "as_masks",
    "resize_maps",
    "minmax_normalize",
]
