"""ImageNet subset with the standard 1000-way labels (the paper's §4.2 VGG-16 data: 30,000 images).

Layout read (ImageFolder, one folder per WordNet id, as torchvision's ``ImageNet`` prepares it)::

    <root>/train/<wnid>/*.JPEG
    <root>/val/<wnid>/*.JPEG

Labels are the standard ILSVRC-2012 indices: the position of the wnid in the sorted list of the 1000
ImageNet wnids (shipped as ``trustcnn/data/imagenet_wnids.txt``, or ``wnids_file``), so a pretrained
1000-way head stays valid however few classes are present. ``num_classes`` is always 1000 and
``class_names`` is the 1000-wnid list; ``readable_names`` holds torchvision's human-readable names.

Training images can be subsampled (``subset_size``, stratified by class, deterministic from ``seed``);
validation is carved from that training subset (``val_from="train"``, default) or is ``root/val``
(``val_from="val"``, then it equals the test set). Test is ``root/val`` (the official validation set,
whose labels are public), optionally subsampled with ``test_subset_size``.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from trustcnn.data.base import BaseDataModule, DatasetLayoutError, require_root
from trustcnn.data.images import DEFAULT_CACHE_DIR, ImageListDataset, scan_images
from trustcnn.data.splits import split_fractions, stratified_split, stratified_subsample
from trustcnn.data.transforms import build_transforms
from trustcnn.normalization import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger("trustcnn.data")

WNIDS_FILE = Path(__file__).with_name("imagenet_wnids.txt")
WNID_RE = re.compile(r"^n\d{8}$")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

LAYOUT = """    <root>/train/<wnid>/*.JPEG     e.g. <root>/train/n01440764/n01440764_10026.JPEG
    <root>/val/<wnid>/*.JPEG       (validation images sorted into wnid folders)"""

FIX = (
    "point data.root at a folder with train/ and val/ ImageFolder trees (no automatic download: "
    "ImageNet needs a licence). torchvision.datasets.ImageNet(root, split=...) builds exactly this "
    "layout from ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz."
)


def load_wnids(path: str | os.PathLike | None = None) -> list[str]:
    """The 1000 ImageNet wnids in sorted (= class index) order.

    ``path`` may be a plain list (one wnid per line) or the official ``LOC_synset_mapping.txt``
    (``"n01440764 tench, Tinca tinca"``); the first token of each non-comment line is used.
    ``None`` reads the list shipped with trustcnn.
    """
    p = Path(os.path.expanduser(str(path))) if path is not None else WNIDS_FILE
    if not p.is_file():
        raise DatasetLayoutError(
            f"ImageNetSubsetDataModule: wnids file {str(p)!r} not found. Set data.wnids_file to the "
            f"official LOC_synset_mapping.txt (lines like 'n01440764 tench, Tinca tinca') or to a file "
            f"with the 1000 wnids one per line, or leave it unset to use the list shipped with trustcnn."
        )
    wnids = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        tok = line.split()[0].rstrip(":,")
        if not WNID_RE.match(tok):
            raise DatasetLayoutError(
                f"ImageNetSubsetDataModule: {p} has a line that does not start with a wnid "
                f"(n + 8 digits): {line!r}. Expected the 1000 ImageNet wnids, one per line, or "
                f"LOC_synset_mapping.txt."
            )
        wnids.append(tok)
    if len(wnids) != 1000 or len(set(wnids)) != 1000:
        raise DatasetLayoutError(
            f"ImageNetSubsetDataModule: {p} lists {len(set(wnids))} distinct wnids ({len(wnids)} lines); "
            f"the standard 1000-way labels need exactly the 1000 ILSVRC-2012 wnids (set data.wnids_file "
            f"to LOC_synset_mapping.txt from the official ImageNet download)."
        )
    if wnids != sorted(wnids):
        log.warning("%s is not sorted; using the sorted order (the standard class indices)", p)
        wnids = sorted(wnids)
    return wnids


def readable_imagenet_names() -> list[str]:
    """torchvision's 1000 human-readable ImageNet category names (index-aligned with the wnids)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def _list_images(folder: Path) -> list[str]:
    return sorted(
        e.name for e in os.scandir(folder)
        if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)
    )


class ImageNetSubsetDataModule(BaseDataModule):
    """ImageNet subset with 1000-way labels (see the module docstring).

    Args:
        root: folder with ``train/`` and ``val/`` wnid folders.
        batch_size, num_workers, seed: loader settings; ``seed`` fixes sampling, split and shuffling.
        image_size: square model input (224).
        classes: wnids to use (default: every wnid folder present in ``root/train``).
        subset_size: total number of training images to sample, stratified by class (``None``: all).
        val_from: ``"train"`` (carve ``val_fraction`` of the training subset) or ``"val"``
            (validate on ``root/val``, the test set).
        val_fraction: used with ``val_from="train"``.
        test_subset_size: number of ``root/val`` images to test on, stratified (``None``: all).
        wnids_file: optional 1000-wnid list / ``LOC_synset_mapping.txt`` (default: shipped list).
        augment, crop_scale: training-time ``RandomResizedCrop`` + flip.
        validate_files: decode every selected image once at setup and drop unreadable ones (cached
            under ``cache_dir`` like the cats-vs-dogs scan). Off by default; unreadable files met
            during an epoch fall back to the next readable sample either way.
        cache_dir: scan-cache location.
        pin_memory: passed to the data loaders.
    """

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 32,
        num_workers: int = 4,
        seed: int = 0,
        image_size: int = 224,
        classes: list[str] | None = None,
        subset_size: int | None = 30000,
        val_from: str = "train",
        val_fraction: float = 0.1,
        test_subset_size: int | None = None,
        wnids_file: str | None = None,
        augment: bool = True,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        validate_files: bool = False,
        cache_dir: str | None = DEFAULT_CACHE_DIR,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(root, batch_size, num_workers, seed, image_size, pin_memory)
        if val_from not in ("train", "val"):
            raise ValueError(f"val_from must be 'train' or 'val', got {val_from!r}")
        self.classes = None if classes is None else [str(c) for c in classes]
        self.subset_size = None if subset_size is None else int(subset_size)
        self.val_from = val_from
        self.fractions = split_fractions(val_fraction if val_from == "train" else 0.0, 0.0)[:2]
        self.test_subset_size = None if test_subset_size is None else int(test_subset_size)
        self.wnids_file = wnids_file
        self.augment = bool(augment)
        self.crop_scale = tuple(crop_scale)
        self.validate_files = bool(validate_files)
        self.cache_dir = cache_dir

        self.wnids = load_wnids(wnids_file)
        self.wnid_to_idx = {w: i for i, w in enumerate(self.wnids)}
        if self.classes is not None:
            unknown = [c for c in self.classes if c not in self.wnid_to_idx]
            if unknown:
                raise ValueError(
                    f"data.classes has entries that are not ImageNet-1k wnids: {unknown[:10]}"
                )
        self.num_classes = 1000
        self.class_names = list(self.wnids)
        self.has_masks = False
        self.mean = IMAGENET_MEAN
        self.std = IMAGENET_STD
        self.test_set_names = ["test"]
        self._built = False

    @property
    def readable_names(self) -> list[str]:
        """Human-readable names of the 1000 classes (torchvision's list)."""
        return readable_imagenet_names()

    # ------------------------------------------------------------------------------------------
    def _collect(self, split_dir: Path, classes: list[str]) -> tuple[list[str], list[int]]:
        paths, labels = [], []
        for wnid in classes:
            folder = split_dir / wnid
            if not folder.is_dir():
                raise DatasetLayoutError(
                    f"ImageNetSubsetDataModule: class folder {str(folder)!r} is missing (class {wnid} "
                    f"is selected).\nExpected layout:\n{LAYOUT}\nFix: {FIX}"
                )
            names = _list_images(folder)
            if not names:
                raise DatasetLayoutError(
                    f"ImageNetSubsetDataModule: {str(folder)!r} has no images "
                    f"({', '.join(IMG_EXTENSIONS)}).\nExpected layout:\n{LAYOUT}\nFix: {FIX}"
                )
            paths += [f"{wnid}/{n}" for n in names]
            labels += [self.wnid_to_idx[wnid]] * len(names)
        return paths, labels

    def _check(self, split_dir: Path, paths: list[str], labels: list[int], name: str):
        if not self.validate_files:
            return paths, labels
        valid, _ = scan_images(split_dir, paths, cache_dir=self.cache_dir, name=name)
        keep = set(valid)
        pairs = [(p, y) for p, y in zip(paths, labels) if p in keep]
        return [p for p, _ in pairs], [y for _, y in pairs]

    def setup(self, stage: str | None = None) -> None:
        if self._built:
            return
        root = require_root(self.root, "ImageNetSubsetDataModule", LAYOUT, FIX)
        train_dir, val_dir = root / "train", root / "val"
        missing = [str(d) for d in (train_dir, val_dir) if not d.is_dir()]
        if missing:
            raise DatasetLayoutError(
                f"ImageNetSubsetDataModule: data root {str(root)!r} lacks {', '.join(missing)}.\n"
                f"Expected layout:\n{LAYOUT}\nFix: {FIX}"
            )
        present = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
        if self.classes is None:
            not_wnids = [d for d in present if d not in self.wnid_to_idx]
            if not_wnids:
                raise DatasetLayoutError(
                    f"ImageNetSubsetDataModule: {str(train_dir)!r} has folders that are not ImageNet-1k "
                    f"wnids: {not_wnids[:10]}.\nExpected layout:\n{LAYOUT}\nFix: {FIX} (or list the "
                    f"classes to use in data.classes)"
                )
            if not present:
                raise DatasetLayoutError(
                    f"ImageNetSubsetDataModule: {str(train_dir)!r} has no wnid folders.\n"
                    f"Expected layout:\n{LAYOUT}\nFix: {FIX}"
                )
            classes = present
        else:
            classes = sorted(set(self.classes))
        if _list_images(val_dir) and not any(e.is_dir() for e in os.scandir(val_dir)):
            raise DatasetLayoutError(
                f"ImageNetSubsetDataModule: {str(val_dir)!r} holds images directly (the flat layout of "
                f"ILSVRC2012_img_val.tar); they must be sorted into <wnid>/ folders.\nExpected layout:\n"
                f"{LAYOUT}\nFix: {FIX}"
            )
        self.used_classes = classes

        tr_paths, tr_labels = self._collect(train_dir, classes)
        pick = stratified_subsample(tr_labels, self.subset_size, self.seed)
        tr_paths = [tr_paths[i] for i in pick]
        tr_labels = [tr_labels[i] for i in pick]
        tr_paths, tr_labels = self._check(train_dir, tr_paths, tr_labels, "ImageNet train")

        te_paths, te_labels = self._collect(val_dir, classes)
        pick = stratified_subsample(te_labels, self.test_subset_size, self.seed)
        te_paths = [te_paths[i] for i in pick]
        te_labels = [te_labels[i] for i in pick]
        te_paths, te_labels = self._check(val_dir, te_paths, te_labels, "ImageNet val")

        train_tf = build_transforms(
            self.image_size, self.mean, self.std, train=True, augment=self.augment,
            crop_scale=self.crop_scale,
        )
        eval_tf = build_transforms(self.image_size, self.mean, self.std, train=False)
        tr_abs = [str(train_dir / p) for p in tr_paths]
        te_abs = [str(val_dir / p) for p in te_paths]
        self.test_sets = [ImageListDataset(te_abs, te_labels, eval_tf)]
        if self.val_from == "train":
            idx_train, idx_val = stratified_split(tr_labels, self.fractions, self.seed)
            self.train_set = ImageListDataset(
                [tr_abs[i] for i in idx_train], [tr_labels[i] for i in idx_train], train_tf
            )
            self.val_set = ImageListDataset(
                [tr_abs[i] for i in idx_val], [tr_labels[i] for i in idx_val], eval_tf
            )
        else:
            self.train_set = ImageListDataset(tr_abs, tr_labels, train_tf)
            self.val_set = self.test_sets[0]
        log.info(
            "ImageNet subset: %d classes, %d train, %d val (%s), %d test images", len(classes),
            len(self.train_set), len(self.val_set), self.val_from, len(self.test_sets[0]),
        )
        self._built = True
