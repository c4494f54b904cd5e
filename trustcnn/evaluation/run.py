"""The work of ``python -m trustcnn.evaluate``: one Lightning test pass per model on one shared test set.

:func:`evaluate` loads the baseline and the runs and checks they share a test set
(:func:`trustcnn.runs.load_compared_runs`), runs ``trainer.test`` with an
:class:`~trustcnn.evaluation.module.EvaluationModule` per model on the first (real) test set of the reference
run's data (the baseline's, else the first run's), and writes
``evaluation.json``, ``evaluation.md`` and ``saliency_comparison.png`` (image | mask | each model's map: the
paper's Figure 2).

Every estimate has a 95% confidence interval: accuracy and the pointing game Wilson, macro precision / recall a
percentile bootstrap over images, every mean of per-image scores (energy pointing game, IoU, deletion /
insertion AUC, the randomization check's ρ and SSIM, SSIM against the baseline) the t-interval.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Subset

from trustcnn.allocator import use_cpu_allocator
from trustcnn.evaluation.module import EvaluationModule
from trustcnn.evaluation.output import write_results
from trustcnn.runs import load_compared_runs

log = logging.getLogger("trustcnn.evaluate")


def test_loader(datamodule: pl.LightningDataModule, max_images: int | None) -> DataLoader:
    """The loader of the data's first test set, limited to its first ``max_images`` images (same batches)."""
    loader = datamodule.main_test_dataloader()
    if max_images is None or max_images >= len(loader.dataset):
        return loader
    return DataLoader(Subset(loader.dataset, range(max_images)), batch_size=loader.batch_size, shuffle=False,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory)


def _first_images(loader: DataLoader, n: int) -> tuple[torch.Tensor, ...]:
    """``(images, labels, masks)`` of the loader's first ``n`` images."""
    parts: list[tuple[torch.Tensor, ...]] = []
    for batch in loader:
        parts.append(tuple(batch))
        if sum(len(p[0]) for p in parts) >= n:
            break
    return tuple(torch.cat(t)[:n] for t in zip(*parts))


def _accelerator(device: str | None) -> tuple[str, int | list[int]]:
    """Lightning's ``(accelerator, devices)`` for ``device``: ``cpu``, ``cuda``, ``cuda:<index>``, or ``None``
    (CUDA when available)."""
    if device is None:
        return ("gpu" if torch.cuda.is_available() else "cpu"), 1
    kind, _, index = str(device).partition(":")
    if kind == "cpu" and not index:
        return "cpu", 1
    if kind == "cuda" and (not index or index.isdigit()):
        return "gpu", [int(index)] if index else 1
    raise ValueError(f"device must be cpu, cuda or cuda:<index>, got {device!r}; set e.g. device=cpu.")


