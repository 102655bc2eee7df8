"""The selection's cross-validation folds and, on many images, the sample it ranks the settings on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ._validation import check_folds
from .errors import UsageError


def make_folds(y: np.ndarray, groups: Sequence[Any] | None, folds: int, seed: int) -> list[tuple[np.ndarray, ...]]:
    """Stratified folds in which members of one group (identical files) stay together."""
    from sklearn.model_selection import StratifiedGroupKFold

    groups = np.arange(len(y)) if groups is None else np.asarray([str(g) for g in groups])
    splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
    return [(np.sort(tr), np.sort(te)) for tr, te in splitter.split(np.zeros(len(y)), y, groups)]


def selection_sample(y: np.ndarray, groups: Sequence[Any] | None, max_images: int | None, folds: int,
                     seed: int) -> np.ndarray | None:
    """Indices of a stratified sample of at most about ``max_images`` images to rank the settings on, or None (all).

    Ranking settings needs far fewer images than fitting the winner, while every candidate's cost grows
    with the images (see ``benchmarks/head.py``). The sample is a stratified draw of files (copies of a
    file stay together), plus every image of a class too small to leave ``folds`` distinct images in it.
    """
    if max_images is None or len(y) <= max_images:
        return None
    from sklearn.model_selection import train_test_split

    keys = np.arange(len(y)) if groups is None else np.asarray([str(g) for g in groups])
    _, first, group_of = np.unique(keys, return_index=True, return_inverse=True)
    # stratified over groups, each labelled by its first image: scikit-learn's StratifiedGroupKFold is
    # quadratic in the groups (59 s for 50,000 distinct images) where this takes milliseconds
    share = max_images / len(y)
    counts = np.bincount(y[first])
    rare = np.flatnonzero((counts > 0) & (counts * share < folds))  # too few for the folds: taken whole
    common = np.flatnonzero(~np.isin(y[first], rare))
    if len(common) == 0:  # every class too small to sample
        return None
    left_out_min = len(np.unique(y[first][common]))  # the draw leaves at least one file of each class out
    size = min(max(1, round(share * len(first)) - int(counts[rare].sum())), len(common) - left_out_min)
    _, part = train_test_split(common, test_size=size, stratify=y[first][common], random_state=seed)
    return np.flatnonzero(np.isin(group_of, part) | np.isin(y, rare))


def fold_count(y: np.ndarray, folds: int, groups: Sequence[Any] | None = None) -> tuple[int, str | None]:
    """The folds that the smallest class allows (at least 2), and a note when fewer than asked.

    A class counts its distinct files (``groups``): copies of one file share a fold, so a class of two
    identical files cannot be on both sides of a split.
    """
    check_folds(folds)
    if groups is None:
        smallest = int(np.bincount(y).min())
    else:
        keys = np.asarray([str(g) for g in groups])
        smallest = min(len(set(keys[y == c])) for c in np.unique(y))
    if smallest < 2:
        raise UsageError(f"cross-validation needs at least 2 distinct images in every class (the smallest has "
                         f"{smallest}); add images to that class")
    if smallest >= folds:
        return folds, None
    return smallest, f"the smallest class has {smallest} distinct images, so {smallest}-fold CV instead of {folds}-fold"
