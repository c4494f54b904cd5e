"""Shared pieces of every trustcnn datamodule: one way to load an image, transform it, split a
dataset, build data loaders and undo the normalization.

Every datamodule yields ``(image, label, mask)``:

- ``image``: float32 ``(3, H, W)``, normalized with the datamodule's ``mean``/``std``;
- ``label``: int64 0-dim tensor;
- ``mask``: float32 ``(1, H, W)`` with object pixels = 1, everything else 0, or ``torch.zeros(0)`` when
  the data has no masks (a batch then has masks of shape ``(N, 0)``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, ImageFile
from pytorch_lightning.trainer.states import TrainerStatus
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import tv_tensors
from torchvision.transforms import v2

from trustcnn.callbacks import epoch_seed

log = logging.getLogger("trustcnn.data")

__all__ = [
    "NO_MASK",
    "BaseDataModule",
    "UncacheableDataError",
    "DatasetLayoutError",
    "ImageListDataset",
    "build_transforms",
    "denormalize",
    "load_rgb",
    "require_root",
    "scan_images",
    "stratified_split",
    "stratified_subsample",
]


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


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Fully decode the image at ``path`` and return it as an RGB PIL image.

    Decodes by content, not by extension (a PNG named ``.jpg`` loads), converts grayscale, palette,
    RGBA and CMYK images to RGB, and raises (``OSError``/``ValueError``/
    ``PIL.UnidentifiedImageError``/``SyntaxError``) for anything that is not a complete image: empty or
    random files, ``Thumbs.db``, truncated JPEGs. Truncation is detected only while PIL's global
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` is False (its default); trustcnn never sets it.
    """
    with Image.open(path) as img:
        img.load()  # a real decode: verify() alone misses truncated data
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            # 16-bit / float grayscale: rescale to 8 bit before RGB conversion
            arr = np.asarray(img, dtype=np.float64)
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
            img = Image.fromarray(arr.astype(np.uint8), mode="L")
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img)
        rgb = img.convert("RGB")
        if rgb.width < 1 or rgb.height < 1:
            raise ValueError(f"image {path} has no pixels")
        return rgb


def truncated_images_allowed() -> bool:
    """Whether some code switched PIL's ``LOAD_TRUNCATED_IMAGES`` on (then truncation goes unnoticed)."""
    return bool(ImageFile.LOAD_TRUNCATED_IMAGES)


def build_transforms(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    augment: bool = True,
    resize_ratio: float = 256 / 224,
    crop_scale: tuple[float, float] = (0.5, 1.0),
) -> v2.Compose:
    """The photo transform, applied jointly to an image and (optionally) a ``tv_tensors.Mask``.

    - train with ``augment``: ``RandomResizedCrop(image_size, scale=crop_scale)`` + horizontal flip;
    - otherwise (eval, or train without augment): ``Resize(round(image_size * resize_ratio))`` +
      ``CenterCrop(image_size)`` (the classic 256 → 224 evaluation crop, scaled to ``image_size``).

    Masks follow the same geometry with nearest-neighbour interpolation and are left unnormalized.
    """
    ops: list = [v2.ToImage()]
    if train and augment:
        ops += [
            v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True),
            v2.RandomHorizontalFlip(0.5),
        ]
    else:
        ops += [
            v2.Resize(int(round(image_size * resize_ratio)), antialias=True),
            v2.CenterCrop(image_size),
        ]
    ops += [
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        v2.Normalize(list(mean), list(std)),
    ]
    return v2.Compose(ops)


