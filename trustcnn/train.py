"""Train one configuration: ``python -m trustcnn.train [overrides]`` (``-m`` for sweeps).

``train(cfg)`` does the work and is what tests call; ``run_job(cfg)`` is one Hydra job (the task function
``trustcnn.cli`` hands it to): it returns the optimized metric so sweepers can use it, keeps a multirun going
when one job fails, and runs a configuration a sweep repeats once. The command line itself (``--help``,
completion, errors) is :mod:`trustcnn.cli`.
"""

from __future__ import annotations

if __name__ == "__main__":
    # `python -m trustcnn.train`: the command line is handled by trustcnn.cli, which imports this module (and
    # torch) only when a job runs, so --help, shell completion and config errors answer in a second.
    from trustcnn.cli import train_main

    train_main()
    raise SystemExit(0)

import inspect
import json
import logging
import sys
import traceback
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from trustcnn.allocator import use_cpu_allocator
from trustcnn.checkpoints import RUN_RECORD, check_test_checkpoint, metric_mode
from trustcnn.feature_cache import check_mode as check_feature_cache_mode, prepare_feature_cache
from trustcnn.launch import job_threads, resume_after_requeue
from trustcnn.loss import LOSSES
from trustcnn.models.base import BuiltModel
from trustcnn.models.pretrain import ensure_pretrained
from trustcnn.module import TrustModule
from trustcnn.layers import get_module

log = logging.getLogger("trustcnn.train")

FINAL_METRICS = ("acc", "precision", "recall", "pointing_game", "energy_pointing_game", "energy_pointing_game_uniform",
                 "s_hat", "decoy_following_rate", "decoy_conflicts",
                 *(f"case{c}_{part}" for c in range(1, 5) for part in ("count", "fraction", "ci_low", "ci_high")))


