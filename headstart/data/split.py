"""The one split of the project: stratified, seeded, and byte-identical files kept on one side."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import UsageError


def stratified_split(labels: np.ndarray, fraction: float, seed: int = 0,
                     groups: Sequence[object] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split indices so each class keeps about ``fraction`` of its images for validation.

    Every class with two or more images (groups) keeps at least one on each side. With ``groups``
    (e.g. content hashes), members of one group always land on the same side, so a duplicated
    image cannot be in both training and validation. The result depends only on the arguments.
    """
    if not 0.0 < fraction < 1.0:
        raise UsageError(f"val_split must be between 0 and 1 (exclusive); got {fraction}")
    labels = np.asarray(labels)
    if groups is None:
        groups = list(range(len(labels)))
    first: dict[object, int] = {}
    for i, g in enumerate(groups):
        first.setdefault(g, i)
    members_of: dict[object, list[int]] = {}
    for i, g in enumerate(groups):
        members_of.setdefault(g, []).append(i)
    rng = np.random.default_rng(seed)
    train: list[int] = []
    val: list[int] = []
    for label in np.unique(labels):
        heads = np.asarray([i for i in first.values() if labels[i] == label], dtype=np.int64)
        heads = heads[rng.permutation(len(heads))]
        n_val = round(len(heads) * fraction)
        n_val = min(max(n_val, 1), len(heads) - 1) if len(heads) >= 2 else 0
        for rank, head in enumerate(heads):
            (val if rank < n_val else train).extend(members_of[groups[head]])
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(val, dtype=np.int64))


def content_groups(paths: Sequence[Path]) -> list[str]:
    """One key per file, equal for byte-identical files (SHA-256 of the bytes; the path if unreadable).

    The split of :func:`load_images` keeps each group on one side, so a duplicated photo cannot be
    both trained on and scored.
    """
    keys = []
    for path in paths:
        try:
            with open(path, "rb") as handle:
                keys.append(hashlib.sha256(handle.read()).hexdigest())
        except OSError:
            keys.append(f"unreadable:{path}")
    return keys

