"""Oxford-IIIT Pet as cats vs dogs *with* object masks (for the mask loss and the mask metrics).

Read through ``torchvision.datasets.OxfordIIITPet``: its split files, its binary labels and its download.
The layout it reads (the official archives unpacked)::

    <root>/oxford-iiit-pet/images/<Name>.jpg
    <root>/oxford-iiit-pet/annotations/trainval.txt     lines "Image CLASS-ID SPECIES BREED-ID"
    <root>/oxford-iiit-pet/annotations/test.txt         (species 1 = cat, 2 = dog)
    <root>/oxford-iiit-pet/annotations/trimaps/<Name>.png   1 = pet, 2 = background, 3 = border

Labels are torchvision's ``binary-category`` (the SPECIES column): cat = 0, dog = 1. The mask is the
``segmentation`` trimap with pet = 1, background = 0 and border = ``border_as`` (1 by default: the border
band is part of the animal's outline). The same spatial transform is applied to image and mask (mask with
nearest-neighbour interpolation): resize + center crop for evaluation, ``RandomResizedCrop`` + horizontal
flip for training when ``augment``. The test set is the official ``test.txt``; validation is carved from
``trainval.txt`` deterministically, stratified by species. An image that fails to decode is replaced by
the next readable one with a warning naming it (:class:`~trustcnn.data.images.ImageListDataset`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets import OxfordIIITPet

from trustcnn.data.base import BaseDataModule, DatasetLayoutError, require_root
from trustcnn.data.images import ImageListDataset
from trustcnn.data.splits import split_fractions, stratified_split
from trustcnn.data.transforms import build_transforms
from trustcnn.normalization import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger("trustcnn.data")

LAYOUT = """    <root>/oxford-iiit-pet/images/<Name>.jpg
    <root>/oxford-iiit-pet/annotations/trainval.txt   (lines: Image CLASS-ID SPECIES BREED-ID)
    <root>/oxford-iiit-pet/annotations/test.txt
    <root>/oxford-iiit-pet/annotations/trimaps/<Name>.png"""

FIX = (
    "set data.download=true to download it with torchvision's OxfordIIITPet (about 800 MB, needs "
    "network), or unpack the official images.tar.gz and annotations.tar.gz "
    "(https://www.robots.ox.ac.uk/~vgg/data/pets/) into <root>/oxford-iiit-pet/ and set data.root=<root>."
)


def trimap_to_mask(trimap: np.ndarray, border_as: int = 1) -> np.ndarray:
    """Binary uint8 mask from an Oxford trimap (1 pet, 2 background, 3 border)."""
    mask = trimap == 1
    if border_as:
        mask |= trimap == 3
    return mask.astype(np.uint8)


class TrimapMasks:
    """Picklable ``index -> mask`` reader for :class:`ImageListDataset` (works with worker processes)."""

    def __init__(self, trimap_paths: list[str], border_as: int = 1) -> None:
        self.trimap_paths = trimap_paths
        self.border_as = border_as

    def __call__(self, i: int) -> np.ndarray:
        with Image.open(self.trimap_paths[i]) as t:
            t.load()
            if t.mode not in ("L", "P"):
                t = t.convert("L")
            return trimap_to_mask(np.asarray(t), self.border_as)


class OxfordPetDataModule(BaseDataModule):
    """Oxford-IIIT Pet, binary cat/dog labels + trimap masks (see the module docstring).

    Args:
        root: folder that contains (or will contain, with ``download``) ``oxford-iiit-pet/``.
        batch_size, num_workers, seed: loader settings; ``seed`` fixes the val split and shuffling.
        image_size: square model input (224).
        val_fraction: part of ``trainval`` held out for validation (stratified by species).
        border_as: value of the trimap border band in the mask, 1 (default) or 0.
        augment: training-time ``RandomResizedCrop`` + flip (applied jointly to image and mask).
        crop_scale: area range of that crop.
        download: download with torchvision's downloader in ``prepare_data`` when missing.
        pin_memory: passed to the data loaders.
    """

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 32,
        num_workers: int = 4,
        seed: int = 0,
        image_size: int = 224,
        val_fraction: float = 0.1,
        border_as: int = 1,
        augment: bool = True,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        download: bool = False,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(root, batch_size, num_workers, seed, image_size, pin_memory)
        if border_as not in (0, 1):
            raise ValueError(f"border_as must be 0 or 1, got {border_as!r}")
        self.fractions = split_fractions(val_fraction, 0.0)[:2]
        self.border_as = int(border_as)
        self.augment = bool(augment)
        self.crop_scale = tuple(crop_scale)
        self.download = bool(download)
        self.num_classes = 2
        self.class_names = ["cat", "dog"]
        self.has_masks = True
        self.mean = IMAGENET_MEAN
        self.std = IMAGENET_STD
        self.test_set_names = ["test"]
        self._built = False

    # ------------------------------------------------------------------------------------------
    def _base(self) -> Path:
        return Path(str(self.root)).expanduser().resolve() / "oxford-iiit-pet"

    def _missing(self, base: Path) -> list[str]:
        need = [base / "images", base / "annotations" / "trimaps"]
        files = [base / "annotations" / "trainval.txt", base / "annotations" / "test.txt"]
        return [str(p) for p in need if not p.is_dir()] + [str(p) for p in files if not p.is_file()]

    def prepare_data(self) -> None:
        if not self.download:
            return
        if self.root is None:
            require_root(self.root, "OxfordPetDataModule", LAYOUT, FIX)
        base = self._base()
        if not self._missing(base):
            return
        base.parent.mkdir(parents=True, exist_ok=True)
        log.info("Oxford-IIIT Pet: downloading into %s", base)
        OxfordIIITPet(str(base.parent), download=True)

    def _check_layout(self) -> Path:
        """The data root (the folder that holds ``oxford-iiit-pet/``), downloaded first if asked to."""
        if self.download and (self.root is None or self._missing(self._base())):
            self.prepare_data()
        root = require_root(self.root, "OxfordPetDataModule", LAYOUT, FIX)
        base = root / "oxford-iiit-pet"
        missing = self._missing(base)
        if missing:
            hint = ""
            if (root / "images").is_dir() and (root / "annotations").is_dir():
                hint = (f" (data.root points at the oxford-iiit-pet folder itself; use its parent "
                        f"{root.parent})")
            raise DatasetLayoutError(
                f"OxfordPetDataModule: data root {str(root)!r} does not have the Oxford-IIIT Pet layout; "
                f"missing: {', '.join(missing)}{hint}.\nExpected layout:\n{LAYOUT}\nFix: {FIX}"
            )
        return root

    def _read_split(self, root: Path, split: str) -> tuple[list[str], list[str], list[int]]:
        """Image files, trimap files and binary labels of ``split`` (``trainval`` or ``test``)."""
        split_file = root / "oxford-iiit-pet" / "annotations" / f"{split}.txt"
        try:
            pets = OxfordIIITPet(str(root), split=split, target_types=["binary-category", "segmentation"])
        except ValueError as err:  # torchvision unpacks each line into exactly four fields
            raise DatasetLayoutError(
                f"OxfordPetDataModule: {split_file} is not a list of 'Image CLASS-ID SPECIES BREED-ID' lines "
                f"({err}).\nExpected layout:\n{LAYOUT}\nFix: {FIX}"
            ) from None
        # torchvision keeps what it parsed in private lists and has no public accessor; reading them through
        # pets[i] would decode every image just to learn its label.
        images = [str(p) for p in pets._images]
        trimaps = [str(p) for p in pets._segs]
        labels = list(pets._bin_labels)
        if not images:
            raise DatasetLayoutError(
                f"OxfordPetDataModule: {split_file} lists no images.\nExpected layout:\n{LAYOUT}\nFix: {FIX}"
            )
        bad = [(Path(img).stem, y + 1) for img, y in zip(images, labels) if y not in (0, 1)]
        if bad:
            raise DatasetLayoutError(
                f"OxfordPetDataModule: {split_file} gives {len(bad)} image(s) a SPECIES other than 1 (cat) or "
                f"2 (dog), e.g. {bad[0][0]} with SPECIES {bad[0][1]}.\nExpected layout:\n{LAYOUT}\nFix: {FIX}"
            )
        missing = [p for p in images + trimaps if not Path(p).is_file()]
        if missing:
            raise DatasetLayoutError(
                f"OxfordPetDataModule: {len(missing)} file(s) listed in {split}.txt are missing, e.g. "
                f"{', '.join(missing[:5])}.\nExpected layout:\n{LAYOUT}\nFix: {FIX}"
            )
        return images, trimaps, labels

    def setup(self, stage: str | None = None) -> None:
        if self._built:
            return
        root = self._check_layout()
        tv_images, tv_trimaps, tv_labels = self._read_split(root, "trainval")
        te_images, te_trimaps, te_labels = self._read_split(root, "test")
        idx_train, idx_val = stratified_split(tv_labels, self.fractions, self.seed)
        train_tf = build_transforms(
            self.image_size, self.mean, self.std, train=True, augment=self.augment,
            crop_scale=self.crop_scale,
        )
        eval_tf = build_transforms(self.image_size, self.mean, self.std, train=False)

        def dataset(images, trimaps, labels, idx, tf):
            masks = TrimapMasks([trimaps[i] for i in idx], self.border_as)
            return ImageListDataset(
                [images[i] for i in idx], [labels[i] for i in idx], tf, mask_fn=masks
            )

        self.train_set = dataset(tv_images, tv_trimaps, tv_labels, idx_train, train_tf)
        self.val_set = dataset(tv_images, tv_trimaps, tv_labels, idx_val, eval_tf)
        all_test = np.arange(len(te_labels))
        self.test_sets = [dataset(te_images, te_trimaps, te_labels, all_test, eval_tf)]
        log.info(
            "Oxford-IIIT Pet: %d train, %d val, %d test images", len(idx_train), len(idx_val),
            len(all_test),
        )
        self._built = True
