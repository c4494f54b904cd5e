"""Load finished runs (their resolved config and a checkpoint) back into ready modules, and check that several
runs can be compared on one test set (``trustcnn.evaluate``, ``trustcnn.study build``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from trustcnn.checkpoints import read_run_record
from trustcnn.module import TrustModule
from trustcnn.saliency import SALIENCY_METHODS
from trustcnn.train import build_loss, build_model, build_module, instantiate_plain


log = logging.getLogger("trustcnn.runs")

SHARED_SALIENCY_KEYS = ("second_order", "normalize", "target")
# Data keys that change how the test set is loaded, not which images it holds.
LOADER_KEYS = frozenset({"batch_size", "num_workers", "pin_memory", "root"})


@dataclass
class LoadedRun:
    run_dir: Path
    checkpoint: Path
    cfg: DictConfig
    module: TrustModule
    datamodule: pl.LightningDataModule


def find_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """``(run_dir, checkpoint)`` for a ``.ckpt`` file, or for a run directory: the checkpoint the run tested.

    That is the file ``run.json`` names (written after the test), so post-hoc analysis describes the model
    whose numbers are in ``metrics.json``; for a run without it, the file its ``test_checkpoint`` rule
    names (``last.ckpt`` or ``best-*.ckpt``); for runs made before ``test_checkpoint`` existed, which
    tested their best checkpoint, ``best-*.ckpt``.
    """
    path = Path(path)
    if path.is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return run_dir, path
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a run directory nor a checkpoint file; pass a directory made by "
                                "`python -m trustcnn.train` (it holds config.yaml and checkpoints/) or a .ckpt file.")
    record = read_run_record(path)
    if record and record.get("tested_checkpoint"):
        tested = path / record["tested_checkpoint"]
        if not tested.exists():
            raise FileNotFoundError(f"{tested} is missing: run.json says the run tested it. Pass the .ckpt file to "
                                    "evaluate another checkpoint of the run.")
        return path, tested
    rule = "best"
    config_file = path / "config.yaml"
    if config_file.exists():
        rule = OmegaConf.load(config_file).get("test_checkpoint", "best")
    ckpts = path / "checkpoints"
    best, last = sorted(ckpts.glob("best-*.ckpt")), sorted(ckpts.glob("last*.ckpt"))
    candidates = (last or best) if rule == "last" else (best or last)
    if not candidates:
        raise FileNotFoundError(f"No checkpoint in {ckpts}; the run may have failed before its "
                                "first epoch ended (see error.json there).")
    return path, candidates[-1]


def load_run(path: str | Path, data_overrides: dict | None = None, map_location: str = "cpu",
             saliency: str | None = None) -> LoadedRun:
    """Rebuild the run's module from its ``config.yaml`` and load the checkpoint's weights.

    The backbone's pretrained weights are not fetched again (the checkpoint holds every weight), so
    this works offline. ``data_overrides`` replaces keys of the run's data config (e.g. ``root`` or
    ``batch_size``) to evaluate on other data. ``saliency`` (``gradcam`` | ``guided_gradcam``) explains
    the model with another method than it was trained with (``second_order``, ``normalize`` and
    ``target`` are kept), so one baseline serves the maps of both methods.
    """
    if saliency is not None and saliency not in SALIENCY_METHODS:
        raise ValueError(f"Unknown saliency method {saliency!r}; use one of {', '.join(SALIENCY_METHODS)}.")
    run_dir, ckpt = find_checkpoint(path)
    config_file = run_dir / "config.yaml"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} is missing; it is written by `python -m trustcnn.train` at the "
                                "start of every run. Pass a run directory made by trustcnn.")
    cfg = OmegaConf.load(config_file)
    with open_dict(cfg):
        cfg.model.pop("pretrain", None)
        for key in ("weights", "weights_path"):
            if key in cfg.model:
                cfg.model[key] = None
        for key, value in (data_overrides or {}).items():
            cfg.data[key] = value
        if saliency is not None and saliency != cfg.saliency.method:
            # Keep the options every method shares; the other method's own options take their defaults.
            shared = {k: cfg.saliency[k] for k in SHARED_SALIENCY_KEYS if k in cfg.saliency}
            cfg.saliency = OmegaConf.create({"method": saliency, **shared})
    datamodule = instantiate_plain(cfg.data)
    model = build_model(cfg, datamodule.num_classes)
    module = build_module(cfg, model, build_loss(cfg.loss, cfg.get("ablation")), datamodule)
    state = torch.load(ckpt, map_location=map_location, weights_only=True)
    module.load_state_dict(state["state_dict"])
    module.eval()
    return LoadedRun(run_dir, ckpt, cfg, module, datamodule)


def run_name(run: LoadedRun) -> str:
    """The default display name of a run: its directory's name (the checkpoint's stem for a ``.ckpt`` outside
    a ``checkpoints/`` folder)."""
    return run.run_dir.name if run.checkpoint.parent.name == "checkpoints" else run.checkpoint.stem


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
        raise ValueError("Nothing to evaluate: pass at least one run directory or checkpoint "
                         "(baseline=<run dir> and/or 'runs=[<run dir>,...]').")
    for p in paths:
        if not Path(p).exists():
            raise FileNotFoundError(f"{p} does not exist; pass a run directory made by `python -m trustcnn.train` "
                                    "(it holds config.yaml and checkpoints/) or a .ckpt file inside one.")
        if (Path(p) / "multirun.yaml").exists():
            raise ValueError(f"{p} is a multirun sweep directory; pass some of its job directories, or summarize "
                             f"the whole sweep with `python -m trustcnn.report {p}`.")
    if names is not None and len(names) != len(paths):
        raise ValueError(f"names gives {len(names)} names for {len(paths)} models "
                         f"({'baseline + ' if baseline is not None else ''}runs); give one name per model, in order.")
    loaded: dict[str, LoadedRun] = {}
    seen: set[Path] = set()
    for i, p in enumerate(paths):
        run = load_run(p, data_overrides=data_overrides, saliency=saliency)
        if run.checkpoint.resolve() in seen:
            log.warning("%s is given twice; evaluating it once", run.checkpoint)
            continue
        seen.add(run.checkpoint.resolve())
        name = names[i] if names is not None else run_name(run)
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
                             "evaluate runs trained on the same data together, or point them at the same data "
                             "(evaluate: data_root=<dir>; study build: --data-root DIR).")
        differing = sorted(k for k in set(data) | set(ref_data)
                           if k not in LOADER_KEYS and data.get(k) != ref_data.get(k))
        if differing:
            warnings.append(f"{name!r} was trained with other data settings than {reference!r} "
                            f"({', '.join(f'{k}: {data.get(k)} vs {ref_data.get(k)}' for k in differing)}); "
                            f"all models are evaluated on {reference!r}'s test set.")
    return warnings


def load_compared_runs(
    runs: Sequence[str | Path],
    baseline: str | Path | None = None,
    names: Sequence[str] | None = None,
    data_overrides: dict[str, Any] | None = None,
    saliency: str | None = None,
) -> tuple[dict[str, LoadedRun], str | None, list[str]]:
    """:func:`load_models`, then :func:`check_shared_test_set` against the reference run (the baseline, else the
    first run), whose test set every model is compared on; returns ``(models, baseline name or None, warnings)``,
    the warnings also logged."""
    loaded, base = load_models(runs, baseline, names, data_overrides, saliency=saliency)
    warnings = check_shared_test_set(loaded, base or next(iter(loaded)))
    for w in warnings:
        log.warning(w)
    return loaded, base, warnings
