"""Decoy digits: scikit-learn's bundled handwritten digits with a label-revealing decoy patch.

The "Decoy MNIST" construction of Ross et al. (2017, "Right for the right reasons") on the 1,797 real
8×8 digits that ship with scikit-learn (``sklearn.datasets.load_digits``), so it needs no download:

1. Each 8×8 digit (intensities 0..16 → [0, 1]) is upscaled bilinearly to
   ``digit_size = image_size - 2 * patch_size`` pixels and placed in the centre of a black
   ``image_size`` × ``image_size`` canvas, leaving a ``patch_size`` margin on every side.
2. A ``patch_size`` × ``patch_size`` square of one flat gray shade is drawn in one of the four corners
   (chosen at random per image). The corner lies in the margin, so the patch never touches the digit.
3. The shade of class ``y`` is ``shades[y]``, ``shades = linspace(shade_max, shade_min, 10)`` (class 0
   brightest, as Ross et al.'s ``255 - 25 y``). In **train** and **val** the patch has the shade of the
   image's label (a perfect shortcut); in **test** it has the shade of a class drawn uniformly at random,
   independently of the label. A second test set, **test_consistent**, shows the same test digits with
   label-consistent shades: the gap ``acc(test_consistent) - acc(test)`` measures reliance on the decoy.
4. Gray is replicated to 3 channels; normalization is mean = std = 0.5 per channel (pixels → [-1, 1]).
5. The mask is the digit's strokes: upscaled intensity > ``mask_threshold``. The patch is never in the
   mask, so a saliency map that lights up the patch is "inaccurate" by construction.

Everything (corners, random shades, the stratified train/val/test split) is a deterministic function of
``seed``; the whole data set is built as tensors in memory once, at ``setup``.

Defaults are tuned (see ``experiments/decoy_digits/TUNING.md`` and ``benchmarks/decoy_shortcut.py``) so
that ``small_cnn`` trained end to end with plain cross-entropy for a few CPU epochs fits the training
set and leans on the decoy.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from trustcnn.data.base import BaseDataModule
from trustcnn.data.fingerprints import tensors_fingerprint
from trustcnn.data.splits import split_fractions, stratified_split
from trustcnn.normalization import DECOY_MEAN, DECOY_STD

CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")


class TripletTensorDataset(Dataset):
    """In-memory ``(image, label, mask)`` items from three aligned tensors."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor) -> None:
        assert len(images) == len(labels) == len(masks)
        self.images, self.labels, self.masks = images, labels, masks

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i], self.masks[i]

    def cache_fingerprint(self) -> dict:
        """The samples are the tensors themselves: their contents are the fingerprint."""
        return {"dataset": "TripletTensorDataset", "tensors": tensors_fingerprint(self.images, self.labels, self.masks)}


def load_digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 bundled scikit-learn digits as float32 ``(N, 8, 8)`` in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def class_shades(num_classes: int, shade_min: float, shade_max: float) -> np.ndarray:
    """Decoy shade of each class: ``linspace(shade_max, shade_min, num_classes)``."""
    return np.linspace(shade_max, shade_min, num_classes).astype(np.float32)


