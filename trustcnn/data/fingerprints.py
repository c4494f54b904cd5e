"""Fingerprints of what a dataset's samples are a function of (transforms, files, tensors), the keys
of the feature cache (:mod:`trustcnn.feature_cache`)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence

import torch


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
