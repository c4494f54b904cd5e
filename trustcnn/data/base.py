"""What every trustcnn datamodule shares: the sample contract, the data-root check and
:class:`BaseDataModule` (loaders, splits by stage name, :meth:`~BaseDataModule.denormalize`).

Every datamodule yields ``(image, label, mask)``:

- ``image``: float32 ``(3, H, W)``, normalized with the datamodule's ``mean``/``std``;
- ``label``: int64 0-dim tensor;
- ``mask``: float32 ``(1, H, W)`` with object pixels = 1, everything else 0, or ``torch.zeros(0)`` when
  the data has no masks (a batch then has masks of shape ``(N, 0)``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerStatus
from torch.utils.data import DataLoader, Dataset

from trustcnn.data.samplers import EpochShuffleSampler, ShardSampler
from trustcnn.data.transforms import denormalize


def NO_MASK() -> torch.Tensor:  # noqa: N802 - reads like a constant at call sites
    """The mask of a sample from data without masks: an empty float tensor (batches to ``(N, 0)``)."""
    return torch.zeros(0)


class DatasetLayoutError(FileNotFoundError):
    """A dataset root that is missing or whose layout does not match what the datamodule reads."""


def require_root(root: str | os.PathLike | None, name: str, layout: str, fix: str) -> Path:
    """Return ``root`` as an absolute ``Path`` or raise a :class:`DatasetLayoutError` that spells out
    the expected layout and how to fix it."""
    if root is None or str(root).strip() == "":
        raise DatasetLayoutError(
            f"{name}: no data root given (data.root is unset).\nExpected layout:\n{layout}\nFix: {fix}"
        )
    path = Path(os.path.expanduser(str(root))).resolve()
    if not path.is_dir():
        raise DatasetLayoutError(
            f"{name}: data root {str(path)!r} does not exist or is not a directory.\n"
            f"Expected layout:\n{layout}\nFix: {fix}"
        )
    return path


def _rank_seed(seed: int, rank: int) -> int:
    """The data-loader seed of DDP rank ``rank``: ``seed`` itself on rank 0 (= one process)."""
    return int(seed) if rank == 0 else int(np.random.SeedSequence([int(seed), 0x5EED, int(rank)]).generate_state(1)[0])


class BaseDataModule(pl.LightningDataModule):
    """Common constructor arguments, data loaders and :meth:`denormalize` of trustcnn datamodules.

    Subclasses set, in ``__init__``: ``num_classes``, ``class_names``, ``has_masks``, ``mean``, ``std``,
    ``test_set_names``; and in ``setup``: ``train_set``, ``val_set`` and ``test_sets`` (one dataset
    per entry of ``test_set_names``).
    """

    def __init__(
        self,
        root: str | None,
        batch_size: int,
        num_workers: int,
        seed: int,
        image_size: int,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.root = root
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.pin_memory = bool(pin_memory)
        self.test_set_names: list[str] = ["test"]
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_sets: list[Dataset] | None = None
        # Stand-ins for whole splits (name -> dataset), set by trustcnn.feature_cache: precomputed
        # features of a frozen stem in place of the images; the loaders use them in the same order.
        self.cached_sets: dict[str, Dataset] = {}

    # ---- helpers -------------------------------------------------------------------------------
    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (for plotting) from normalized ``(3,H,W)`` or ``(N,3,H,W)`` tensors."""
        return denormalize(x, self.mean, self.std)

    @contextmanager
    def batch_size_set_to(self, batch_size: int) -> Iterator[None]:
        """Loaders made inside the block use ``batch_size`` (e.g. the one-process pretraining of a DDP run,
        which uses the global batch)."""
        previous, self.batch_size = self.batch_size, int(batch_size)
        try:
            yield
        finally:
            self.batch_size = previous

    def _shard(self) -> tuple[int, int]:
        """``(rank, world_size)`` of the attached trainer (``(0, 1)`` without one or outside DDP)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _loader(self, dataset: Dataset | None, train: bool, shard: bool = True) -> DataLoader:
        """The loader of ``dataset``: for training in the ``(seed, epoch)`` order (:class:`EpochShuffleSampler`),
        otherwise in dataset order. Under DDP (a trainer with ``world_size > 1`` attached, and ``shard``) each
        rank gets its own share: ``data.batch_size`` is the batch of one process, and the global batch is
        ``world_size * batch_size``. Evaluation shards are not padded (:class:`ShardSampler`)."""
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for data loaders")
        rank, world_size = self._shard() if shard else (0, 1)
        if train:
            resume_at = getattr(self, "_resume_within_epoch", None)
            if resume_at is not None:
                resume_at = (resume_at[0], resume_at[1] * self.batch_size)
            sampler = EpochShuffleSampler(len(dataset), self.seed, rank, world_size, resume_at=resume_at)
        else:
            sampler = ShardSampler(len(dataset), rank, world_size) if world_size > 1 else None
        # Cached features are ready tensors: indexing them in this process costs less than starting workers
        # (nothing random happens in a worker, so the batches are the same either way).
        workers = 0 if any(dataset is d for d in getattr(self, "cached_sets", {}).values()) else self.num_workers
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=workers,
            pin_memory=self.pin_memory,
            persistent_workers=workers > 0,
            # Making an iterator draws the workers' base seed from this generator, not from the global RNG:
            # Lightning makes the first epoch's iterator before `on_train_epoch_start` and later ones after
            # it, so a draw from the global RNG would shift a resumed run's dropout masks (see EpochSeed).
            # Each DDP rank's workers get their own stream (rank 0 keeps the one-process seed).
            generator=torch.Generator().manual_seed(_rank_seed(self.seed, rank)) if train else None,
        )

    def stage_sets(self) -> dict[str, Dataset]:
        """Every split by its stage name (``train``, ``val``, then ``test_set_names``), after setup."""
        out = {"train": self.train_set, "val": self.val_set}
        out.update(zip(self.test_set_names, self.test_sets or []))
        return {name: d for name, d in out.items() if d is not None}

    def use_cached_sets(self, sets: dict[str, Dataset]) -> None:
        """Serve these datasets (by split name, same length and order as the split's) from the stage
        loaders while an attached trainer runs (fit, validate, test), whose module expects them. Every other
        caller (the saliency grid, evaluate, code after the run) gets the images."""
        self.cached_sets = dict(sets)

    def _stage_set(self, name: str, dataset: Dataset | None) -> Dataset | None:
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.state.status != TrainerStatus.RUNNING:
            return dataset
        return getattr(self, "cached_sets", {}).get(name, dataset)

    def resume_within_epoch(self, epoch: int, batches: int) -> None:
        """The run resumes from a checkpoint written after ``batches`` training batches (of this process)
        of ``epoch``: the next training loader starts that epoch after them (:class:`EpochShuffleSampler`)."""
        self._resume_within_epoch = (int(epoch), int(batches))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._stage_set("train", self.train_set), train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._stage_set("val", self.val_set), train=False)

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        if self.test_sets is None:
            return self._loader(None, train=False)
        loaders = [self._loader(self._stage_set(n, d), train=False) for n, d in zip(self.test_set_names, self.test_sets)]
        return loaders[0] if len(loaders) == 1 else loaders

    def prediction_metrics(self, test_set: str, predictions: torch.Tensor) -> dict[str, float]:
        """Metrics of the test predictions that only this data can compute (e.g. how often a model
        follows a planted shortcut), keyed without the set prefix. ``predictions`` are the predicted
        classes of the first ``len(predictions)`` images of ``test_set``, in loader order. None by default."""
        return {}

    def main_test_dataloader(self) -> DataLoader:
        """The loader of the real test set (``test_set_names[0]``), set up if needed; extra test sets
        (e.g. decoy digits' label-consistent copy) are left out."""
        if self.test_sets is None:
            self.setup("test")
        # Never sharded: the first images are the first images on every rank (the saliency grid, evaluate).
        return self._loader(self.test_sets[0] if self.test_sets is not None else None, train=False, shard=False)

    def predict_dataloader(self) -> DataLoader | list[DataLoader]:
        return self.test_dataloader()

    def split_sizes(self) -> dict[str, int]:
        """Number of samples per split (after setup)."""
        out = {"train": len(self.train_set or []), "val": len(self.val_set or [])}
        for name, d in zip(self.test_set_names, self.test_sets or []):
            out[name] = len(d)
        return out