def denormalize(
    x: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Undo ``Normalize(mean, std)`` on ``(3, H, W)`` or ``(N, 3, H, W)`` and clamp to [0, 1]."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x * s + m).clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# Fingerprints for the feature cache (trustcnn.feature_cache)
# --------------------------------------------------------------------------------------------------


class UncacheableDataError(ValueError):
    """A dataset whose samples are not a fixed function of its files (or tensors), so features computed
    from them once cannot stand in for every later epoch; the message says why."""


# Transforms that give the same output for the same input every call. Anything else (RandomResizedCrop,
# flips, ColorJitter, AutoAugment, a Lambda of unknown content, ...) refuses the feature cache: an
# allowlist, because an unknown op that draws random numbers would make the cache silently inexact.
DETERMINISTIC_TRANSFORMS = frozenset({
    "Compose", "ToImage", "ToTensor", "PILToTensor", "ToPureTensor", "ToDtype", "ConvertImageDtype",
    "Resize", "CenterCrop", "Normalize", "Grayscale", "Pad", "Identity",
})


def transform_fingerprint(transform: Callable | None) -> list:
    """Every op of ``transform`` with its settings, for a cache key; raises :class:`UncacheableDataError`
    on an op that is not known to be deterministic (random augmentation)."""
    if transform is None:
        return []
    name = type(transform).__name__
    if name not in DETERMINISTIC_TRANSFORMS:
        raise UncacheableDataError(f"the transform {name} is random or not known to be deterministic (random "
                                   "augmentation gives other pixels every epoch)")
    if hasattr(transform, "transforms"):
        return [name, [transform_fingerprint(t) for t in transform.transforms]]
    settings = {k: repr(v) for k, v in sorted(vars(transform).items()) if not k.startswith("_") and k != "training"}
    return [name, settings]


def files_fingerprint(paths: Sequence[str]) -> str:
    """Hash of the paths with each file's size and mtime: moving, adding, removing or rewriting a file
    changes it (one ``stat`` per file)."""
    digest = hashlib.sha1()
    for path in paths:
        st = os.stat(path)
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def tensors_fingerprint(*tensors: torch.Tensor) -> str:
    """Hash of the tensors' dtypes, shapes and contents."""
    digest = hashlib.sha1()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    return digest.hexdigest()


DEFAULT_CACHE_DIR = "~/.cache/trustcnn"
_SCAN_VERSION = 1
_NAMES_LOGGED = 10  # how many skipped file names a scan logs


def _decode_error(path: str) -> str | None:
    """``None`` if ``path`` fully decodes with :func:`load_rgb`, else a one-line reason."""
    try:
        load_rgb(path)
    except Exception as err:  # noqa: BLE001 - every failure is a reason to skip the file
        reason = str(err).replace(str(path), os.path.basename(str(path))).replace("\n", " ")
        return f"{type(err).__name__}: {reason}"[:200]
    return None


def scan_images(
    root: Path,
    rel_paths: Sequence[str],
    cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR,
    workers: int | None = None,
    name: str = "images",
) -> tuple[list[str], list[tuple[str, str]]]:
    """Find which files under ``root`` are decodable images, by a real decode of each one.

    The result is cached in ``cache_dir`` (never in ``root``, which may be read-only) in a JSON file
    keyed by ``name`` and the resolved ``root``; a file is re-decoded only when its size or mtime changed, so a
    second run over 25k files costs one ``stat`` per file. ``cache_dir=None`` disables the cache; an
    unwritable cache directory only logs a warning.

    Args:
        root: directory the relative paths are relative to.
        rel_paths: files to check, relative to ``root`` (``/``-separated).
        cache_dir: where the scan cache lives (``~`` is expanded).
        workers: decoding threads (PIL releases the GIL while decoding); default ``min(8, cpus)``.
        name: what to call the data in log messages.

    Returns:
        ``(valid, skipped)``: the valid relative paths in input order, and ``(rel_path, reason)`` for
        every skipped file.
    """
    root = Path(root).resolve()
    stats: dict[str, tuple[int, int]] = {}
    for rel in rel_paths:
        st = os.stat(root / rel)
        stats[rel] = (int(st.st_size), int(st.st_mtime_ns))

    cache_file = None
    cached: dict = {}
    if cache_dir is not None:
        key = hashlib.sha1(f"{name}\0{root}".encode()).hexdigest()[:16]
        cache_file = Path(os.path.expanduser(str(cache_dir))) / f"scan-{key}.json"
        try:
            data = json.loads(cache_file.read_text())
            if data.get("version") == _SCAN_VERSION and data.get("root") == str(root):
                cached = data.get("files", {})
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as err:
            log.warning("%s: ignoring unreadable scan cache %s (%s)", name, cache_file, err)

    results: dict[str, str | None] = {}
    todo = []
    for rel in rel_paths:
        entry = cached.get(rel)
        if entry is not None and (entry.get("size"), entry.get("mtime_ns")) == stats[rel]:
            results[rel] = entry.get("error")
        else:
            todo.append(rel)

    if todo:
        if truncated_images_allowed():
            log.warning(
                "%s: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by other code); truncated files "
                "will pass the validity scan", name,
            )
        workers = workers or min(8, os.cpu_count() or 1)
        log.info("%s: decoding %d of %d files to check them (%d workers)", name, len(todo),
                 len(rel_paths), workers)
        paths = [str(root / rel) for rel in todo]
        if workers > 1 and len(todo) > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                errors = list(pool.map(_decode_error, paths, chunksize=16))
        else:
            errors = [_decode_error(p) for p in paths]
        results.update(zip(todo, errors))
        if cache_file is not None:
            files = {
                rel: {"size": stats[rel][0], "mtime_ns": stats[rel][1], "error": results[rel]}
                for rel in rel_paths
            }
            try:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=".scan-", suffix=".json")
                with os.fdopen(fd, "w") as fh:
                    json.dump({"version": _SCAN_VERSION, "root": str(root), "files": files}, fh)
                os.replace(tmp, cache_file)
            except OSError as err:
                log.warning("%s: could not write the scan cache %s (%s); the next run will decode "
                            "again (set data.cache_dir to a writable folder)", name, cache_file, err)
    else:
        log.info("%s: all %d files known from the scan cache %s", name, len(rel_paths), cache_file)

    valid = [rel for rel in rel_paths if results[rel] is None]
    skipped = [(rel, results[rel]) for rel in rel_paths if results[rel] is not None]
    if skipped:
        first = "; ".join(f"{rel} ({why})" for rel, why in skipped[:_NAMES_LOGGED])
        log.warning(
            "%s: skipped %d of %d files under %s that are not decodable images; first %d: %s",
            name, len(skipped), len(rel_paths), root, min(_NAMES_LOGGED, len(skipped)), first,
        )
    return valid, skipped


