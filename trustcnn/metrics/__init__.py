"""Saliency-quality metrics (DESIGN.md §4) as torchmetrics ``Metric`` subclasses, plus their functionals.

Conventions shared by all: maps ``(N, h, w)`` / ``(N, 1, h, w)``; masks ``(N, H, W)`` / ``(N, 1, H, W)``
with object = 1 (thresholded at 0.5); maps are upsampled bilinearly to the mask resolution; samples
with an empty mask are skipped and counted. See each module's docstring for the exact definitions.
"""

from trustcnn.metrics._utils import align_maps_to_masks, as_maps, as_masks, minmax_normalize, resize_maps
from trustcnn.metrics.case_table import CASE_NAMES, CaseTable, case_counts, case_fractions, format_case_table
from trustcnn.metrics.faithfulness import BASELINES, DeletionInsertion, deletion_insertion, make_baseline
from trustcnn.metrics.localization import (
    EnergyPointingGame,
    PointingGame,
    SaliencyIoU,
    energy_pointing_game,
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
from trustcnn.metrics.stats import wilson_interval

__all__ = [
    # localization (masks)
    "PointingGame",
    "EnergyPointingGame",
    "SaliencyIoU",
    "pointing_game",
    "energy_pointing_game",
    "saliency_iou",
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
    # statistics
    "wilson_interval",
    # shared input handling
    "align_maps_to_masks",
    "as_maps",
    "as_masks",
    "resize_maps",
    "minmax_normalize",
]
