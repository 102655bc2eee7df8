"""Where cached rows live, as arrays, and this process's memory of it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Locations:
    """Where cached rows live, as arrays: view ``v`` of image ``i`` is row ``rows[v, i]`` of the shard
    ``shards[index[v, i]]``; ``index`` is -1 where that view is not cached.

    Shard ids are this process's numbering for one cache folder (``shards`` only grows); ``len()`` is
    the number of views.
    """

    shards: list[str]
    index: np.ndarray  # (n_views, n) int32
    rows: np.ndarray  # (n_views, n) int64

    @property
    def found(self) -> np.ndarray:
        """bool ``(n_views, n)``: which views are cached."""
        return self.index >= 0

    def __len__(self) -> int:
        return self.index.shape[0]

    def take(self, images: np.ndarray | Sequence[int]) -> Locations:
        """The same views of a subset of the images."""
        images = np.asarray(images, dtype=np.int64)
        return Locations(self.shards, self.index[:, images], self.rows[:, images])

    def pick(self, images: np.ndarray | Sequence[int], views: np.ndarray | Sequence[int]) -> Locations:
        """One view per image (``views[j]`` of ``images[j]``), as a single-view :class:`Locations`."""
        images = np.asarray(images, dtype=np.int64)
        views = np.asarray(views, dtype=np.int64)
        return Locations(self.shards, self.index[views, images][None], self.rows[views, images][None])

    def __getitem__(self, view: int) -> list[tuple[str, int] | None]:
        """``(shard, row)`` of every image's view ``view`` (``None`` where not cached); slow, for inspection."""
        return [(self.shards[s], int(r)) if s >= 0 else None for s, r in zip(self.index[view], self.rows[view])]


class LocationMemo:
    """Locations of images with every row of one tuple of model keys cached; arrays grow by doubling.

    A location never goes stale while its shard exists: rows are immutable and shard names are never
    reused. Whoever forgets a shard clears the memo.
    """

    def __init__(self, n_views: int) -> None:
        self.columns: dict[str, int] = {}
        self.index = np.empty((n_views, 64), dtype=np.int32)
        self.rows = np.empty((n_views, 64), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.columns)

    def recall(self, images: Sequence[str | None], index: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Fill the columns of ``index``/``rows`` of the images remembered here; bool ``(n,)``: which."""
        cols = np.fromiter((self.columns.get(k, -1) for k in images), np.int64, count=len(images))  # type: ignore[arg-type]
        hit = cols >= 0
        index[:, hit] = self.index[:, cols[hit]]
        rows[:, hit] = self.rows[:, cols[hit]]
        return hit

    def add(self, images: Sequence[str], index: np.ndarray, rows: np.ndarray) -> None:
        """Remember column ``j`` of ``index``/``rows`` for each ``images[j]`` not known yet (first one wins)."""
        fresh = []
        for j, image in enumerate(images):
            if image not in self.columns:
                self.columns[image] = len(self.columns)
                fresh.append(j)
        stop = len(self.columns)
        start = stop - len(fresh)
        if stop > self.index.shape[1]:  # amortised: many small calls do not copy everything each time
            self.index, self.rows = (_grow(a, max(stop, 2 * a.shape[1])) for a in (self.index, self.rows))
        self.index[:, start:stop] = index[:, fresh]
        self.rows[:, start:stop] = rows[:, fresh]


def _grow(array: np.ndarray, columns: int) -> np.ndarray:
    out = np.empty((array.shape[0], columns), dtype=array.dtype)
    out[:, :array.shape[1]] = array
    return out
