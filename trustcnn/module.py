"""``TrustModule``: a frozen pretrained CNN whose one target layer (or new layer) trains on the
paper's saliency-penalized loss, with the saliency map computed differentiably inside the step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassPrecision, MulticlassRecall

from trustcnn.metrics import CaseTable, EnergyPointingGame, localization_metrics
from trustcnn.models.base import BuiltModel
from trustcnn.models.freeze import freeze_except, set_trainable_mode
from trustcnn.saliency import SaliencyMethod, SaliencyOutput, build_saliency


class NonFiniteLossError(FloatingPointError):
    """The training loss (or a saliency map) became NaN/Inf."""


@dataclass
class _FeatureHead:
    """The part of the network after a cached frozen stem, and the saliency method hooked on it (a plain
    object, not a module, so neither enters the module tree)."""

    head: nn.Module
    saliency: SaliencyMethod


class TrustModule(pl.LightningModule):
    """Frozen stem -> target layer -> head, trained with a saliency-aware loss.

    Args:
        model: the built classifier (see :class:`~trustcnn.models.base.BuiltModel`); everything but
            ``model.trainable`` is frozen, BatchNorm statistics included.
        loss: a loss from :mod:`trustcnn.loss` (``loss(logits, labels, maps, masks) -> dict``).
        optimizer: a partial optimizer, called with the trainable parameters.
        num_classes: classes of the data.
        saliency: options of :func:`trustcnn.saliency.build_saliency` (``method``, ``second_order``,
            ``normalize``, ``target``, ...).
        has_masks: whether batches carry object masks (enables pointing-game metrics).
        test_set_names: metric prefix of each test dataloader (e.g. ``["test", "test_consistent"]``).
        pointing_tolerance: pointing-game tolerance in mask pixels.
    """

    def __init__(
        self,
        model: BuiltModel,
        loss: Callable[..., dict[str, torch.Tensor]],
        optimizer: Callable[..., torch.optim.Optimizer],
        num_classes: int,
        saliency: dict[str, Any] | None = None,
        has_masks: bool = False,
        test_set_names: list[str] | tuple[str, ...] = ("test",),
        pointing_tolerance: int = 15,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "loss", "optimizer"])
        self.net = model.net
        self.built = model
        self.loss_fn = loss
        self.optimizer_factory = optimizer
        self.trainable_names = freeze_except(self.net, list(model.trainable))
        saliency = dict(saliency or {"method": "gradcam"})
        method = saliency.pop("method")
        self._saliency_options = (method, saliency)
        self.saliency = build_saliency(method, self.net, model.target_layer, **saliency)
        # Stages whose batches hold the frozen stem's cached features instead of images (see
        # use_feature_cache); their forward runs only the head after the stem.
        self.feature_stages: set[str] = set()
        self._features: _FeatureHead | None = None
        self.has_masks = has_masks
        self.test_set_names = list(test_set_names)

        def classification() -> MetricCollection:
            kw = dict(num_classes=num_classes)
            return MetricCollection({
                "acc": MulticlassAccuracy(average="micro", **kw),
                "precision": MulticlassPrecision(average="macro", **kw),
                "recall": MulticlassRecall(average="macro", **kw),
            })

        # ModuleDict keys may not shadow nn.Module attributes ("train"), hence the suffix.
        stages = ["train", "val", *self.test_set_names]
        self.cls_metrics = nn.ModuleDict({f"{s}_metrics": classification() for s in stages})
        # The same mask metrics as trustcnn.evaluate's (trustcnn.metrics.localization_metrics).
        self.map_metrics = nn.ModuleDict({f"{s}_metrics": localization_metrics(pointing_tolerance)
                                          for s in stages[1:]}) if has_masks else None
        # The reference level of a trivial map: the energy pointing game of a uniform map is the share of
        # each image the mask covers, so a map "beats chance" only above this value.
        self.uniform_map_metrics = nn.ModuleDict({f"{s}_metrics": EnergyPointingGame()
                                                  for s in self.test_set_names}) if has_masks else None
        # Predicted classes per test set, in loader order (for the data's own prediction metrics).
        self.test_predictions: dict[str, list[torch.Tensor]] = {}
        # The paper's Table 3, automated on the test sets when masks exist.
        self.case_tables = nn.ModuleDict({f"{s}_metrics": CaseTable() for s in self.test_set_names}) if has_masks else None
        self.train()

    # Modes: trainable modules follow train()/eval(); frozen ones stay in eval mode always, so their
    # BatchNorm statistics and dropout never change the frozen function. Lightning (>= 2.2) starts `fit`
    # with the module's current mode and restores each sub-module's flag after validation, so the module
    # is put in training mode here and again at every training epoch's start.
    def train(self, mode: bool = True) -> "TrustModule":
        super().train(mode)
        set_trainable_mode(self.net, list(self.built.trainable), mode)
        return self

    def on_train_epoch_start(self) -> None:
        self.train()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The validation metrics of the epoch this checkpoint ends, so the tested checkpoint's own
        # validation values (not the best epoch's) reach metrics.json, sweepers and the report.
        trainer = self._trainer
        if trainer is None:
            return
        checkpoint["val_metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()
                                     if k.startswith("val/") and torch.as_tensor(v).numel() == 1}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def use_feature_cache(self, head: nn.Module, stages: set[str]) -> None:
        """Batches of ``stages`` will hold the output of the frozen stem (``trustcnn.feature_cache``), and run
        through ``head``: the rest of ``net``, made of the same module objects (so the same hooks fire and
        the same parameters train). The head is kept outside the module tree: the checkpoint's state dict
        stays that of ``net``, with or without the cache."""
        method, options = self._saliency_options
        if self._features is not None:
            self._features.saliency.remove()
        self._features = _FeatureHead(head, build_saliency(method, head, self.built.target_layer, **options))
        self.feature_stages = set(stages)

    def explain(self, x: torch.Tensor, labels: torch.Tensor | None = None, create_graph: bool | None = None,
                features: bool = False) -> SaliencyOutput:
        """Logits and maps of one forward pass; works under Lightning's no-grad/inference mode.

        ``features``: ``x`` is the frozen stem's cached output, not images (see :meth:`use_feature_cache`)."""
        saliency = self._features.saliency if features else self.saliency
        with torch.inference_mode(False), torch.enable_grad():
            # Tensors made under inference_mode cannot enter autograd; a clone outside it can.
            x = x.clone() if x.is_inference() else x
            labels = labels.clone() if labels is not None and labels.is_inference() else labels
            return saliency(x, labels, create_graph=create_graph)

    def _stage_step(self, batch: tuple[torch.Tensor, ...], stage: str) -> dict[str, torch.Tensor]:
        x, y, masks = batch
        training = stage == "train"
        features = stage in self.feature_stages
        inputs = None
        if training and self.loss_fn.needs_inputs:  # the loss differentiates through the pixels (loss=rrr)
            inputs = x.detach().requires_grad_()
            logits, maps = self.net(inputs), None
        elif training and not self.loss_fn.needs_maps:
            logits, maps = (self._features.head if features else self.net)(x), None
        else:
            # Evaluation needs maps for Ŝ and the pointing games, but no second-order graph.
            out = self.explain(x, y, create_graph=None if training else False, features=features)
            logits, maps = out.logits, out.maps
            if not training:
                logits, maps = logits.detach(), maps.detach()
        try:
            if self.loss_fn.needs_inputs and not training:
                terms = self._input_gradient_loss(x, y, maps, masks)
            else:
                terms = self.loss_fn(logits, y, maps, masks, **({"inputs": inputs} if inputs is not None else {}))
        except FloatingPointError as err:
            raise NonFiniteLossError(f"{stage} step {self.global_step}: {err}") from err
        if training and not torch.isfinite(terms["loss"]):
            raise NonFiniteLossError(
                f"The training loss became {terms['loss'].item()} at global step {self.global_step} "
                f"(epoch {self.current_epoch}). Training stopped; the last good checkpoint (checkpoints/last.ckpt) "
                "is kept. Lower optim.lr or check the data for NaN/Inf."
            )
        # Stage prefixes are unique per dataloader already, so no "/dataloader_idx_N" suffix.
        log_kw = dict(on_epoch=True, batch_size=float(x.shape[0]), add_dataloader_idx=False)
        values = {name: value.detach() for name, value in terms.items()}
        if maps is not None and "s_hat" not in terms:
            values["s_hat"] = maps.detach().flatten(1).mean()
        # Under DDP the plain tensors are made all-rank means (torchmetrics objects below sync their own
        # states when computed). Training logs every step: one all-reduce of all terms per step gives every
        # rank the global batch's means, logged unsynced with the global batch as weight (Lightning's sync_dist
        # would all-reduce each term, each with a barrier, at every step). Evaluation logs epoch values only:
        # sync_dist reduces each rank's sum(value * batch_size) and count once, at the epoch's end. The count
        # is a float: Lightning (2.6) keeps it in an integer tensor whose mean-sync floors when the ranks'
        # counts differ (unpadded evaluation shards: 180 + 179 images became 2 x 179), which inflated every
        # synced mean (Lightning-AI/pytorch-lightning#21838). Outside DDP neither costs anything.
        if training:
            values, global_batch = self._global_batch_means(values, x.shape[0])
            sync_kw = dict(log_kw, batch_size=global_batch, sync_dist=False)
        else:
            sync_kw = dict(log_kw, sync_dist=True)
        for name, value in values.items():
            self.log(f"{stage}/{name}", value, on_step=training, prog_bar=name == "loss" and training, **sync_kw)
        cls = self.cls_metrics[f"{stage}_metrics"]
        cls.update(logits.detach().argmax(dim=1), y)
        self.log_dict({f"{stage}/{k}": m for k, m in cls.items()}, on_step=False, prog_bar=training, **log_kw)
        if self.map_metrics is not None and not training and masks.numel():
            mm = self.map_metrics[f"{stage}_metrics"]
            mm.update(maps, masks)
            self.log_dict({f"{stage}/{k}": m for k, m in mm.items()}, on_step=False, **log_kw)
            if stage in self.test_set_names:
                self.case_tables[f"{stage}_metrics"].update(logits.argmax(dim=1), y, maps, masks)
                uniform = self.uniform_map_metrics[f"{stage}_metrics"]
                uniform.update(torch.ones_like(maps), masks)
                self.log(f"{stage}/energy_pointing_game_uniform", uniform, on_step=False, **log_kw)
        if stage in self.test_set_names:
            self.test_predictions.setdefault(stage, []).append(logits.detach().argmax(dim=1).cpu())
        return terms

    def _input_gradient_loss(self, x: torch.Tensor, y: torch.Tensor, maps: torch.Tensor | None,
                             masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """An evaluation value of a loss that needs the input gradient (``needs_inputs``): Lightning evaluates
        under no_grad, so the logits are recomputed here with autograd recording from the pixels."""
        with torch.inference_mode(False), torch.enable_grad():
            inputs = (x.clone() if x.is_inference() else x).detach().requires_grad_()
            y = y.clone() if y.is_inference() else y
            masks = masks.clone() if masks.is_inference() else masks
            terms = self.loss_fn(self.net(inputs), y, maps, masks, inputs=inputs)
        return {name: value.detach() for name, value in terms.items()}

    def _global_batch_means(self, values: dict[str, torch.Tensor], batch_size: int
                            ) -> tuple[dict[str, torch.Tensor], float]:
        """``values`` (means over this rank's batch) as means over the batches of all ranks, weighted by their
        sizes, with the global batch size; one all-reduce. Unchanged outside DDP."""
        if self._trainer is None or self.trainer.world_size <= 1:
            return values, float(batch_size)
        weight = torch.tensor(float(batch_size), device=self.device)
        sums = torch.stack([*(v.float() * weight for v in values.values()), weight])
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        total = sums[-1]
        return {name: sums[i] / total for i, name in enumerate(values)}, float(total)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        return self._stage_step(batch, "train")["loss"]

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._stage_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._stage_step(batch, self.test_set_names[dataloader_idx])

    def on_test_epoch_start(self) -> None:
        self.test_predictions = {}

    def _gather_test_predictions(self) -> None:
        """Under DDP, every rank's ``test_predictions`` become those of all ranks, in loader order.

        The test loaders shard the sets without padding (rank ``r`` reads images ``r, r + world_size, ...``;
        ``ShardSampler``), so interleaving the ranks' predictions gives the one-process order."""
        world_size = self.trainer.world_size if self._trainer is not None else 1
        if world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return
        from trustcnn.data.samplers import interleave_shards

        for stage in self.test_set_names:
            local = self.test_predictions.get(stage) or [torch.zeros(0, dtype=torch.long)]
            parts: list[Any] = [None] * world_size
            torch.distributed.all_gather_object(parts, torch.cat(local))  # a collective: every rank, every set
            merged = interleave_shards([p.cpu() for p in parts])
            if len(merged):
                self.test_predictions[stage] = [merged]

    def on_test_epoch_end(self) -> None:
        self._gather_test_predictions()
        if self.case_tables is None:
            return
        for stage in self.test_set_names:
            table = self.case_tables[f"{stage}_metrics"]
            # compute() syncs the counts over the ranks (a collective), so every rank must agree to call it.
            if not bool(self.all_gather(torch.tensor(int(table.update_called), device=self.device)).any()):
                continue
            result = table.compute()
            table.reset()
            for c in range(1, 5):
                for part in ("count", "fraction", "ci_low", "ci_high"):
                    # Already the all-rank value on every rank; sync_dist averages identical values (and keeps
                    # Lightning from warning about an unsynced epoch-level value).
                    self.log(f"{stage}/case{c}_{part}", result[f"case{c}_{part}"].float(), add_dataloader_idx=False,
                             sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.net.parameters() if p.requires_grad]
        return self.optimizer_factory(params)
