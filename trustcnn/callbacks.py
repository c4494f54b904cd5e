"""Lightning callbacks of trustcnn's own (the rest come from Lightning, built from ``conf/callbacks``)."""

from __future__ import annotations

import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch


def epoch_seed(seed: int, epoch: int, *more: int) -> int:
    """A 32-bit seed for ``epoch`` (and e.g. a batch of it) of a run seeded with ``seed``; distinct tuples
    give unrelated streams (``seed + epoch`` would make run 1's epoch 0 replay run 0's epoch 1)."""
    return int(np.random.SeedSequence([int(seed), int(epoch), *map(int, more)]).generate_state(1)[0])


def _seed_everything(s: int) -> None:
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)  # also seeds every CUDA device


def batches_done(checkpoint: dict[str, Any]) -> int:
    """How many training batches of its epoch a checkpoint's weights include, as Lightning counts them when
    it resumes: 0 for a checkpoint written at an epoch's end. One written inside ``on_train_batch_end``
    (Lightning's SLURM handler saving on the requeue signal) holds that batch's step, which Lightning then
    counts as done."""
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
    total, current = progress.get("total", {}), progress.get("current", {})
    done = int(current.get("completed", 0))
    if total and total.get("ready") == total.get("started") == total.get("processed") == total.get("completed", 0) + 1:
        done += 1
    epoch = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    if epoch and epoch.get("processed", 0) > epoch.get("completed", 0):
        return 0  # the epoch's batches all ran (checkpoint at its end): the next one starts afresh
    return done


class EpochSeed(pl.Callback):
    """Re-seed Python, NumPy and torch (CPU and CUDA) at the start of every training epoch and batch.

    Lightning restores weights, optimizer, loops and callbacks from a checkpoint, but not the random
    number generators, so a run resumed from ``last.ckpt`` would shuffle its data and draw its dropout
    masks differently from a run that never stopped. Seeding each epoch from ``(seed, epoch)`` makes
    epoch ``e`` of both identical. The training data's order is a function of ``(seed, epoch)`` by itself
    (``EpochShuffleSampler``). Exact with ``num_workers=0``; with worker processes, random augmentations
    drawn inside the workers follow the workers' own seeds, which a resumed run does not replay.

    Each batch is seeded from ``(seed, epoch, batch)`` as well, so a run resumed from a checkpoint written
    in the middle of an epoch (a preempted SLURM job's ``hpc_ckpt_*.ckpt``) draws the same dropout masks
    for the rest of it; on loading such a checkpoint the datamodule is told how many batches of the epoch
    are done, and its sampler starts the epoch after them.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _seed_everything(epoch_seed(self.seed, trainer.current_epoch))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        _seed_everything(epoch_seed(self.seed, trainer.current_epoch, batch_idx))

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        done = batches_done(checkpoint)
        datamodule = getattr(trainer, "datamodule", None)
        if done and datamodule is not None and hasattr(datamodule, "resume_within_epoch"):
            datamodule.resume_within_epoch(int(checkpoint.get("epoch", 0)), done)
            # Lightning warns that a mid-epoch resume with a plain DataLoader replays batches; the sampler
            # now starts after the batches done, so that warning would be wrong here.
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


class ModelCheckpoint(pl.callbacks.ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, resumable into a new run directory.

    A resumed run writes into its own Hydra directory. Lightning then reloads only ``best_model_path``
    (the warning "The dirpath has changed ..."), so the resumed run's "best" would be the best of the
    epochs after the resume, and the best epoch before it would be lost to ``test_checkpoint=best``.
    Here the kept top-k files are copied into the new directory and their scores restored, so resuming
    gives the same best checkpoint as a run that never stopped.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old_dir = state_dict.get("dirpath", self.dirpath)
        if self.dirpath is None or old_dir == self.dirpath:
            super().load_state_dict(state_dict)
            return
        if self.monitor is None:  # the latest-epoch file: nothing to carry over, the next save writes it here
            super().load_state_dict({**state_dict, "dirpath": self.dirpath, "best_model_path": "", "best_k_models": {},
                                     "kth_best_model_path": "", "last_model_path": ""})
            return
        moved: dict[str, str] = {}
        for old_path in state_dict.get("best_k_models") or {}:
            if Path(old_path).is_file():
                new_path = Path(self.dirpath) / Path(old_path).name
                new_path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(old_path, new_path)
                moved[old_path] = str(new_path)
        if not moved:  # the old files are gone: Lightning's own behaviour (rank afresh, with its warning)
            super().load_state_dict(state_dict)
            return
        # Lightning's own reload, as if the checkpoint had been written in this directory.
        super().load_state_dict({**state_dict, "dirpath": self.dirpath,
                                 "best_k_models": {moved[p]: s for p, s in state_dict["best_k_models"].items() if p in moved},
                                 "best_model_path": moved.get(state_dict.get("best_model_path"), ""),
                                 "kth_best_model_path": moved.get(state_dict.get("kth_best_model_path"), ""),
                                 "last_model_path": ""})


class WandbSaliencyPanels(pl.Callback):
    """What a W&B dashboard shows beyond the scalars: after every validation epoch a panel of the first
    ``images`` validation images with their masks and saliency maps (key ``val/saliency``), and after the
    test the case table of each test set (``<set>/case_table``, from the ``<set>/case*`` metrics the test
    logged; data with masks only).

    ``logger=wandb`` adds it (``callbacks.wandb_panels``) next to the ``WandbLogger``; without a ``WandbLogger``
    in the trainer it does nothing. The panel is rendered by global rank 0 only, the rank that logs.
    """

    def __init__(self, images: int = 8) -> None:
        self.images = int(images)

    @staticmethod
    def _wandb_loggers(trainer: pl.Trainer) -> list[pl.loggers.WandbLogger]:
        return [lg for lg in trainer.loggers if isinstance(lg, pl.loggers.WandbLogger)] if trainer.is_global_zero else []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loggers = self._wandb_loggers(trainer)
        if not loggers or trainer.sanity_checking:
            return
        from torch.utils.data import default_collate

        from trustcnn.viz import saliency_grid_array

        # The images themselves, not the validation loader's batches: those hold the frozen stem's features
        # when the feature cache serves validation.
        val_set = trainer.datamodule.val_set
        batch = default_collate([val_set[i] for i in range(min(self.images, len(val_set)))])
        x, y, masks = (t.to(pl_module.device) for t in batch)
        out = pl_module.explain(x, y, create_graph=False)
        panel = saliency_grid_array(trainer.datamodule.denormalize(x), masks, {"map": out.maps.detach()},
                                    labels=y, preds=out.logits.argmax(1))
        for lg in loggers:
            lg.log_image(key="val/saliency", images=[panel], step=trainer.global_step)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loggers = self._wandb_loggers(trainer)
        if not loggers:
            return
        from trustcnn.metrics import CASE_NAMES

        metrics = trainer.callback_metrics  # the test epoch's values (synced over the ranks), by name
        columns = ["case", "description", "count", "fraction", "ci_low", "ci_high"]
        for stage in pl_module.test_set_names:
            if f"{stage}/case1_count" not in metrics:  # no masks: no case table
                continue
            rows = [[c, CASE_NAMES[c], int(metrics[f"{stage}/case{c}_count"]),
                     *(float(metrics[f"{stage}/case{c}_{part}"]) for part in ("fraction", "ci_low", "ci_high"))]
                    for c in range(1, 5)]
            for lg in loggers:
                lg.log_table(key=f"{stage}/case_table", columns=columns, data=rows)