# --------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------


def stratified_split(
    labels: Sequence[int] | np.ndarray, fractions: Sequence[float], seed: int
) -> list[np.ndarray]:
    """Deterministic stratified split of ``range(len(labels))`` into ``len(fractions)`` parts.

    Systematic stratified sampling: each class's samples are shuffled (``numpy.random.default_rng(seed)``)
    and given evenly spaced quantile positions ``(i + 0.5) / n_class``; all samples are ordered by
    position (ties broken at random) and the order is cut at ``round(cumsum(fractions) * N)``. So the
    parts have exactly the requested overall sizes (up to rounding), every class keeps its proportion in
    every part up to one sample, even when classes are tiny, and the result depends only on
    ``labels``, ``fractions`` and ``seed``. Returns sorted index arrays, one per part.
    """
    labels = np.asarray(labels)
    fractions = np.asarray([float(f) for f in fractions])
    if (fractions < 0).any() or fractions.sum() <= 0:
        raise ValueError(f"split fractions must be >= 0 with a positive sum, got {fractions.tolist()}")
    fractions = fractions / fractions.sum()
    n = len(labels)
    rng = np.random.default_rng(seed)
    position = np.empty(n, dtype=np.float64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        position[idx] = (np.arange(len(idx)) + 0.5) / len(idx)
    order = np.lexsort((rng.random(n), position))
    cuts = np.round(np.cumsum(fractions) * n).astype(int)
    cuts[-1] = n
    starts = np.concatenate([[0], cuts[:-1]])
    return [np.sort(order[a:b]) for a, b in zip(starts, cuts)]


def split_fractions(val_fraction: float, test_fraction: float = 0.0) -> list[float]:
    """``[train, val, test]`` fractions from the two configurable ones, validated."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"need 0 <= val_fraction, test_fraction and val_fraction + test_fraction < 1, got "
            f"val_fraction={val_fraction}, test_fraction={test_fraction}"
        )
    return [1.0 - val_fraction - test_fraction, val_fraction, test_fraction]


def stratified_subsample(
    labels: Sequence[int] | np.ndarray, size: int | None, seed: int
) -> np.ndarray:
    """Deterministically pick ``size`` indices, stratified by label (class proportions kept up to one
    sample, see :func:`stratified_split`). ``None`` or ``size >= len(labels)`` keeps everything."""
    labels = np.asarray(labels)
    if size is None or size >= len(labels):
        return np.arange(len(labels))
    if size <= 0:
        raise ValueError(f"subset_size must be positive, got {size}")
    frac = size / len(labels)
    return stratified_split(labels, [frac, 1.0 - frac], seed)[0]


# --------------------------------------------------------------------------------------------------
# Datasets and the datamodule base
# --------------------------------------------------------------------------------------------------


class EpochShuffleSampler(DistributedSampler):
    """A random order of ``n`` indices that is a function of ``(seed, epoch)``, optionally sharded.

    Lightning calls ``set_epoch`` before every training epoch. A ``DataLoader`` generator would instead
    restart from its seed whenever the loader is rebuilt, so a run resumed from a checkpoint would replay
    epoch 0's order; with this sampler epoch ``e`` has the same order in a resumed and an uninterrupted run.

    Under DDP (``world_size > 1``) every rank draws the same global order and takes every
    ``world_size``-th index from position ``rank``: with a per-rank batch of ``B``, the ranks' batches
    ``k`` together are exactly the one-process batch ``k`` of ``world_size * B`` samples, so DDP's averaged
    gradient is the one-process gradient. The order is padded with its own first indices to a multiple of
    ``world_size`` (as ``DistributedSampler`` does) so that every rank runs the same number of steps; only
    the last batch of an epoch can differ from one process, and only when ``n`` is not a multiple of
    ``world_size``.

    It is a ``DistributedSampler`` only so that Lightning (``use_distributed_sampler=True``) leaves it
    alone instead of sharding it a second time; none of the parent's sampling is used.

    ``resume_at=(epoch, k)``: a run resumed from a checkpoint written ``k`` indices (of this rank) into
    ``epoch`` (a preempted job's mid-epoch checkpoint) gets the rest of that epoch's order, once; ``__len__``
    stays the full epoch's, as Lightning counts the batches already done itself.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1,
                 resume_at: tuple[int, int] | None = None) -> None:
        _check_shard(rank, world_size)
        self.n, self.seed, self.epoch = int(n), int(seed), 0
        self.rank, self.num_replicas = int(rank), int(world_size)
        self.shuffle, self.drop_last = True, False
        self.num_samples = -(-self.n // self.num_replicas)  # per rank, after padding
        self.total_size = self.num_samples * self.num_replicas
        self.resume_at = resume_at

    def global_order(self) -> list[int]:
        """The order of one process (``world_size = 1``) for the current epoch, before sharding."""
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return torch.randperm(self.n, generator=generator).tolist()

    def __iter__(self):
        order = self.global_order()
        if self.num_replicas > 1:
            padding = self.total_size - self.n
            order += (order * (padding // max(self.n, 1) + 1))[:padding]
            order = order[self.rank :: self.num_replicas]
        if self.resume_at is not None and self.resume_at[0] == self.epoch:
            order = order[self.resume_at[1]:]
        self.resume_at = None  # only the epoch the run resumed in
        return iter(order)

    def __len__(self) -> int:
        return self.num_samples


def _rank_seed(seed: int, rank: int) -> int:
    """The data-loader seed of DDP rank ``rank``: ``seed`` itself on rank 0 (= one process)."""
    return int(seed) if rank == 0 else int(np.random.SeedSequence([int(seed), 0x5EED, int(rank)]).generate_state(1)[0])


class ShardSampler(DistributedSampler):
    """Evaluation sharding without padding: rank ``r`` of ``world_size`` reads indices ``r, r + world_size, ...``
    of ``range(n)`` in order, so every image is evaluated exactly once (``DistributedSampler`` would repeat
    some to even out the ranks, and count them twice in the metrics). Ranks may get one image (and so one
    batch) more than others; :func:`interleave_shards` puts their per-sample results back in loader order.
    A ``DistributedSampler`` only so that Lightning does not wrap it (see :class:`EpochShuffleSampler`).
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        _check_shard(rank, world_size)
        if n < world_size:
            raise ValueError(f"{n} evaluation samples cannot be shared by {world_size} processes: each rank needs "
                             "at least one (a rank without batches would wait forever for the others' metrics)")
        self.n, self.rank, self.num_replicas = int(n), int(rank), int(world_size)
        self.shuffle, self.drop_last, self.epoch, self.seed = False, False, 0, 0
        self.num_samples = len(range(self.rank, self.n, self.num_replicas))
        self.total_size = self.n

    def __iter__(self):
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


def _check_shard(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size), got rank={rank}, world_size={world_size}")


def interleave_shards(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-sample results of the ranks of a :class:`ShardSampler` loader (``parts[r]``: rank ``r``'s, in its
    order) back in the one-process loader order: position ``j * world_size + r`` holds ``parts[r][j]``.

    Any first-``k``-batches limit leaves each rank a prefix of its shard, and their union is then a prefix
    of the loader order, which is what this returns."""
    world_size = len(parts)
    total = sum(len(p) for p in parts)
    if world_size == 1:
        return parts[0]
    out = parts[0].new_empty((total, *parts[0].shape[1:]))
    for rank, part in enumerate(parts):
        expected = len(range(rank, total, world_size))
        if len(part) != expected:
            raise ValueError(f"rank {rank} holds {len(part)} results, but a prefix of {total} samples sharded over "
                             f"{world_size} ranks gives it {expected}: the shards are not a ShardSampler's")
        out[rank::world_size] = part
    return out


class ImageListDataset(Dataset):
    """Images read from files, ``(image, label, mask)`` items, robust to files that fail late.

    Args:
        paths: image files.
        labels: integer labels, one per path.
        transform: joint transform ``(PIL image[, tv_tensors.Mask]) -> (tensor[, mask])``.
        mask_fn: optional ``index -> uint8 array (H, W)`` of object (1) / other (0) pixels, at the
            image's resolution; ``None`` for data without masks.

    If a file cannot be decoded (e.g. it changed after the validity scan), the item falls back
    deterministically to the next index that loads and logs a warning naming the file; the dataset
    never raises mid-epoch unless no file at all can be read.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        labels: Sequence[int],
        transform: Callable,
        mask_fn: Callable[[int], np.ndarray] | None = None,
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = [str(p) for p in paths]
        self.labels = [int(y) for y in labels]
        self.transform = transform
        self.mask_fn = mask_fn
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def cache_fingerprint(self) -> dict:
        """What the samples are a function of: the transform, the files (paths, sizes, mtimes; the mask
        files too, for a mask reader that names them), the labels. Raises :class:`UncacheableDataError`
        for a random transform."""
        files = list(self.paths)
        masks: dict | None = None
        if self.mask_fn is not None:
            settings = vars(self.mask_fn) if hasattr(self.mask_fn, "__dict__") else {}
            mask_files = [p for v in settings.values() if isinstance(v, (list, tuple))
                          and v and all(isinstance(e, str) for e in v) for p in v]
            masks = {"reader": f"{type(self.mask_fn).__module__}.{type(self.mask_fn).__qualname__}",
                     "settings": {k: repr(v) for k, v in sorted(settings.items())
                                  if not (isinstance(v, (list, tuple)) and v and all(isinstance(e, str) for e in v))},
                     "files": files_fingerprint(mask_files)}
        return {"dataset": "ImageListDataset", "transform": transform_fingerprint(self.transform),
                "files": files_fingerprint(files), "labels": tensors_fingerprint(torch.tensor(self.labels)),
                "masks": masks}

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = load_rgb(self.paths[index])
        if self.mask_fn is None:
            x = self.transform(img)
            return x.as_subclass(torch.Tensor), NO_MASK()
        m = np.asarray(self.mask_fn(index), dtype=np.uint8)
        if m.shape != (img.height, img.width):  # never in the official data; align, don't fail
            m = np.asarray(Image.fromarray(m).resize(img.size, Image.NEAREST))
        x, mask = self.transform(img, tv_tensors.Mask(torch.from_numpy(m.copy())[None]))
        return x.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).to(torch.float32)

    def __getitem__(self, index: int):
        n = len(self.paths)
        for step in range(n):
            j = (index + step) % n
            if j in self._bad:
                continue
            try:
                x, mask = self._load(j)
            except Exception as err:  # noqa: BLE001 - any unreadable file must not kill the epoch
                self._bad.add(j)
                log.warning(
                    "could not load %s (%s: %s); using the next readable sample instead",
                    self.paths[j], type(err).__name__, err,
                )
                continue
            return x, torch.tensor(self.labels[j], dtype=torch.int64), mask
        raise RuntimeError(f"none of the {n} images of this dataset could be loaded")


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
