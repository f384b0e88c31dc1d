"""Which rows of a split a role reads: a seeded, stratified label fraction, a validation split
carved from train, and the first K rows of a seeded shuffle (smoke runs). Positions only: the
callers index their own label and row arrays, so ``index`` is never renumbered.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from distortkd.errors import UserError


def stratified_subset(labels: np.ndarray, fraction: float, seed: int | Sequence[int],
                      option: str = "label_fraction") -> np.ndarray:
    """Sorted positions of a seeded, stratified ``fraction`` of ``labels [N]``.

    Each class keeps ``round(fraction * count)`` images (halves round up); a fraction that would
    keep none of some class is refused, naming ``option`` and the smallest class count.
    """
    classes, counts = np.unique(labels, return_counts=True)
    keep = np.floor(counts * fraction + 0.5).astype(int)
    if len(keep) and keep.min() == 0:
        n = int(counts.min())
        raise UserError(f"{option} {fraction} leaves a class without train images: the "
                        f"smallest class has {n} images; accepted: {option} >= {0.5 / n:.3g}")
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:k]
             for c, k in zip(classes, keep, strict=True)]
    return np.sort(np.concatenate(picks or [np.arange(0)]))


def carve_val(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(train, val)`` of ``labels [N]``: a seeded, stratified ``fraction`` becomes val,
    the rest train; refused when either side would lose a whole class."""
    # Its own stream (seed, 1): label_fraction later draws from ``seed`` on the train side.
    val = stratified_subset(labels, fraction, (seed, 1), "val_fraction")
    train = np.setdiff1d(np.arange(len(labels)), val, assume_unique=True)
    if len(train) and len(np.unique(labels[train])) < len(np.unique(labels)):
        n = int(np.unique(labels, return_counts=True)[1].min())
        raise UserError(f"val_fraction {fraction} leaves a class without train images: the "
                        f"smallest class has {n} images; accepted: val_fraction <= {1 - 0.5 / n:.3g}")
    return train, val


def first_k(index: np.ndarray, k: int | None, seed: int) -> np.ndarray:
    """The first ``k`` entries of ``index`` after a seeded shuffle, in ascending order."""
    if k is None or k >= len(index):
        return index
    return np.sort(np.random.default_rng(seed).permutation(index)[:k])
