"""Deterministic, stratified train/val/test splits and subsets of labelled data."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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
