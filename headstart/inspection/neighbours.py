"""Near-duplicates and outliers from the cached features, by cosine similarity, block by block.

The rows are L2-normalised once; similarities are computed a block of rows against all rows at a time
(one float32 ``block x n`` matrix of at most ``BLOCK_BYTES``, never ``n x n``), so 100,000 images need
~256 MB for it. From each block come the pairs at or above the threshold and
each row's ``k`` nearest neighbours (the outlier score is the mean cosine distance to them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

BLOCK = 2048  # rows per block at most ...
BLOCK_BYTES = 256 << 20  # ... and fewer when n is large


def block_rows(n: int) -> int:
    """Rows per block for ``n`` images: a ``block x n`` float32 matrix within ``BLOCK_BYTES``."""
    return max(16, min(BLOCK, BLOCK_BYTES // (4 * max(n, 1))))


@dataclass(frozen=True)
class Neighbours:
    pairs: list[tuple[int, int, float]]  # (i, j, similarity), i < j, similarity >= threshold
    knn_distance: np.ndarray  # (n,) mean cosine distance to the k nearest other images


def normalise(x: np.ndarray) -> torch.Tensor:
    rows = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)


def neighbours(x: np.ndarray, threshold: float, k: int = 5, same: Sequence[object] | None = None) -> Neighbours:
    """Pairs of rows of ``x`` with cosine similarity >= ``threshold`` and each row's k-NN distance.

    Args:
        same: a key per row (e.g. content hash); rows with the same key are exact copies, already known,
            so they are neither reported as pairs nor counted as each other's neighbours.
    """
    unit = normalise(x)
    n = len(unit)
    copies = _copies(same)
    pairs: list[tuple[int, int, float]] = []
    knn = np.zeros(n, dtype=np.float64)
    k_eff = max(0, min(k, n - 1))
    step = block_rows(n)
    for start in range(0, n, step):
        stop = min(n, start + step)
        sims = unit[start:stop] @ unit.T  # (block, n)
        rows = torch.arange(stop - start)
        sims[rows, rows + start] = -2.0  # not its own neighbour
        for i in range(start, stop):
            if i in copies:
                sims[i - start, copies[i]] = -2.0
        pairs += _pairs(sims, start, threshold)
        if k_eff:
            top = sims.topk(k_eff, dim=1).values.clamp_min(-1.0)
            knn[start:stop] = (1.0 - top).mean(dim=1).double().numpy()
    return Neighbours(sorted(pairs, key=lambda p: -p[2]), knn)


def _copies(same: Sequence[object] | None) -> dict[int, list[int]]:
    """For each row that has exact copies (same key), the other rows with its key."""
    groups: dict[object, list[int]] = {}
    for i, key in enumerate(same or ()):
        groups.setdefault(key, []).append(i)
    return {i: [j for j in rows if j != i] for rows in groups.values() if len(rows) > 1 for i in rows}


def _pairs(sims: torch.Tensor, start: int, threshold: float) -> list[tuple[int, int, float]]:
    hit = (sims >= threshold).nonzero()
    out = []
    for r, j in hit.tolist():
        i = start + r
        if i < j:
            out.append((i, j, float(sims[r, j])))
    return out
