"""``EvaluationModule``: one trained model's test pass of ``python -m trustcnn.evaluate``.

It wraps a run's :class:`~trustcnn.module.TrustModule` (the maps come from its ``explain``, the maps of
training's test step) and updates the :mod:`trustcnn.metrics` ``Metric`` classes, keeping the per-image
scores the confidence intervals need (``keep_scores=True``):

* classification: :class:`~trustcnn.metrics.ClassificationEstimates`;
* with masks: :func:`~trustcnn.metrics.localization_metrics` (pointing game, energy pointing game, the ones
  training's test step logs) plus :class:`~trustcnn.metrics.SaliencyIoU`, and the
  :class:`~trustcnn.metrics.CaseTable`;
* :class:`~trustcnn.metrics.DeletionInsertion` (optional: the slowest part);
* the model-randomization check: :class:`~trustcnn.metrics.MapRankCorrelation` and
  :class:`~trustcnn.metrics.MapSSIM` between the model's maps and those of a copy whose target layer is
  re-initialized (:func:`~trustcnn.metrics.randomize_layer`), explaining the same classes;
* SSIM against the baseline (:class:`~trustcnn.metrics.MapSSIM`): the baseline's maps of the same batch, from
  the baseline's own module (the baseline's pass compares its maps with themselves).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from trustcnn.metrics import (
    CaseTable,
    ClassificationEstimates,
    DeletionInsertion,
    MapRankCorrelation,
    MapSSIM,
    SaliencyIoU,
    localization_metrics,
    randomize_layer,
)
from trustcnn.module import TrustModule
from trustcnn.saliency import SaliencyOutput, build_saliency

# Perturbed images per forward pass of deletion / insertion.
DELETION_INSERTION_BATCH = 256


class EvaluationModule(pl.LightningModule):
    """The test pass of one model: every metric of ``trustcnn.evaluate`` over the test images it is fed.

    Args:
        model: the run's module (weights loaded).
        num_classes: classes of the data.
        image_size: ``(H, W)`` of the test images; every SSIM is computed at this resolution.
        reference: the baseline's module for SSIM against the baseline (``model`` itself for the baseline's
            own pass), or ``None``.
        pointing_tolerance, accurate_threshold, iou_threshold: see :mod:`trustcnn.metrics.localization` and
            :class:`~trustcnn.metrics.CaseTable`.
        faithfulness, di_steps, di_baseline: deletion / insertion (see :class:`~trustcnn.metrics.DeletionInsertion`).
        bootstrap, seed: resamples and seed of the precision / recall intervals; ``seed`` also seeds the target
            layer's re-initialization.
        grid_images: maps (and predictions) of the first images kept for the comparison figure.
    """

    def __init__(
        self,
        model: TrustModule,
        num_classes: int,
        image_size: tuple[int, int],
        reference: TrustModule | None = None,
        pointing_tolerance: int = 15,
        accurate_threshold: float = 0.5,
        iou_threshold: float = 0.5,
        faithfulness: bool = True,
        di_steps: int = 20,
        di_baseline: str = "blur",
        bootstrap: int = 1000,
        seed: int = 0,
        grid_images: int = 8,
    ) -> None:
        super().__init__()
        self.model = model
        self.reference = reference
        self.classification = ClassificationEstimates(num_classes, bootstrap=bootstrap, seed=seed)
        self.localization = localization_metrics(pointing_tolerance, keep_scores=True)
        self.localization.add_metrics({"iou": SaliencyIoU(threshold=iou_threshold, keep_scores=True)})
        self.case_table = CaseTable(accurate_threshold=accurate_threshold)
        self.deletion_insertion = DeletionInsertion(model.net, steps=di_steps, baseline=di_baseline,
                                                    batch_size=DELETION_INSERTION_BATCH,
                                                    keep_scores=True) if faithfulness else None
        self.randomization = nn.ModuleDict({"spearman": MapRankCorrelation(keep_scores=True),
                                            "ssim": MapSSIM(size=image_size, keep_scores=True)})
        self.ssim_vs_baseline = MapSSIM(size=image_size, keep_scores=True) if reference is not None else None
        # The randomized copy explains given classes (target=label): the classes the trained model's maps explain,
        # even where the randomized model predicts another.
        layer = model.built.target_layer
        options = dict(model.hparams.saliency)
        method = options.pop("method")
        self.randomized_net = randomize_layer(model.net, layer, seed=seed)
        self._randomized = build_saliency(method, self.randomized_net, layer, **{**options, "target": "label"})
        self.grid_images = grid_images
        self.grid: dict[str, list[torch.Tensor]] = {"maps": [], "preds": []}
        self.images = 0
        self.results: dict[str, Any] = {}

    def _explain_randomized(self, x: torch.Tensor, targets: torch.Tensor) -> SaliencyOutput:
        with torch.inference_mode(False), torch.enable_grad():
            return self._randomized(x, targets, create_graph=False)

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        x, y, masks = batch
        out = self.model.explain(x, y, create_graph=False)
        maps, targets = out.maps.detach(), out.targets.detach()
        preds = out.logits.detach().argmax(dim=1)
        self.images += x.shape[0]
        self.classification.update(preds, y)
        if masks.numel():
            self.localization.update(maps, masks)
            self.case_table.update(preds, y, maps, masks)
        if self.deletion_insertion is not None:
            self.deletion_insertion.update(x, maps, targets)
        randomized = self._explain_randomized(x, targets).maps.detach()
        for metric in self.randomization.values():
            metric.update(maps, randomized)
        if self.ssim_vs_baseline is not None:
            baseline = maps if self.reference is self.model else \
                self.reference.explain(x, y, create_graph=False).maps.detach()
            self.ssim_vs_baseline.update(maps, baseline)
        if sum(len(m) for m in self.grid["maps"]) < self.grid_images:
            self.grid["maps"].append(maps.cpu())
            self.grid["preds"].append(preds.cpu())

    def on_test_epoch_end(self) -> None:
        """The model's entry of ``evaluation.json`` (estimates as dicts: ``value``, ``ci_low``, ``ci_high``, ``n``,
        ``method``); mask metrics only when the test images had masks."""
        results: dict[str, Any] = {k: asdict(v) for k, v in self.classification.estimates().items()}
        if self.case_table.update_called:
            results.update({name: asdict(metric.estimate()) for name, metric in self.localization.items()})
            results["case_table"] = {k: v.item() for k, v in self.case_table.compute().items()}
        if self.deletion_insertion is not None:
            results.update({k: asdict(v) for k, v in self.deletion_insertion.estimates().items()})
        spearman = self.randomization["spearman"]
        results["randomization"] = {
            "spearman": asdict(spearman.estimate()),
            "ssim": asdict(self.randomization["ssim"].estimate()),
            "spearman_undefined": int(spearman.undefined),
        }
        if self.ssim_vs_baseline is not None:
            results["ssim_vs_baseline"] = asdict(self.ssim_vs_baseline.estimate())
        self.results = results

    def on_test_end(self) -> None:
        self._randomized.remove()

    def grid_outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(maps, predictions)`` of the first ``grid_images`` test images."""
        return (torch.cat(self.grid["maps"])[: self.grid_images], torch.cat(self.grid["preds"])[: self.grid_images])
