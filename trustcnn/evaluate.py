"""Post-hoc evaluation of trained runs on one shared test set (DESIGN §4).

``python -m trustcnn.evaluate --baseline RUN --runs RUN [RUN ...] --out DIR`` loads each run (a run
directory of ``python -m trustcnn.train`` or a ``.ckpt`` inside one), explains the same test images with
every model and writes ``evaluation.json``, ``evaluation.md`` (also printed) and
``saliency_comparison.png`` (image | mask | each model's map: the paper's Figure 2).

Metrics per model, all on the first (real) test set of the data, each with a 95% confidence interval:

* **Classification**: accuracy (Wilson interval); macro precision and macro recall (torchmetrics'
  convention: a class absent from both labels and predictions is left out of the average), with a
  percentile **bootstrap** interval over test images (``bootstrap`` resamples, fixed seed) — a macro
  average is not one binomial proportion, so Wilson does not apply to it.
* **With masks**: pointing game (hit rate, Wilson), energy pointing game and IoU of the map thresholded
  at 0.5 after min-max normalization (means over images, t-interval), and the paper's case table
  (:class:`~trustcnn.metrics.CaseTable`: "accurate map" = energy pointing game >= ``accurate_threshold``;
  Wilson interval per cell).
* **Always**: deletion / insertion AUC (:func:`~trustcnn.metrics.deletion_insertion`, lower / higher is
  better); the model-randomization sanity check (Adebayo et al. 2018): the target layer is re-initialized
  (:func:`~trustcnn.metrics.randomize_layer`) and the randomized model's map *of the same target class*
  is compared with the trained model's (Spearman ρ and SSIM; lower = the map depends on the weights, as
  it should); and SSIM (eq. 11) of each model's maps against the baseline's on the same images.

Continuous per-image scores (energy pointing game, IoU, AUCs, SSIM, ρ) get the t-interval
``mean ± t(0.975, n-1)·sd/√n`` over images. Every SSIM is computed at the input image resolution, the
setting of the paper's maps (see :func:`~trustcnn.metrics.map_ssim`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf

from trustcnn.metrics import (
    CASE_NAMES,
    CaseTable,
    deletion_insertion,
    energy_pointing_game,
    map_ssim,
    pointing_game,
    randomize_layer,
    saliency_iou,
    spearman_per_sample,
)
from trustcnn.metrics.stats import Estimate, mean_estimate, wilson_estimate
from trustcnn.runs import LoadedRun, load_run
from trustcnn.saliency import build_saliency

log = logging.getLogger("trustcnn.evaluate")

# Data keys that change how the test set is loaded, not which images it holds.
LOADER_KEYS = frozenset({"batch_size", "num_workers", "pin_memory", "root"})


def macro_precision_recall(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Macro precision and recall of ``(..., C, C)`` confusion matrices (rows = label, cols = prediction).

    torchmetrics' ``average="macro"`` convention: a class's score is 0 when its denominator is 0, and a
    class with no label and no prediction (tp + fp + fn = 0) is left out of the average.
    """
    tp = np.diagonal(confusion, axis1=-2, axis2=-1).astype(np.float64)
    predicted = confusion.sum(axis=-2)
    actual = confusion.sum(axis=-1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    present = (predicted + actual) > 0
    count = np.maximum(present.sum(axis=-1), 1)
    return (precision * present).sum(axis=-1) / count, (recall * present).sum(axis=-1) / count


def classification_estimates(
    preds: np.ndarray, labels: np.ndarray, num_classes: int, bootstrap: int = 1000, seed: int = 0
) -> dict[str, Estimate]:
    """Accuracy (Wilson) and macro precision / recall (percentile bootstrap over images)."""
    preds, labels = np.asarray(preds, np.int64), np.asarray(labels, np.int64)
    n, c = labels.size, num_classes
    accuracy = wilson_estimate(int((preds == labels).sum()), n)
    confusion = np.bincount(labels * c + preds, minlength=c * c).reshape(c, c)
    precision, recall = macro_precision_recall(confusion)
    boot_p, boot_r = [], []
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // max(n, 1))  # resample indices in chunks to bound memory
    for start in range(0, bootstrap, chunk):
        b = min(chunk, bootstrap - start)
        idx = rng.integers(0, n, size=(b, n))
        codes = (labels[idx] * c + preds[idx]) + np.arange(b)[:, None] * c * c
        cm = np.bincount(codes.ravel(), minlength=b * c * c).reshape(b, c, c)
        p, r = macro_precision_recall(cm)
        boot_p.append(p)
        boot_r.append(r)
    out = {"accuracy": accuracy}
    for name, value, boot in (("precision", precision, boot_p), ("recall", recall, boot_r)):
        if bootstrap and n:
            low, high = np.percentile(np.concatenate(boot), [2.5, 97.5])
        else:
            low = high = math.nan
        out[name] = Estimate(float(value), float(low), float(high), n, f"bootstrap({bootstrap})")
    return out


def _run_name(loaded: LoadedRun) -> str:
    return loaded.run_dir.name if loaded.checkpoint.parent.name == "checkpoints" else loaded.checkpoint.stem


def load_models(
    runs: Sequence[str | Path],
    baseline: str | Path | None = None,
    names: Sequence[str] | None = None,
    data_overrides: dict[str, Any] | None = None,
    saliency: str | None = None,
) -> tuple[dict[str, LoadedRun], str | None]:
    """Load the baseline (first) and each run; returns ``({name: run}, baseline name or None)``.

    ``names`` name the models in order (baseline first when given); by default the run directory's
    name, made unique with ``#2``, ``#3`` suffixes. A run given twice (the baseline repeated in
    ``runs``) is loaded once. ``saliency`` explains every model with that method (see :func:`load_run`).
    """
    paths = ([baseline] if baseline is not None else []) + list(runs)
    if not paths:
        raise ValueError("Nothing to evaluate: pass at least one run directory or checkpoint (--runs / --baseline).")
    for p in paths:
        if not Path(p).exists():
            raise FileNotFoundError(f"{p} does not exist; pass a run directory made by `python -m trustcnn.train` "
                                    "(it holds config.yaml and checkpoints/) or a .ckpt file inside one.")
        if (Path(p) / "multirun.yaml").exists():
            raise ValueError(f"{p} is a multirun sweep directory; pass some of its job directories, or summarize "
                             f"the whole sweep with `python -m trustcnn.report {p}`.")
    if names is not None and len(names) != len(paths):
        raise ValueError(f"--names gives {len(names)} names for {len(paths)} models "
                         f"({'baseline + ' if baseline is not None else ''}runs); give one name per model, in order.")
    loaded: dict[str, LoadedRun] = {}
    seen: set[Path] = set()
    for i, p in enumerate(paths):
        run = load_run(p, data_overrides=data_overrides, saliency=saliency)
        if run.checkpoint.resolve() in seen:
            log.warning("%s is given twice; evaluating it once", run.checkpoint)
            continue
        seen.add(run.checkpoint.resolve())
        name = names[i] if names is not None else _run_name(run)
        unique, k = name, 2
        while unique in loaded:
            unique, k = f"{name}#{k}", k + 1
        loaded[unique] = run
    return loaded, (next(iter(loaded)) if baseline is not None else None)


def check_shared_test_set(loaded: dict[str, LoadedRun], reference: str) -> list[str]:
    """Raise ``ValueError`` when the runs' test sets cannot be the same; return warnings for lesser differences.

    Hard errors: another datamodule class, number of classes or test-set size. A difference in any other
    data key (e.g. ``seed``, which may change the split) is a warning: all models are evaluated on the
    reference run's test images, which another run may have trained on.
    """
    ref = loaded[reference]
    ref_data = OmegaConf.to_container(ref.cfg.data, resolve=True)
    ref_size = len(ref.datamodule.main_test_dataloader().dataset)
    warnings: list[str] = []
    for name, run in loaded.items():
        if name == reference:
            continue
        data = OmegaConf.to_container(run.cfg.data, resolve=True)
        size = len(run.datamodule.main_test_dataloader().dataset)
        problems = []
        if data.get("_target_") != ref_data.get("_target_"):
            problems.append(f"data {data.get('_target_')} vs {ref_data.get('_target_')}")
        if run.datamodule.num_classes != ref.datamodule.num_classes:
            problems.append(f"{run.datamodule.num_classes} vs {ref.datamodule.num_classes} classes")
        if size != ref_size:
            problems.append(f"test set of {size} vs {ref_size} images")
        if problems:
            raise ValueError(f"Runs {name!r} and {reference!r} do not share a test set ({'; '.join(problems)}); "
                             "evaluate runs trained on the same data together, or pass --data-root to point "
                             "them at the same data.")
        differing = sorted(k for k in set(data) | set(ref_data)
                           if k not in LOADER_KEYS and data.get(k) != ref_data.get(k))
        if differing:
            warnings.append(f"{name!r} was trained with other data settings than {reference!r} "
                            f"({', '.join(f'{k}: {data.get(k)} vs {ref_data.get(k)}' for k in differing)}); "
                            f"all models are evaluated on {reference!r}'s test set.")
    return warnings


def _randomized_saliency(run: LoadedRun, seed: int) -> Any:
    """The run's saliency method on a copy of its net whose target layer is re-initialized.

    It explains given classes (``target="label"``), so the randomized map explains the same class as
    the trained model's map even where the randomized prediction differs.
    """
    layer = run.module.built.target_layer
    options = OmegaConf.to_container(run.cfg.saliency, resolve=True)
    method = options.pop("method")
    options["target"] = "label"
    net = randomize_layer(run.module.net, layer, seed=seed).eval()
    return build_saliency(method, net, layer, **options)


def _explain(method: Any, x: torch.Tensor, labels: torch.Tensor) -> Any:
    with torch.inference_mode(False), torch.enable_grad():
        return method(x, labels, create_graph=False)


def _collect(
    loaded: dict[str, LoadedRun],
    baseline: str | None,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    max_images: int | None,
    pointing_tolerance: int,
    accurate_threshold: float,
    iou_threshold: float,
    faithfulness: bool,
    di_steps: int,
    di_baseline: str,
    randomization_seed: int,
    grid_images: int,
) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor], int, bool]:
    """One pass over the test images: per-model per-image scores, case tables and the grid's maps."""
    per: dict[str, dict[str, Any]] = {
        name: {"preds": [], "labels": [], "scores": {}, "cases": CaseTable(accurate_threshold=accurate_threshold)}
        for name in loaded
    }
    randomized = {name: _randomized_saliency(run, randomization_seed) for name, run in loaded.items()}
    grid: dict[str, list[torch.Tensor]] = {"images": [], "labels": [], "masks": []}
    grid.update({f"map:{n}": [] for n in loaded} | {f"pred:{n}": [] for n in loaded})
    seen, has_masks = 0, False

    def add(name: str, key: str, values: torch.Tensor) -> None:
        per[name]["scores"].setdefault(key, []).append(values.detach().double().cpu())

    for x, y, masks in loader:
        if max_images is not None and seen >= max_images:
            break
        take = x.shape[0] if max_images is None else min(x.shape[0], max_images - seen)
        x, y, masks = x[:take].to(device), y[:take].to(device), masks[:take].to(device)
        seen += take
        with_masks = masks.numel() > 0
        has_masks |= with_masks
        size = tuple(x.shape[-2:])
        maps_of: dict[str, torch.Tensor] = {}
        for name, run in loaded.items():
            out = run.module.explain(x, y, create_graph=False)
            logits, maps, targets = out.logits.detach(), out.maps.detach(), out.targets.detach()
            maps_of[name] = maps
            preds = logits.argmax(dim=1)
            per[name]["preds"].append(preds.cpu())
            per[name]["labels"].append(y.cpu())
            if with_masks:
                add(name, "pointing_game", pointing_game(maps, masks, tolerance=pointing_tolerance))
                add(name, "energy_pointing_game", energy_pointing_game(maps, masks))
                add(name, "iou", saliency_iou(maps, masks, threshold=iou_threshold))
                per[name]["cases"].update(preds.cpu(), y.cpu(), maps.cpu(), masks.cpu())
            if faithfulness:
                with torch.no_grad():
                    di = deletion_insertion(run.module.net, x, maps, targets, steps=di_steps, baseline=di_baseline,
                                            batch_size=256)
                add(name, "deletion_auc", di["deletion_auc"])
                add(name, "insertion_auc", di["insertion_auc"])
            rand_maps = _explain(randomized[name], x, targets).maps.detach()
            add(name, "randomization_spearman", spearman_per_sample(maps, rand_maps))
            add(name, "randomization_ssim", map_ssim(maps, rand_maps, size=size))
            if baseline is not None:
                add(name, "ssim_vs_baseline", map_ssim(maps, maps_of[baseline], size=size))
            if sum(t.shape[0] for t in grid[f"map:{name}"]) < grid_images:
                grid[f"map:{name}"].append(maps.cpu())
                grid[f"pred:{name}"].append(preds.cpu())
        if sum(t.shape[0] for t in grid["images"]) < grid_images:
            grid["images"].append(x.cpu())
            grid["labels"].append(y.cpu())
            grid["masks"].append(masks.cpu())
    for method in randomized.values():
        method.remove()
    grid_tensors = {k: torch.cat(v)[:grid_images] for k, v in grid.items() if v}
    return per, grid_tensors, seen, has_masks