def instantiate_plain(config: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets the builder's own error through.

    Hydra wraps every exception raised inside a ``_target_`` in an ``InstantiationException``; the
    user needs the builder's message (e.g. an unknown layer with its close matches), not the wrapper.
    """
    try:
        return instantiate(config, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if cause is None or isinstance(cause, ImportError):  # "Error locating target" is the right message
            raise
        raise cause from None


def loss_options(loss_cfg: DictConfig, ablation_cfg: DictConfig | None = None) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(loss name, options its class takes, settings given that it does not take)``.

    The loss configs share one set of keys (null where a key does not apply, e.g. ``loss.lam`` of ``loss=ce``)
    so one sweep can mix losses; a setting applies when the loss class takes it. The ablation weights apply
    to the losses that take them; ``ablation`` is not applicable (by name) to one that takes none.
    """
    options = OmegaConf.to_container(loss_cfg, resolve=True)
    name = options.pop("name")
    if name not in LOSSES:
        raise ValueError(f"Unknown loss {name!r}; use one of {', '.join('loss=' + n for n in LOSSES)}.")
    takes = set(inspect.signature(LOSSES[name]).parameters)
    used = {k: v for k, v in options.items() if k in takes}
    not_applicable = {f"loss.{k}": v for k, v in options.items() if k not in takes and v is not None}
    if ablation_cfg is not None:
        weights = OmegaConf.to_container(ablation_cfg, resolve=True)
        ablation = weights.pop("name", None)
        if set(weights) <= takes:
            used.update(weights)
        else:
            not_applicable["ablation"] = ablation
    return name, used, not_applicable


def not_applicable_settings(cfg: DictConfig) -> dict[str, Any]:
    """The settings of ``cfg`` that do not apply to its loss (recorded in ``run.json``; see :func:`loss_options`)."""
    return loss_options(cfg.loss, cfg.get("ablation"))[2]


def build_loss(loss_cfg: DictConfig, ablation_cfg: DictConfig | None = None) -> Any:
    """The loss object of ``loss.name`` with the ablation weights applied (trust losses only); settings that do
    not apply to the loss are left out (:func:`loss_options`)."""
    name, options, _ = loss_options(loss_cfg, ablation_cfg)
    return LOSSES[name](**options)


def build_model(cfg: DictConfig, num_classes: int) -> BuiltModel:
    """Instantiate ``cfg.model`` (minus its ``pretrain`` block) for ``num_classes``."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("pretrain", None)
    built = instantiate_plain(model_cfg, num_classes=num_classes)
    get_module(built.net, built.target_layer)  # an unknown target layer fails here, before training
    return built


def warn_preprocessing_mismatch(model: BuiltModel, datamodule: pl.LightningDataModule) -> bool:
    """Log a warning when the data's input size or normalization differs from what the model's weights
    expect (e.g. a 299 px Inception fed 224 px crops); returns whether they differ."""
    data = (getattr(datamodule, "image_size", model.input_size), tuple(datamodule.mean), tuple(datamodule.std))
    expected = (model.input_size, tuple(model.mean), tuple(model.std))
    differs = data[0] != expected[0] or any(abs(a - b) > 1e-6 for a, b in zip(data[1] + data[2], expected[1] + expected[2]))
    if differs:
        log.warning("The data gives %d px inputs normalized with mean %s / std %s, but the model's weights expect "
                    "%d px with mean %s / std %s; set data.image_size (and the normalization) to match.",
                    data[0], data[1], data[2], *expected)
    return differs


def build_module(cfg: DictConfig, model: BuiltModel, loss: Any, datamodule: pl.LightningDataModule) -> TrustModule:
    """The :class:`TrustModule` of ``cfg`` around an already built model, loss and datamodule."""
    return TrustModule(
        model, loss, instantiate(cfg.optim), num_classes=datamodule.num_classes,
        saliency=OmegaConf.to_container(cfg.saliency, resolve=True), has_masks=datamodule.has_masks,
        test_set_names=datamodule.test_set_names, pointing_tolerance=cfg.get("pointing_tolerance", 15),
    )


def build_callbacks(cfg: DictConfig, with_logger: bool) -> dict[str, pl.Callback]:
    """The ``callbacks`` group, by name (``last_checkpoint``, ``model_checkpoint``, ...).

    A ``mode: null`` next to a ``monitor`` becomes that metric's direction (:func:`metric_mode`), so the
    checkpoint, early stopping, the report and sweepers all agree on it. The progress bar is left out when
    ``trainer.enable_progress_bar=false`` and the LR monitor when there is no logger (Lightning refuses both).
    """
    callbacks: dict[str, pl.Callback] = {}
    for name, cb_cfg in (cfg.get("callbacks") or {}).items():
        if cb_cfg is None:
            continue
        options = OmegaConf.to_container(cb_cfg, resolve=True)
        if options.get("monitor") and "mode" in options:
            options["mode"] = metric_mode(options["monitor"], options["mode"])
        callback = instantiate_plain(options)
        if isinstance(callback, ProgressBar) and not cfg.trainer.get("enable_progress_bar", True):
            continue
        if isinstance(callback, LearningRateMonitor) and not with_logger:
            continue
        callbacks[name] = callback
    return callbacks


def tested_checkpoint_path(cfg: DictConfig, callbacks: dict[str, pl.Callback]) -> Path:
    """The checkpoint file ``test_checkpoint`` names, after ``fit``.

    ``last``: the ``last_checkpoint`` callback's file (the end of the latest epoch). ``best``: the
    ``model_checkpoint`` callback's best file (best validation ``optimized_metric``).
    """
    rule, name = _tested_callback(cfg)
    callback = callbacks.get(name)
    path = callback.best_model_path if isinstance(callback, ModelCheckpoint) else ""
    if not path:
        raise RuntimeError(f"test_checkpoint={rule} needs the checkpoint written by callbacks.{name}, but none was "
                           "written (was the callback set to null, or did no epoch finish?).")
    return Path(path)


def _tested_callback(cfg: DictConfig) -> tuple[str, str]:
    """``(test_checkpoint rule, name of the callback that writes that file)``."""
    rule = check_test_checkpoint(cfg.get("test_checkpoint", "last"))
    return rule, "last_checkpoint" if rule == "last" else "model_checkpoint"


def _check_checkpoint_callbacks(cfg: DictConfig) -> None:
    """Fail before training when the tested checkpoint could never be written."""
    rule, name = _tested_callback(cfg)
    if not cfg.get("test"):
        return
    if (cfg.get("callbacks") or {}).get(name) is None:
        raise ValueError(f"test_checkpoint={rule} tests the file of callbacks.{name}, which is null; restore it "
                         f"(remove callbacks.{name}=null) or set test=false.")


def checkpoint_summary(path: Path) -> dict[str, Any]:
    """Epoch, global step and the validation metrics stored in a checkpoint (see ``TrustModule.on_save_checkpoint``)."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {"epoch": int(state["epoch"]), "step": int(state["global_step"]),
            "val_metrics": dict(state.get("val_metrics") or {})}