def render_decoy_digits(
    digits: np.ndarray,
    corners: np.ndarray,
    shades: np.ndarray,
    image_size: int,
    patch_size: int,
    mask_threshold: float,
    digit_intensity: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render gray images in [0, 1] ``(N, 1, S, S)`` and stroke masks ``(N, 1, S, S)``.

    Args:
        digits: ``(N, 8, 8)`` intensities in [0, 1].
        corners: ``(N,)`` corner index into :data:`CORNERS`.
        shades: ``(N,)`` patch shade per image in [0, 1].
    """
    n = len(digits)
    s, p = int(image_size), int(patch_size)
    digit_size = s - 2 * p
    up = F.interpolate(
        torch.from_numpy(np.asarray(digits, np.float32))[:, None],
        size=(digit_size, digit_size), mode="bilinear", align_corners=False,
    ).clamp_(0.0, 1.0)
    gray = torch.zeros(n, 1, s, s)
    masks = torch.zeros(n, 1, s, s)
    masks[:, :, p : p + digit_size, p : p + digit_size] = (up > mask_threshold).to(torch.float32)
    gray[:, :, p : p + digit_size, p : p + digit_size] = up * digit_intensity
    for i in range(n):
        c = int(corners[i])
        r0 = 0 if c in (0, 1) else s - p
        c0 = 0 if c in (0, 2) else s - p
        gray[i, :, r0 : r0 + p, c0 : c0 + p] = float(shades[i])
    return gray, masks


class DecoyDigitsDataModule(BaseDataModule):
    """Decoy digits (see the module docstring). ``test_dataloader()`` returns two loaders:
    ``test`` (random decoys, the real test) and ``test_consistent`` (label-consistent decoys).

    Args:
        root: ignored (the data ships with scikit-learn); accepted for a uniform interface.
        batch_size, num_workers, seed: loader settings; ``seed`` fixes corners, shades and the split.
        image_size: square output size in pixels (tuned default 32).
        patch_size: decoy side in pixels (tuned default 4); must be < image_size / 4.
        shade_min, shade_max: darkest / brightest decoy shade in [0, 1] (class 9 / class 0).
        mask_threshold: stroke threshold on the upscaled digit intensity in [0, 1] (before
            ``digit_intensity`` scaling).
        digit_intensity: peak brightness of the digit strokes (1 = white).
        val_fraction, test_fraction: stratified split of the 1,797 digits (train gets the rest).
        val_decoys: ``consistent`` (default: validation carries the shortcut, like train) or ``random``
            (validation decoys drawn like test's, on validation digits: a split to select settings on
            without the shortcut and without touching test; the shortcut study tunes on it).
        pin_memory: passed to the data loaders.
    """

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        image_size: int = 32,
        patch_size: int = 4,
        shade_min: float = 0.1,
        shade_max: float = 1.0,
        mask_threshold: float = 0.25,
        digit_intensity: float = 0.7,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        val_decoys: str = "consistent",
        pin_memory: bool = False,
    ) -> None:
        super().__init__(root, batch_size, num_workers, seed, image_size, pin_memory)
        if not 1 <= patch_size < image_size / 4:
            raise ValueError(
                f"patch_size={patch_size} must be in [1, image_size/4) (image_size={image_size}) so the "
                f"digit keeps at least half of the image"
            )
        if not (0.0 <= shade_min < shade_max <= 1.0):
            raise ValueError(f"need 0 <= shade_min < shade_max <= 1, got {shade_min}, {shade_max}")
        self.patch_size = int(patch_size)
        self.shade_min = float(shade_min)
        self.shade_max = float(shade_max)
        self.mask_threshold = float(mask_threshold)
        if not 0.0 < digit_intensity <= 1.0:
            raise ValueError(f"digit_intensity must be in (0, 1], got {digit_intensity}")
        self.digit_intensity = float(digit_intensity)
        self.fractions = split_fractions(val_fraction, test_fraction)
        if val_decoys not in ("consistent", "random"):
            raise ValueError(f"data.val_decoys must be 'consistent' or 'random', got {val_decoys!r}")
        self.val_decoys = val_decoys
        if test_fraction <= 0:
            raise ValueError("test_fraction must be > 0 for decoy digits (the decoy test sets)")

        self.num_classes = 10
        self.class_names = [str(d) for d in range(10)]
        self.has_masks = True
        self.mean = DECOY_MEAN
        self.std = DECOY_STD
        self.test_set_names = ["test", "test_consistent"]
        self.shades = class_shades(self.num_classes, self.shade_min, self.shade_max)
        self._built = False

    def set_descriptions(self) -> dict[str, str]:
        """Lines for the final summary where this configuration differs from the usual description."""
        if self.val_decoys == "random":
            return {"val": "validation split with random decoys, drawn like test's on other digits (what checkpoints "
                           "and sweeps rank by: a split without the shortcut)"}
        return {}

    def build(self) -> dict[str, dict[str, torch.Tensor]]:
        """Build every split as tensors: ``{split: {"images", "labels", "masks", "shades", "corners",
        "index"}}`` with images in [0, 1] (unnormalized, gray replicated to 3 channels)."""
        digits, labels = load_digit_arrays()
        n = len(labels)
        rng = np.random.default_rng(self.seed)
        corners = rng.integers(0, 4, size=n)
        random_classes = rng.integers(0, self.num_classes, size=n)  # independent of the label
        consistent = self.shades[labels]
        random = self.shades[random_classes]
        idx_train, idx_val, idx_test = stratified_split(labels, self.fractions, self.seed)

        out = {}
        for name, idx, shade in (
            ("train", idx_train, consistent),
            ("val", idx_val, random if self.val_decoys == "random" else consistent),
            ("test", idx_test, random),
            ("test_consistent", idx_test, consistent),
        ):
            gray, masks = render_decoy_digits(
                digits[idx], corners[idx], shade[idx], self.image_size, self.patch_size,
                self.mask_threshold, self.digit_intensity,
            )
            out[name] = {
                "images": gray.expand(-1, 3, -1, -1).contiguous(),
                "labels": torch.from_numpy(labels[idx]),
                "masks": masks,
                "shades": torch.from_numpy(shade[idx]),
                "decoy_classes": torch.from_numpy((random_classes if name == "test" or (name == "val" and self.val_decoys == "random")
                                                   else labels)[idx]),
                "corners": torch.from_numpy(corners[idx]),
                "index": torch.from_numpy(idx),
            }
        return out

    def prediction_metrics(self, test_set: str, predictions: torch.Tensor) -> dict[str, float]:
        """``decoy_following_rate``: among the test images whose decoy names another class than the label,
        the share predicted as the decoy's class (chance: 1/10; a model that reads only the patch: 1)."""
        self.setup()
        split = self.splits[test_set]
        n = len(predictions)
        decoy, labels = split["decoy_classes"][:n], split["labels"][:n]
        conflict = decoy != labels
        if not conflict.any():  # test_consistent: decoy = label everywhere, nothing to measure
            return {}
        followed = (predictions.cpu()[conflict] == decoy[conflict]).double().mean()
        return {"decoy_following_rate": float(followed), "decoy_conflicts": float(conflict.sum())}

    def setup(self, stage: str | None = None) -> None:
        if self._built:
            return
        self.splits = self.build()
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)

        def dataset(name: str) -> TripletTensorDataset:
            s = self.splits[name]
            return TripletTensorDataset((s["images"] - mean) / std, s["labels"], s["masks"])

        self.train_set = dataset("train")
        self.val_set = dataset("val")
        self.test_sets = [dataset(n) for n in self.test_set_names]
        self._built = True
