"""Load a finished run (its resolved config and a checkpoint) back into a ready module."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from trustcnn.checkpoints import read_run_record
from trustcnn.module import TrustModule
from trustcnn.saliency import SALIENCY_METHODS
from trustcnn.train import build_loss, build_model, build_module, instantiate_plain


SHARED_SALIENCY_KEYS = ("second_order", "normalize", "target")


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