def save_comparison_grid(
    path: str | Path,
    loaded: dict[str, LoadedRun],
    n: int = 8,
    device: str | torch.device = "cpu",
    datamodule: Any | None = None,
) -> Path:
    """PNG grid of the first ``n`` test images: image | mask | each model's map (the paper's Figure 2).

    ``datamodule`` defaults to the first run's.
    """
    from trustcnn.viz import save_saliency_grid

    datamodule = datamodule or next(iter(loaded.values())).datamodule
    images, labels, masks = [], [], []
    for x, y, m in datamodule.main_test_dataloader():
        images.append(x)
        labels.append(y)
        masks.append(m)
        if sum(t.shape[0] for t in images) >= n:
            break
    x, y, m = (torch.cat(t)[:n].to(device) for t in (images, labels, masks))
    maps, preds = {}, {}
    for name, run in loaded.items():
        out = run.module.to(device).explain(x, y, create_graph=False)
        maps[name], preds[name] = out.maps.detach(), out.logits.detach().argmax(1)
    return save_saliency_grid(path, datamodule.denormalize(x), m, maps, labels=y, preds=preds,
                              class_names=getattr(datamodule, "class_names", None))


def evaluate_runs(
    runs: Sequence[str | Path],
    baseline: str | Path | None = None,
    names: Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    data_root: str | None = None,
    max_images: int | None = None,
    batch_size: int | None = None,
    faithfulness: bool = True,
    di_steps: int = 20,
    di_baseline: str = "blur",
    pointing_tolerance: int | None = None,
    accurate_threshold: float = 0.5,
    iou_threshold: float = 0.5,
    bootstrap: int = 1000,
    seed: int = 0,
    grid_images: int = 8,
    device: str | None = None,
    saliency: str | None = None,
) -> dict[str, Any]:
    """Evaluate the baseline and runs on the same test images; write the outputs when ``out_dir`` is given.

    Args:
        runs: run directories or ``.ckpt`` files.
        baseline: the reference model of "SSIM vs baseline" (the ``loss=ce`` run), or ``None``.
        names: one display name per model, baseline first.
        out_dir: where ``evaluation.json``, ``evaluation.md`` and ``saliency_comparison.png`` go.
        data_root, batch_size: override the runs' data config (``data.root``, ``data.batch_size``).
        max_images: evaluate only the first ``max_images`` test images (all by default).
        faithfulness: compute deletion / insertion AUCs (the slowest part: ``2·(di_steps+1)`` forwards per image).
        di_steps, di_baseline: see :func:`~trustcnn.metrics.deletion_insertion`.
        pointing_tolerance: pointing-game tolerance in mask pixels (default: the first run's
            ``pointing_tolerance``, else 15).
        accurate_threshold: the case table's "accurate map" threshold on the energy pointing game.
        iou_threshold: binarization level of the min-max-normalized map for IoU.
        bootstrap, seed: resamples and seed of the precision / recall intervals; ``seed`` also seeds the
            layer re-initialization of the randomization check.
        grid_images: images in ``saliency_comparison.png``.
        device: ``"cpu"``, ``"cuda"``...; default CUDA when available.
        saliency: explain every model with this method (``gradcam`` | ``guided_gradcam``) instead of the
            one each was trained with, e.g. to compare a cross-entropy baseline's Guided Grad-CAM maps.

    Returns:
        ``{"data": ..., "settings": ..., "baseline": name | None, "warnings": [...], "models": {name: {...}}}``
        where each model holds ``accuracy``, ``precision``, ``recall`` (and with masks ``pointing_game``,
        ``energy_pointing_game``, ``iou``, ``case_table``), ``deletion_auc``, ``insertion_auc``,
        ``randomization`` and ``ssim_vs_baseline``; each estimate a dict with ``value``, ``ci_low``,
        ``ci_high``, ``n``, ``method``. NaN is written as ``null`` in the JSON.
    """
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    overrides: dict[str, Any] = {}
    if data_root is not None:
        overrides["root"] = str(data_root)
    if batch_size is not None:
        overrides["batch_size"] = int(batch_size)
    loaded, base = load_models(runs, baseline, names, overrides, saliency=saliency)
    reference = base or next(iter(loaded))
    warnings = check_shared_test_set(loaded, reference)
    for w in warnings:
        log.warning(w)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for run in loaded.values():
        run.module.to(dev).eval()
    ref = loaded[reference]
    if pointing_tolerance is None:
        pointing_tolerance = int(ref.cfg.get("pointing_tolerance", 15))
    datamodule = ref.datamodule
    per, grid, n_images, has_masks = _collect(
        loaded, base, datamodule.main_test_dataloader(), dev, max_images, pointing_tolerance, accurate_threshold,
        iou_threshold, faithfulness, di_steps, di_baseline, seed, grid_images,
    )
    if n_images == 0:
        raise ValueError(f"The test set of {reference!r} is empty; nothing to evaluate.")

    models: dict[str, Any] = {}
    for name, run in loaded.items():
        p = per[name]
        scores = {k: torch.cat(v) for k, v in p["scores"].items()}
        entry: dict[str, Any] = {
            "run_dir": str(run.run_dir), "checkpoint": str(run.checkpoint),
            "loss": run.cfg.loss.name, "saliency": run.cfg.saliency.method,
        }
        cls = classification_estimates(torch.cat(p["preds"]).numpy(), torch.cat(p["labels"]).numpy(),
                                       datamodule.num_classes, bootstrap, seed)
        entry.update({k: asdict(v) for k, v in cls.items()})
        if has_masks:
            hits = scores["pointing_game"]
            scored = hits[~torch.isnan(hits)]
            entry["pointing_game"] = asdict(wilson_estimate(int(scored.sum()), scored.numel()))
            entry["energy_pointing_game"] = asdict(mean_estimate(scores["energy_pointing_game"]))
            entry["iou"] = asdict(mean_estimate(scores["iou"]))
            entry["case_table"] = {k: v.item() for k, v in p["cases"].compute().items()}
        if faithfulness:
            entry["deletion_auc"] = asdict(mean_estimate(scores["deletion_auc"]))
            entry["insertion_auc"] = asdict(mean_estimate(scores["insertion_auc"]))
        rho = scores["randomization_spearman"]
        entry["randomization"] = {
            "spearman": asdict(mean_estimate(rho)),
            "ssim": asdict(mean_estimate(scores["randomization_ssim"])),
            "spearman_undefined": int(torch.isnan(rho).sum()),
        }
        if base is not None:
            entry["ssim_vs_baseline"] = asdict(mean_estimate(scores["ssim_vs_baseline"]))
        models[name] = entry

    test_size = len(datamodule.main_test_dataloader().dataset)
    result = {
        "data": {
            "datamodule": type(datamodule).__name__, "reference_run": reference, "test_set": datamodule.test_set_names[0],
            "test_set_size": test_size, "num_images": n_images, "num_classes": datamodule.num_classes,
            "has_masks": has_masks,
        },
        "settings": {
            "pointing_tolerance": pointing_tolerance, "accurate_threshold": accurate_threshold,
            "iou_threshold": iou_threshold, "faithfulness": faithfulness, "di_steps": di_steps,
            "di_baseline": di_baseline, "bootstrap": bootstrap, "seed": seed, "device": str(dev),
            "ssim_size": list(grid["images"].shape[-2:]) if "images" in grid else None,
        },
        "baseline": base,
        "warnings": warnings,
        "models": models,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "evaluation.json").write_text(json.dumps(_json_safe(result), indent=2))
        (out / "evaluation.md").write_text(format_markdown(result))
        if "images" in grid:
            from trustcnn.viz import save_saliency_grid

            save_saliency_grid(out / "saliency_comparison.png", datamodule.denormalize(grid["images"]),
                               grid["masks"], {n: grid[f"map:{n}"] for n in loaded}, labels=grid["labels"],
                               preds={n: grid[f"pred:{n}"] for n in loaded},
                               class_names=getattr(datamodule, "class_names", None))
        result["out_dir"] = str(out)
    return result


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _fmt(est: dict[str, Any] | None) -> str:
    return "—" if est is None else Estimate(**{**est, **{k: math.nan if est[k] is None else est[k]
                                                          for k in ("value", "ci_low", "ci_high")}}).format()


