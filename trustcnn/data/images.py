"""Images read from files: one robust decode (:func:`load_rgb`), a cached validity scan that finds the
files that are not images (:func:`scan_images`), and :class:`ImageListDataset`, which survives a file
that fails only later."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset
from torchvision import tv_tensors

from trustcnn.data.base import NO_MASK
from trustcnn.data.fingerprints import files_fingerprint, tensors_fingerprint, transform_fingerprint

log = logging.getLogger("trustcnn.data")


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
