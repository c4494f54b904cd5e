"""Cats vs dogs (Asirra / Kaggle "PetImages", ~25k photos), the paper's §4.1 transfer-learning data.

Layout read (the public ``kagglecatsanddogs_*.zip`` unpacked into ``root``)::

    root/PetImages/Cat/*.jpg
    root/PetImages/Dog/*.jpg

The archive really contains files that are not usable images: corrupt and truncated JPEGs, zero-byte
files, ``Thumbs.db``; and usable oddities: grayscale and CMYK JPEGs, PNG data behind a ``.jpg`` name.
At ``setup`` every file is fully decoded once (in threads; the result is cached under ``cache_dir``,
keyed by the root path and each file's size and mtime, so later runs only ``stat`` the files). Files
that do not decode are skipped, counted (``num_skipped``, ``skipped_files``) and logged on the
``trustcnn.data`` logger; everything that decodes is converted to RGB. A file that passed the scan but
fails later falls back deterministically to the next readable sample (logged), so an epoch never crashes.

Labels: Cat = 0, Dog = 1. No masks. Deterministic stratified train/val/test split from ``seed``.
"""

from __future__ import annotations

import logging
import os

from trustcnn.data.base import BaseDataModule, DatasetLayoutError, require_root
from trustcnn.data.images import DEFAULT_CACHE_DIR, ImageListDataset, scan_images
from trustcnn.data.splits import split_fractions, stratified_split
from trustcnn.data.transforms import build_transforms
from trustcnn.normalization import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger("trustcnn.data")

CLASS_DIRS = ("Cat", "Dog")

LAYOUT = """    <root>/PetImages/Cat/*.jpg
    <root>/PetImages/Dog/*.jpg"""

FIX = (
    "download the Microsoft 'Kaggle Cats and Dogs Dataset' (kagglecatsanddogs_5340.zip, "
    "https://www.microsoft.com/en-us/download/details.aspx?id=54765; no automatic download), unzip it "
    "into a folder and set data.root=<that folder> (the folder that contains PetImages/)."
)


class CatsDogsDataModule(BaseDataModule):
    """Cats vs dogs from ``root/PetImages/{Cat,Dog}`` (see the module docstring).

    Args:
        root: folder containing ``PetImages/``.
        batch_size, num_workers, seed: loader settings; ``seed`` fixes the split and shuffling.
        image_size: square model input (224).
        val_fraction, test_fraction: stratified split fractions (train gets the rest).
        augment: training-time ``RandomResizedCrop`` + horizontal flip; otherwise the eval transform
            (resize to ``image_size * 256/224`` + center crop) is used for training too.
        crop_scale: area range of the training ``RandomResizedCrop``.
        cache_dir: where the validity-scan cache lives (``None``: no cache).
        scan_workers: threads for the one-off validity scan (default ``min(8, cpus)``).
        pin_memory: passed to the data loaders.

    Attributes (after ``setup``): ``num_skipped``, ``skipped_files`` (``(relative path, reason)``).
    """

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 32,
        num_workers: int = 4,
        seed: int = 0,
        image_size: int = 224,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        augment: bool = True,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        cache_dir: str | None = DEFAULT_CACHE_DIR,
        scan_workers: int | None = None,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(root, batch_size, num_workers, seed, image_size, pin_memory)
        self.fractions = split_fractions(val_fraction, test_fraction)
        self.augment = bool(augment)
        self.crop_scale = tuple(crop_scale)
        self.cache_dir = cache_dir
        self.scan_workers = scan_workers
        self.num_classes = 2
        self.class_names = ["cat", "dog"]
        self.has_masks = False
        self.mean = IMAGENET_MEAN
        self.std = IMAGENET_STD
        self.test_set_names = ["test"]
        self.num_skipped = 0
        self.skipped_files: list[tuple[str, str]] = []
        self._built = False

    # ------------------------------------------------------------------------------------------
    def _pet_dir(self):
        root = require_root(self.root, "CatsDogsDataModule", LAYOUT, FIX)
        pet = root / "PetImages"
        missing = [str(pet / c) for c in CLASS_DIRS if not (pet / c).is_dir()]
        if missing:
            hint = ""
            if all((root / c).is_dir() for c in CLASS_DIRS):
                hint = f" (data.root points at the PetImages folder itself; use its parent {root.parent})"
            raise DatasetLayoutError(
                f"CatsDogsDataModule: data root {str(root)!r} does not have the PetImages layout; "
                f"missing folder(s): {', '.join(missing)}{hint}.\nExpected layout:\n{LAYOUT}\nFix: {FIX}"
            )
        return pet

    def setup(self, stage: str | None = None) -> None:
        if self._built:
            return
        pet = self._pet_dir()
        rel_paths, labels_all = [], []
        for label, cls in enumerate(CLASS_DIRS):
            for entry in sorted(os.scandir(pet / cls), key=lambda e: e.name):
                if entry.is_file():
                    rel_paths.append(f"{cls}/{entry.name}")
                    labels_all.append(label)
        valid, skipped = scan_images(
            pet, rel_paths, cache_dir=self.cache_dir, workers=self.scan_workers, name="PetImages"
        )
        self.skipped_files = skipped
        self.num_skipped = len(skipped)
        label_of = dict(zip(rel_paths, labels_all))
        labels = [label_of[r] for r in valid]
        for label, cls in enumerate(CLASS_DIRS):
            if labels.count(label) < 3:
                raise DatasetLayoutError(
                    f"CatsDogsDataModule: {pet / cls} has {labels.count(label)} decodable images "
                    f"(need at least 3 for a train/val/test split; {self.num_skipped} files were "
                    f"skipped as unreadable).\nExpected layout:\n{LAYOUT}\nFix: {FIX}"
                )
        log.info(
            "PetImages: %d usable images (%d cats, %d dogs), %d skipped",
            len(valid), labels.count(0), labels.count(1), self.num_skipped,
        )
        paths = [str(pet / r) for r in valid]
        idx_train, idx_val, idx_test = stratified_split(labels, self.fractions, self.seed)
        train_tf = build_transforms(
            self.image_size, self.mean, self.std, train=True, augment=self.augment,
            crop_scale=self.crop_scale,
        )
        eval_tf = build_transforms(self.image_size, self.mean, self.std, train=False)

        def subset(idx, tf):
            return ImageListDataset([paths[i] for i in idx], [labels[i] for i in idx], tf)

        self.train_set = subset(idx_train, train_tf)
        self.val_set = subset(idx_val, eval_tf)
        self.test_sets = [subset(idx_test, eval_tf)]
        self._built = True