def format_case_table_markdown(models: dict[str, dict[str, Any]],
                               skipped: str = "scored / skipped (empty mask)") -> str:
    """The paper's Table 3 as Markdown: one row per case, one column per model (fraction [95% CI] (count));
    the last row counts the scored and skipped samples, under the label ``skipped``."""
    names = [n for n, m in models.items() if "case_table" in m]
    lines = ["| case | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for c in range(1, 5):
        cells = []
        for n in names:
            t = models[n]["case_table"]
            est = {"value": t[f"case{c}_fraction"], "ci_low": t[f"case{c}_ci_low"], "ci_high": t[f"case{c}_ci_high"],
                   "n": int(t["total"]), "method": "wilson"}
            cells.append(f"{_fmt(est)} ({int(t[f'case{c}_count'])})")
        lines.append(f"| {c}: {CASE_NAMES[c]} | " + " | ".join(cells) + " |")
    lines.append(f"| {skipped} | "
                 + " | ".join(f"{int(models[n]['case_table']['total'])} / {int(models[n]['case_table']['skipped'])}"
                              for n in names) + " |")
    return "\n".join(lines)


def format_markdown(result: dict[str, Any]) -> str:
    """Markdown tables of :func:`evaluate_runs`'s result (what ``evaluation.md`` holds)."""
    data, settings, models = result["data"], result["settings"], result["models"]
    base = result["baseline"]

    def table(title: str, columns: list[tuple[str, str]], note: str = "") -> list[str]:
        lines = [f"## {title}", ""]
        if note:
            lines += [note, ""]
        lines.append("| model | " + " | ".join(c for c, _ in columns) + " |")
        lines.append("|---|" + "---|" * len(columns))
        for name, m in models.items():
            cells = []
            for _, key in columns:
                value: Any = m
                for part in key.split("."):
                    value = value.get(part) if isinstance(value, dict) else None
                cells.append(_fmt(value))
            label = f"{name} (baseline)" if name == base else name
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return lines + [""]

    out = [
        "# Evaluation", "",
        f"{data['num_images']} of {data['test_set_size']} images of the `{data['test_set']}` set of "
        f"{data['datamodule']} ({data['num_classes']} classes), data of run `{data['reference_run']}`. "
        "Values: estimate [95% CI].", "",
    ]
    out += [f"> warning: {w}" for w in result["warnings"]] + ([""] if result["warnings"] else [])
    out += [
        "| model | loss | saliency | run |", "|---|---|---|---|",
        *[f"| {n} | {m['loss']} | {m['saliency']} | `{m['run_dir']}` |" for n, m in models.items()], "",
    ]
    out += table("Classification", [("accuracy", "accuracy"), ("macro precision", "precision"),
                                     ("macro recall", "recall")],
                 f"Accuracy: Wilson interval. Macro precision / recall: percentile bootstrap over images "
                 f"({settings['bootstrap']} resamples).")
    if data["has_masks"]:
        out += table("Localization (masks)", [("pointing game", "pointing_game"),
                                               ("energy pointing game", "energy_pointing_game"),
                                               ("IoU", "iou")],
                     f"Pointing game: tolerance {settings['pointing_tolerance']} px, Wilson interval. Energy "
                     f"pointing game and IoU (min-max-normalized map >= {settings['iou_threshold']}): mean over "
                     "images, t-interval.")
        out += ["## Case table (paper's Table 3)", "",
                f"Accurate map: energy pointing game >= {settings['accurate_threshold']}. Fraction of scored "
                "images [Wilson 95% CI] (count).", "", format_case_table_markdown(models), ""]
    if settings["faithfulness"]:
        out += table("Faithfulness", [("deletion AUC ↓", "deletion_auc"), ("insertion AUC ↑", "insertion_auc")],
                     f"{settings['di_steps']} steps, `{settings['di_baseline']}` substrate, probability of the "
                     "explained class; mean over images, t-interval.")
    out += table("Model-randomization sanity check", [("Spearman ρ ↓", "randomization.spearman"),
                                                      ("SSIM ↓", "randomization.ssim")],
                 "Maps of the trained model vs. the same model with its target layer re-initialized, explaining "
                 "the same class. Lower = the map depends on the learned weights (as it should). Images with a "
                 "constant map have no ρ: " + ", ".join(f"{n}: {m['randomization']['spearman_undefined']}"
                                                          for n, m in models.items()) + ".")
    if base is not None:
        out += table(f"SSIM vs. baseline `{base}` (eq. 11)", [("SSIM", "ssim_vs_baseline")],
                     f"Maps at the image resolution {settings['ssim_size']}, min-max normalized; mean over images, "
                     "t-interval.")
    else:
        out += ["SSIM vs. baseline: no baseline given (--baseline).", ""]
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trustcnn.evaluate",
        description="Evaluate trained trustcnn runs on one shared test set: classification with 95%% CIs, "
                    "localization and case table (with masks), deletion/insertion, randomization check, "
                    "SSIM vs the baseline; writes evaluation.json, evaluation.md and saliency_comparison.png.",
    )
    p.add_argument("--runs", nargs="+", default=[], metavar="RUN", help="run directories or .ckpt files")
    p.add_argument("--baseline", metavar="RUN", help="baseline run (e.g. loss=ce) for SSIM vs baseline")
    p.add_argument("--names", nargs="+", metavar="NAME", help="display names, baseline first, then --runs in order")
    p.add_argument("--out", metavar="DIR", help="output directory (default outputs/evaluate/<time>)")
    p.add_argument("--data-root", metavar="DIR", help="override data.root of every run")
    p.add_argument("--max-images", type=int, metavar="N", help="evaluate the first N test images only")
    p.add_argument("--batch-size", type=int, metavar="N", help="override data.batch_size")
    p.add_argument("--no-deletion-insertion", action="store_true", help="skip deletion/insertion (the slow part)")
    p.add_argument("--di-steps", type=int, default=20, help="deletion/insertion steps (default 20)")
    p.add_argument("--di-baseline", default="blur", choices=["blur", "zeros", "mean"])
    p.add_argument("--pointing-tolerance", type=int, help="pointing-game tolerance in mask px (default: the run's)")
    p.add_argument("--accurate-threshold", type=float, default=0.5,
                   help="case table: energy pointing game at or above which a map is accurate (default 0.5)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for precision/recall CIs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid-images", type=int, default=8)
    p.add_argument("--device", help="cpu | cuda | cuda:1 ... (default: cuda when available)")
    p.add_argument("--saliency", choices=["gradcam", "guided_gradcam"],
                   help="explain every model with this method (default: each run's own)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m trustcnn.evaluate``: parse arguments, evaluate, print the Markdown."""
    from trustcnn.cli import full_error, report_failure

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.runs and not args.baseline:
        parser.error("pass at least one run: --runs RUN [RUN ...] and/or --baseline RUN")
    out = args.out or Path("outputs") / "evaluate" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    try:
        result = evaluate_runs(
            args.runs, baseline=args.baseline, names=args.names, out_dir=out, data_root=args.data_root,
            max_images=args.max_images, batch_size=args.batch_size, faithfulness=not args.no_deletion_insertion,
            di_steps=args.di_steps, di_baseline=args.di_baseline, pointing_tolerance=args.pointing_tolerance,
            accurate_threshold=args.accurate_threshold, bootstrap=args.bootstrap, seed=args.seed,
            grid_images=args.grid_images, device=args.device, saliency=args.saliency,
        )
    except (FileNotFoundError, ValueError) as err:  # a run, directory or option that does not fit: exit 2
        if full_error():
            raise
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    except Exception as err:  # a failure at run time: one message, exit 1, no traceback (trustcnn.cli)
        report_failure(parser.prog, err, fix="give --out a writable directory" if isinstance(err, OSError) else None)
    print(format_markdown(result))
    print(f"\nWritten to {result['out_dir']}: evaluation.json, evaluation.md, saliency_comparison.png", file=sys.stderr)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[%(name)s][%(levelname)s] %(message)s")
    main()