def evaluate(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Evaluate ``cfg.baseline`` and ``cfg.runs`` on the same test images; write the outputs into ``out_dir``.

    ``cfg`` is the ``eval`` config (``conf/eval.yaml``, where every key is described).

    Returns:
        ``{"data": ..., "settings": ..., "baseline": name | None, "warnings": [...], "models": {name: {...}},
        "out_dir": str}`` where each model holds ``accuracy``, ``precision``, ``recall`` (and with masks
        ``pointing_game``, ``energy_pointing_game``, ``iou``, ``case_table``), ``deletion_auc``,
        ``insertion_auc``, ``randomization`` and ``ssim_vs_baseline``; each estimate a dict with ``value``,
        ``ci_low``, ``ci_high``, ``n``, ``method``. ``evaluation.json`` is this without ``out_dir``, NaN as
        ``null``.

    Raises:
        ValueError, FileNotFoundError: a setting, run or data that cannot be evaluated (the message says which).
    """
    use_cpu_allocator(cfg.get("cpu_allocator", "reuse"))
    max_images = cfg.max_images
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}; set e.g. max_images=100, or max_images=null "
                         "for the whole test set.")
    accelerator, devices = _accelerator(cfg.device)
    overrides: dict[str, Any] = {}
    if cfg.data_root is not None:
        overrides["root"] = str(cfg.data_root)
    if cfg.batch_size is not None:
        overrides["batch_size"] = int(cfg.batch_size)
    names = list(cfg.names) if cfg.names is not None else None
    # saliency=<method> selects conf/saliency/<method>.yaml; the run keeps its own shared options (load_run).
    method = cfg.saliency.method if cfg.saliency is not None else None
    loaded, base, warnings = load_compared_runs(list(cfg.runs or []), cfg.baseline, names, overrides, saliency=method)
    reference = base or next(iter(loaded))
    datamodule = loaded[reference].datamodule
    loader = test_loader(datamodule, max_images)
    if len(loader.dataset) == 0:
        raise ValueError(f"The test set of {reference!r} is empty; nothing to evaluate.")
    images, labels, masks = _first_images(loader, max(1, cfg.grid_images))
    image_size = tuple(images.shape[-2:])
    tolerance = cfg.pointing_tolerance
    if tolerance is None:
        tolerance = int(loaded[reference].cfg.get("pointing_tolerance", 15))

    models: dict[str, Any] = {}
    grid_maps: dict[str, torch.Tensor] = {}
    grid_preds: dict[str, torch.Tensor] = {}
    baseline_module = loaded[base].module if base is not None else None
    for name, run in loaded.items():
        module = EvaluationModule(
            run.module, datamodule.num_classes, image_size, reference=baseline_module,
            pointing_tolerance=tolerance, accurate_threshold=cfg.accurate_threshold,
            iou_threshold=cfg.iou_threshold, faithfulness=cfg.faithfulness, di_steps=cfg.di_steps,
            di_baseline=cfg.di_baseline, bootstrap=cfg.bootstrap, seed=cfg.seed, grid_images=cfg.grid_images,
        )
        # Maps need gradients: Lightning's test loop runs under no_grad instead of inference_mode.
        trainer = pl.Trainer(accelerator=accelerator, devices=devices, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, inference_mode=False)
        log.info("Evaluating %s (%s)", name, run.checkpoint)
        trainer.test(module, dataloaders=loader, verbose=False)
        models[name] = {"run_dir": str(run.run_dir), "checkpoint": str(run.checkpoint), "loss": run.cfg.loss.name,
                        "saliency": run.cfg.saliency.method, **module.results}
        if cfg.grid_images > 0:
            grid_maps[name], grid_preds[name] = module.grid_outputs()
        device = trainer.strategy.root_device

    has_masks = "case_table" in models[reference]
    result: dict[str, Any] = {
        "data": {
            "datamodule": type(datamodule).__name__, "reference_run": reference,
            "test_set": datamodule.test_set_names[0], "test_set_size": len(datamodule.main_test_dataloader().dataset),
            "num_images": module.images, "num_classes": datamodule.num_classes, "has_masks": has_masks,
        },
        "settings": {
            "pointing_tolerance": tolerance, "accurate_threshold": cfg.accurate_threshold,
            "iou_threshold": cfg.iou_threshold, "faithfulness": cfg.faithfulness, "di_steps": cfg.di_steps,
            "di_baseline": cfg.di_baseline, "bootstrap": cfg.bootstrap, "seed": cfg.seed,
            "device": str(device),
            "ssim_size": list(image_size),
        },
        "baseline": base,
        "warnings": warnings,
        "models": models,
    }
    out = write_results(result, out_dir)
    if cfg.grid_images > 0:
        from trustcnn.viz import save_saliency_grid

        save_saliency_grid(out / "saliency_comparison.png", datamodule.denormalize(images), masks, grid_maps,
                           labels=labels, preds=grid_preds, class_names=getattr(datamodule, "class_names", None))
    return {**result, "out_dir": str(out)}