def build_loggers(cfg: DictConfig) -> list[pl.loggers.Logger]:
    """The ``logger`` group, each entry built from its ``_target_`` (``logger.<name>=null`` drops one; none
    with ``logger=none``)."""
    return [instantiate_plain(OmegaConf.to_container(lg_cfg, resolve=True))
            for lg_cfg in (cfg.get("logger") or {}).values() if lg_cfg is not None]


def finish_loggers(loggers: list[pl.loggers.Logger], failed: bool) -> None:
    """Close every logger. A W&B run is finished (marked failed when the job failed): Lightning's
    ``WandbLogger`` reuses a run still open in the process, so without this every job of a multirun after the
    first would log into the first job's run."""
    for lg in loggers:
        lg.finalize("failed" if failed else "success")
    if any(isinstance(lg, pl.loggers.WandbLogger) for lg in loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=1 if failed else 0)
        # finish() can return before wandb-core has flushed an offline run to disk; teardown waits.
        wandb.teardown()


TABLE_COLUMNS = ("acc", "precision", "recall", "pointing_game", "energy_pointing_game", "energy_pointing_game_uniform",
                 "decoy_following_rate", "s_hat")


def format_table(metrics: dict[str, float]) -> str:
    """A short Markdown table of the final metrics: one row per evaluated set, the headline columns
    (the case table and its intervals stay in ``metrics.json``)."""
    sets = sorted({k.split("/", 1)[0] for k in metrics if "/" in k and not k.startswith("best_")})
    columns = [c for c in TABLE_COLUMNS if any(f"{s}/{c}" in metrics for s in sets)]
    lines = ["| set | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name in sets:
        cells = [f"{metrics[f'{name}/{c}']:.4f}" if f"{name}/{c}" in metrics else "" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    best = [f"{k} = {v:.4f}" for k, v in metrics.items() if k.startswith("best_")]
    return "\n".join(lines + best)


#: One line per evaluated set of a datamodule (by class name), printed under the final table.
SET_DESCRIPTIONS: dict[str, dict[str, str]] = {
    "DecoyDigitsDataModule": {
        "test": "random decoys: the corner patch's shade is drawn independently of the label, so accuracy here "
                "comes from the digit alone; low accuracy (with a high decoy_following_rate) is the planted "
                "shortcut at work",
        "test_consistent": "the same test digits with label-consistent decoys, as in training: the shortcut still "
                           "works here, so high accuracy says nothing about the digit",
        "val": "validation split, label-consistent decoys as in training (what checkpoints and sweeps rank by)",
    },
}


def _masks_of(batch: Any) -> torch.Tensor:
    """The masks of an ``(images, labels, masks)`` batch as ``(N, 1, H, W)`` booleans."""
    masks = batch[2]
    return (masks if masks.dim() == 4 else masks[:, None]).bool()


def _tested_images(n: int, batch_size: int, limit: Any) -> int:
    """How many of a test set's ``n`` images a ``trainer.limit_test_batches`` of ``limit`` tests."""
    if limit is None or isinstance(limit, bool):
        return n
    if isinstance(limit, int):
        return min(n, limit * batch_size)
    return min(n, int(-(-n // batch_size) * float(limit)) * batch_size)


def chance_levels(datamodule: pl.LightningDataModule, tolerance: int, limit: Any = None) -> dict[str, float]:
    """What a map with no information scores on each test set, from its masks (the images the test used):

    * ``<set>/energy_pointing_game_chance``: the mean share of the image the mask covers (a uniform map's
      energy inside the mask);
    * ``<set>/pointing_game_chance``: the mean share of pixels within ``tolerance`` px of the mask (the mask
      dilated by the pointing game's disk), i.e. the chance that a uniformly random point scores a hit.

    Images with an empty mask are left out, as the pointing games leave them out.
    """
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    if datamodule.test_sets is None:
        datamodule.setup("test")
    r = torch.arange(-tolerance, tolerance + 1)
    disk = ((r[:, None] ** 2 + r[None, :] ** 2) <= tolerance * tolerance).float()[None, None]
    out: dict[str, float] = {}
    for name, dataset in zip(datamodule.test_set_names, datamodule.test_sets):
        n = _tested_images(len(dataset), datamodule.batch_size, limit)
        area, near, count = 0.0, 0.0, 0
        seen = 0
        for batch in DataLoader(dataset, batch_size=datamodule.batch_size, shuffle=False):
            masks = _masks_of(batch)[: n - seen].float()
            seen += len(masks)
            nonempty = masks.flatten(1).any(1)
            widened = F.conv2d(masks, disk, padding=tolerance) > 0.5 if tolerance > 0 else masks.bool()
            area += float(masks.flatten(1).mean(1)[nonempty].sum())
            near += float(widened.float().flatten(1).mean(1)[nonempty].sum())
            count += int(nonempty.sum())
            if seen >= n:
                break
        if count:
            out[f"{name}/energy_pointing_game_chance"] = area / count
            out[f"{name}/pointing_game_chance"] = near / count
    return out


def reading_guide(metrics: dict[str, float], datamodule: pl.LightningDataModule, tolerance: int) -> str:
    """Lines under the final table: what each evaluated set is, and what a map (or a guess) with no
    information would score, so a number can be told good or bad."""
    notes = {**SET_DESCRIPTIONS.get(type(datamodule).__name__, {}),
             **(datamodule.set_descriptions() if hasattr(datamodule, "set_descriptions") else {})}
    sets = sorted({k.split("/", 1)[0] for k in metrics if "/" in k and not k.startswith("best_")})
    lines = [f"{name}: {notes[name]}." for name in sets if name in notes]
    chance = [f"accuracy {1 / datamodule.num_classes:.4f} (a guess among {datamodule.num_classes} classes)"]
    main = datamodule.test_set_names[0]
    if f"{main}/pointing_game_chance" in metrics:
        chance += [f"energy_pointing_game {metrics[f'{main}/energy_pointing_game_chance']:.4f} (the share of "
                   "the image the mask covers)",
                   f"pointing_game {metrics[f'{main}/pointing_game_chance']:.4f} (the chance that a uniformly "
                   f"random point lies within {tolerance} px of the mask)"]
    lines.append(f"No information scores, on {main}: " + "; ".join(chance) + ".")
    return "\n".join(lines)


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit and test one configuration; write checkpoints, ``metrics.json`` and ``saliency_grid.png``
    into ``cfg.paths.output_dir``.

    The tested checkpoint is ``test_checkpoint`` (``last``: the end of the last epoch; ``best``: the best
    validation ``optimized_metric``); ``run.json`` records which file, epoch and step it was.

    Returns:
        The final metrics (test metrics; the validation metrics, ``tested_epoch`` and ``tested_step`` of
        the tested checkpoint; ``best_<optimized_metric>``) and the objects made (datamodule, module,
        trainer, callbacks by name).
    """
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    resume_after_requeue(cfg)  # a job SLURM requeued goes on from its own last.ckpt (trustcnn.launch)
    if is_rank_zero():  # DDP: every rank runs this function; rank 0 writes the run files
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    pl.seed_everything(cfg.seed, workers=True)
    use_cpu_allocator(cfg.get("cpu_allocator", "reuse"))  # reuse: freed memory stays for the next step
    # num_threads, capped at this job's share of the cores when sweep jobs run at once (trustcnn.launch)
    with torch_threads(job_threads(cfg)):
        return _fit_and_test(cfg, output_dir)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch intra-op threads (``None``: leave as is), restoring the previous count."""
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def is_rank_zero() -> bool:
    """Whether this process is global rank 0 (always, outside DDP). Known before any trainer exists: the
    processes Lightning's DDP launcher starts carry their rank in the environment, and the strategy sets
    it again once it has set up."""
    return int(getattr(rank_zero_only, "rank", 0)) == 0


def _check_ddp_launch(trainer: pl.Trainer) -> None:
    """Refuse DDP launched by Lightning's script launcher inside a Hydra multirun: the launcher re-runs the
    command line, so each extra rank would run the whole sweep in a directory of its own."""
    launcher = getattr(trainer.strategy, "launcher", None)
    if trainer.world_size <= 1 or launcher is None or not HydraConfig.initialized():
        return
    from lightning_fabric.strategies.launchers.subprocess_script import _SubprocessScriptLauncher as FabricLauncher
    from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    spawns = isinstance(launcher, (_SubprocessScriptLauncher, FabricLauncher)) and \
        not launcher.cluster_environment.creates_processes_externally
    if spawns and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise RuntimeError("trainer=ddp (strategy ddp, several devices) cannot run inside a multirun (-m): Lightning "
                           "starts the other ranks by re-running the command line, which would re-run the whole "
                           "sweep. Run each job as its own `python -m trustcnn.train trainer=ddp ...` command.")


def _fit_and_test(cfg: DictConfig, output_dir: Path) -> tuple[dict[str, float], dict[str, Any]]:
    """The body of :func:`train`, after the output directory and seeds are set."""
    # Everything a user can get wrong in the config fails here, before any training.
    loss = build_loss(cfg.loss, cfg.get("ablation"))
    check_feature_cache_mode(cfg.get("feature_cache", "auto"))
    datamodule = instantiate_plain(cfg.data)
    model = build_model(cfg, datamodule.num_classes)
    warn_preprocessing_mismatch(model, datamodule)
    if loss.needs_masks and not datamodule.has_masks:
        raise ValueError(f"loss=trust_mask needs masks, but data={type(datamodule).__name__} has none; "
                         "use data=decoy_digits or data=oxford_pet, or loss=trust.")
    loggers = build_loggers(cfg)
    callbacks = build_callbacks(cfg, with_logger=bool(loggers))
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=list(callbacks.values()))
    _check_ddp_launch(trainer)
    if cfg.model.get("pretrain"):
        pre = cfg.model.pretrain
        # "order": the training data's order is a function of (seed, epoch) since resumable runs
        # (EpochShuffleSampler); weights cached before that came from another order and are not reused.
        spec = {"model": OmegaConf.to_container(cfg.model, resolve=True), "data": OmegaConf.to_container(cfg.data, resolve=True),
                "seed": cfg.seed, "order": "epoch_shuffle"}
        for key in ("num_workers", "root"):  # cannot change the weights; everything else can
            spec["data"].pop(key, None)
        spec["model"]["pretrain"].pop("cache_dir", None)
        spec["model"].pop("trainable", None)  # pretraining trains every layer whatever trains afterwards
        # The pretraining runs in one process before DDP starts (every rank runs it or finds it cached), on the
        # global batch (data.batch_size is per process), so a DDP run starts from the same cached network as a
        # one-process run of the same global batch; outside DDP nothing changes.
        spec["data"]["batch_size"] = global_batch = datamodule.batch_size * trainer.world_size
        with datamodule.batch_size_set_to(global_batch):
            pretrained = ensure_pretrained(model, datamodule, spec, pre.cache_dir, epochs=pre.epochs, lr=pre.lr,
                                           seed=cfg.seed, progress=bool(cfg.trainer.get("enable_progress_bar", True))
                                           and trainer.is_global_zero)
    else:
        pretrained = None
    module = build_module(cfg, model, loss, datamodule)
    _check_checkpoint_callbacks(cfg)
    prepare_feature_cache(cfg, module, datamodule, trainer)  # feature_cache: auto (where exact) | off

    objects = {"datamodule": datamodule, "module": module, "trainer": trainer, "callbacks": callbacks,
               "pretrained": pretrained}
    failed = True
    try:
        for lg in loggers:  # the whole run's config (Lightning logs only the module's hyperparameters)
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        with warnings.catch_warnings():
            # Frozen modules are in eval mode on purpose (their BatchNorm statistics and dropout stay
            # fixed; see TrustModule.train); Lightning warns about any eval-mode module at fit start.
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        metrics: dict[str, float] = {}
        best = callbacks.get("model_checkpoint")
        if isinstance(best, ModelCheckpoint) and best.best_model_score is not None:
            metrics[f"best_{cfg.optimized_metric}"] = float(best.best_model_score)
        if cfg.get("test"):
            tested = tested_checkpoint_path(cfg, callbacks)
            summary = checkpoint_summary(tested)
            # The validation metrics of the tested model: what sweepers optimize and the report ranks by.
            metrics.update(summary["val_metrics"])
            metrics.update(tested_epoch=float(summary["epoch"]), tested_step=float(summary["step"]))
            for result in trainer.test(module, datamodule=datamodule, ckpt_path=str(tested), verbose=False):
                metrics.update({k: float(v) for k, v in result.items()
                                if k.split("/", 1)[-1] in FINAL_METRICS})
            for name, preds in module.test_predictions.items():
                metrics.update({f"{name}/{k}": v for k, v in datamodule.prediction_metrics(name, torch.cat(preds)).items()})
            if datamodule.has_masks:  # what a map with no information scores, from the test masks themselves
                metrics.update(chance_levels(datamodule, cfg.get("pointing_tolerance", 15),
                                             cfg.trainer.get("limit_test_batches")))
            # Under DDP every rank holds the same metrics (synced; the predictions gathered in loader order),
            # and only rank 0 writes files (checkpoints are Lightning's, rank 0 too).
            if trainer.is_global_zero:
                main_preds = module.test_predictions.get(datamodule.test_set_names[0]) or []
                write_run_record(cfg, output_dir, tested, summary,
                                 test_images=int(sum(len(p) for p in main_preds)) if main_preds else None,
                                 num_classes=int(datamodule.num_classes))
                save_test_grid(module, datamodule, output_dir / "saliency_grid.png", cfg.grid_images)
        if trainer.is_global_zero:
            (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
            print(f"\nFinal metrics ({output_dir}):\n{format_table(metrics)}\n\n"
                  f"{reading_guide(metrics, datamodule, cfg.get('pointing_tolerance', 15))}\n")
        failed = False
    finally:
        finish_loggers(loggers, failed)
    return metrics, objects


def write_run_record(cfg: DictConfig, output_dir: Path, tested: Path, summary: dict[str, Any],
                     test_images: int | None = None, num_classes: int | None = None) -> Path:
    """``run.json``: which checkpoint was tested (``evaluate`` and ``report`` load the same one), on how many
    images of the main test set and with how many classes (the report's Wilson intervals and chance level)."""
    monitor_cfg = (cfg.get("callbacks") or {}).get("model_checkpoint") or {}
    record = {
        "test_checkpoint": cfg.get("test_checkpoint", "last"),
        "tested_checkpoint": str(tested.resolve().relative_to(output_dir.resolve()))
        if tested.resolve().is_relative_to(output_dir.resolve()) else str(tested.resolve()),
        "tested_epoch": summary["epoch"],
        "tested_step": summary["step"],
        "optimized_metric": cfg.optimized_metric,
        "optimized_mode": metric_mode(cfg.optimized_metric, monitor_cfg.get("mode")),
        # Settings given that do not apply to the loss (e.g. loss.lam of loss=ce): not used by this run.
        "not_applicable": not_applicable_settings(cfg),
        "test_images": test_images,
        "num_classes": num_classes,
    }
    path = output_dir / RUN_RECORD
    path.write_text(json.dumps(record, indent=2))
    return path


def save_test_grid(module: TrustModule, datamodule: pl.LightningDataModule, path: Path, n: int) -> Path:
    """PNG grid of the first ``n`` test images with their masks and saliency maps."""
    from trustcnn.viz import save_saliency_grid

    x, y, masks = (t[:n] for t in next(iter(datamodule.main_test_dataloader())))
    module.eval()
    x, y, masks = x.to(module.device), y.to(module.device), masks.to(module.device)
    out = module.explain(x, y, create_graph=False)
    return save_saliency_grid(path, datamodule.denormalize(x), masks, {"map": out.maps.detach()}, labels=y,
                              preds=out.logits.argmax(1), class_names=getattr(datamodule, "class_names", None))


def _record_failure(cfg: DictConfig, err: BaseException) -> None:
    """Leave the error in the job directory so `trustcnn.report` can list failed jobs (DDP: rank 0's error;
    the other ranks' tracebacks go to stderr)."""
    if not is_rank_zero():
        return
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "error.json").write_text(json.dumps({
        "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(),
    }, indent=2))


def run_job(cfg: DictConfig) -> float | None:
    """One Hydra job (``trustcnn.cli.train_task``); returns the value of ``cfg.optimized_metric`` at the tested
    checkpoint for sweepers.

    In a multirun a failed job leaves ``error.json`` and returns ``None`` (Optuna marks the trial failed and
    goes on; the summary at the end lists it and the exit status is 1); a single run raises. With
    ``skip_finished=true`` a job whose directory holds a finished run of the same resolved config returns that
    run's value without training (:func:`trustcnn.sweep.skip_finished_job`). In a multirun, a job whose
    configuration another job of the sweep already runs (it differs only in settings that do not apply to its
    loss, e.g. ``loss.lam`` of ``loss=ce``) is not run again: it records which job it repeats and returns that
    job's value (:func:`trustcnn.sweep.run_once`).
    """
    from trustcnn import sweep

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("skip_finished"):
        job = str(hc.job.num) if multirun else str(output_dir)
        try:
            skipped, value = sweep.skip_finished_job(cfg, output_dir, job, list(hc.overrides.task), multirun)
        except sweep.FinishedJobMismatchError as err:
            if not multirun:
                raise
            log.error("Job %s refused: %s", job, err)  # recorded in refused.json; the summary lists it
            return None
        if skipped:
            return value
    sweep.clear_results(output_dir)
    try:
        not_applicable = not_applicable_settings(cfg)
    except Exception as err:
        _record_failure(cfg, err)
        if not multirun:
            raise
        log.error("Job %s failed: %s: %s", hc.job.num, type(err).__name__, err)
        return None
    if not_applicable:
        log.info("Not applicable to loss=%s, so not used: %s", cfg.loss.name,
                 ", ".join(f"{k}={v}" for k, v in not_applicable.items()))
    once = sweep.run_once(cfg, output_dir, Path(hc.sweep.dir), hc.job.num, not_applicable) if multirun \
        else nullcontext()
    with once as original:
        if original is not None:  # another job of this sweep ran this configuration
            return original.value
        try:
            metrics, _ = train(cfg)
        except Exception as err:
            _record_failure(cfg, err)
            if not multirun:
                raise
            # One failing job must not stop the rest of the sweep.
            log.error("Job %s failed: %s: %s (details in %s/error.json)", hc.job.num,
                      type(err).__name__, err, cfg.paths.output_dir)
            return None
    # The tested model's validation value (not the best epoch's), so a sweeper ranks what is published.
    return sweep.sweeper_value(metrics, cfg.optimized_metric)


def main() -> None:
    """``python -m trustcnn.train``: :func:`trustcnn.cli.train_main` (kept here for the ``trustcnn-train`` script)."""
    from trustcnn.cli import train_main

    train_main()
