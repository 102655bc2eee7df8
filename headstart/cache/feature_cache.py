"""`FeatureCache`: the index, the shards and this process's memory of a cache folder, as one object."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs
import torch

from .index import Index
from .locations import LocationMemo, Locations
from .shards import MissingShardError, ShardStore, gather

CACHE_ENV = "HEADSTART_CACHE_DIR"
_MEMO_COLUMNS = 2_000_000  # images remembered by the in-process location memo before it starts over


def default_cache_dir() -> Path:
    """``$HEADSTART_CACHE_DIR`` if set, else the per-user cache folder (e.g. ``~/.cache/headstart``)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path(platformdirs.user_cache_dir("headstart"))


def model_key(description: dict[str, Any]) -> str:
    """sha256 of a JSON description of the model side of a feature (sorted keys)."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


class FolderMemo:
    """What this process remembers of one cache folder, shared by every :class:`FeatureCache` opened on it.

    * ``located``: (model keys) -> :class:`LocationMemo`, where the rows of images that have all of
      them cached live. It stays right when other processes write or lose shards: a location never
      goes stale while its shard exists, and forgetting a shard clears it.
    * ``maps``: open memory maps; ``shard_names`` / ``shard_ids``: this process's shard numbering.
    """

    def __init__(self) -> None:
        self.maps: dict[str, torch.Tensor] = {}
        self.shard_names: list[str] = []
        self.shard_ids: dict[str, int] = {}
        self.located: dict[tuple[str, ...], LocationMemo] = {}
        self.open_caches = 0  # FeatureCache objects open on this folder; the maps are let go at 0

    def shard_id(self, shard: str) -> int:
        sid = self.shard_ids.get(shard)
        if sid is None:
            sid = self.shard_ids[shard] = len(self.shard_names)
            self.shard_names.append(shard)
        return sid


_MEMOS: dict[str, FolderMemo] = {}  # this process's memory, by resolved cache folder


class FeatureCache:
    """Feature rows keyed by (model key, image content hash).

    Args:
        root: cache folder; created if missing. ``None`` uses :func:`default_cache_dir`.
        dtype: storage dtype of new shards (``float16`` halves disk and I/O; see the benchmark).
        memos: where this process remembers cache folders (locations, memory maps), by folder; default
            one registry for the process, so every cache on a folder shares it. ``{}`` starts cold, as
            a new process would.

    Attributes:
        index: the SQLite :class:`~headstart.cache.index.Index`.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, dtype: str = "float16", *,
                 memos: dict[str, FolderMemo] | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        self.index = Index(self.root / "index.sqlite")
        self._db = self.index.db
        self._memos = _MEMOS if memos is None else memos
        self._memo_key = str(self.root.resolve())
        self._memo = self._memos.setdefault(self._memo_key, FolderMemo())
        self._memo.open_caches += 1
        self._store = ShardStore(self.root / "shards", self._memo.maps)
        self._closed = False

    def close(self) -> None:
        """Close the index. The folder's location memo outlives this object (the next FeatureCache on the
        folder starts warm), but its memory maps, which hold file descriptors, go with the last one."""
        self.index.close()
        if self._closed:
            return
        self._closed = True
        self._memo.open_caches -= 1
        if self._memo.open_caches <= 0:
            self._memo.maps.clear()
            if not self.root.exists():  # a temporary cache that is gone: nothing of it is worth keeping
                self._memos.pop(self._memo_key, None)

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ memos

    def image_keys(self, paths: Sequence[str | os.PathLike[str]]) -> tuple[list[str | None], dict[int, str]]:
        """sha256 of each file's bytes, memoised on (path, size, mtime, ctime, inode).

        ctime cannot be set from user space, so a rewrite that keeps size and mtime (``cp -p``,
        ``rsync -a``) still changes the memo key and the file is hashed again. The memo is keyed by
        the absolute path as written (symbolic links are not resolved: ``stat`` follows them, and
        the inode in the stamp is the target's, so a re-pointed link is hashed again).

        Returns:
            (keys, errors): ``keys[i]`` is ``None`` when file ``i`` could not be read, and then
            ``errors[i]`` says why (without the path).
        """
        return self.index.image_keys(paths)

    def remember_hash(self, path: str | os.PathLike[str], digest: str) -> None:
        """Record that ``path`` (as it is now on disk) holds content ``digest``."""
        self.index.remember_hash(path, digest)

    def get_memo(self, key: str) -> dict[str, Any] | None:
        """A small JSON value remembered under ``key`` (e.g. a backbone's digest and data config)."""
        return self.index.get_memo(key)

    def put_memo(self, key: str, value: dict[str, Any]) -> None:
        self.index.put_memo(key, value)

    def failures(self, images: Sequence[str], decoder: str) -> dict[str, str]:
        """Images already known to be undecodable by this ``decoder`` (e.g. decode version + Pillow version)."""
        return self.index.failures(images, decoder)

    def record_failures(self, failures: dict[str, str], decoder: str) -> None:
        """Remember permanent decode failures (the bytes are not an image), so they are not retried."""
        self.index.record_failures(failures, decoder)

    # ------------------------------------------------------------------------------------ writing

    def register_models(self, models: Sequence[tuple[str, dict[str, Any], int]]) -> None:
        """Record (key, description, dim) of models not yet known, in one transaction (none if all known)."""
        self.index.register_models(models, self.dtype.name)

    def write(self, key: str | Sequence[str], images: Sequence[str], rows: np.ndarray) -> None:
        """Store ``rows[i]`` as the feature of ``images[i]``: one new shard, then one index transaction.

        Args:
            key: the model key of every row, or one per row (e.g. all views of a batch of images in
                one shard, image by image, so that reading them back is one slice).
        """
        if len(images) == 0:
            return
        if len(images) != len(rows):
            raise ValueError(f"{len(images)} image keys for {len(rows)} feature rows")
        keys = [key] * len(images) if isinstance(key, str) else list(key)
        if len(keys) != len(images):
            raise ValueError(f"{len(keys)} model keys for {len(images)} feature rows")
        shard = self._store.write(keys[0][:24], rows, self.dtype)  # durable before the index points at it
        self.index.add_shard(shard, keys, images)

    def _forget_shard(self, shard: str) -> None:
        """Drop the index rows of a shard that is gone or unreadable, so its images are recomputed."""
        self._memo.maps.pop(shard, None)
        self._memo.located.clear()
        self.index.drop_shard(shard)

    # ------------------------------------------------------------------------------------ locating

    def locate(self, keys: Sequence[str], images: Sequence[str | None]) -> Locations:
        """Where each image's row lives for each model key: a :class:`Locations` of shape ``(len(keys), n)``.

        ``None`` image keys are never found. Images whose rows were all found before in this process
        are answered from memory without a query; the others from the index. Nothing is read from
        the shards: see :meth:`locate_verified`.
        """
        n, n_views = len(images), len(keys)
        index = np.full((n_views, n), -1, dtype=np.int32)
        rows = np.zeros((n_views, n), dtype=np.int64)
        memo = self._memo.located.get(tuple(keys))
        hit = memo.recall(images, index, rows) if memo is not None else np.zeros(n, dtype=bool)
        todo = [i for i in np.flatnonzero(~hit).tolist() if images[i] is not None]
        if todo:
            self._look_up(keys, [images[i] for i in todo], todo, index, rows)
            self._remember(keys, images, [i for i in todo if (index[:, i] >= 0).all()], index, rows)
        return Locations(self._memo.shard_names, index, rows)

    def _look_up(self, keys: Sequence[str], images: Sequence[str], columns: Sequence[int],
                 index: np.ndarray, rows: np.ndarray) -> None:
        """Fill column ``columns[j]`` of ``index``/``rows`` with where ``images[j]`` is in the index."""
        for v, located in enumerate(self.index.lookup(keys, images)):
            for image, i in zip(images, columns):
                where = located.get(image)
                if where is not None:
                    index[v, i] = self._memo.shard_id(where[0])
                    rows[v, i] = where[1]

    def _remember(self, keys: Sequence[str], images: Sequence[str | None], complete: Sequence[int],
                  index: np.ndarray, rows: np.ndarray) -> None:
        """Add the images of columns ``complete`` (every view found) to the location memo."""
        if not complete:
            return
        located = self._memo.located
        if sum(len(m) for m in located.values()) + len(complete) > _MEMO_COLUMNS:
            located.clear()
        memo = located.get(tuple(keys))
        if memo is None:
            memo = located[tuple(keys)] = LocationMemo(len(keys))
        memo.add([images[i] for i in complete], index[:, complete], rows[:, complete])  # type: ignore[misc]

    def locate_verified(self, keys: Sequence[str], images: Sequence[str | None], dim: int) -> Locations:
        """:meth:`locate`, with every shard it points at checked: on disk, readable, ``dim`` wide and
        long enough. A shard that is not (deleted, damaged, replaced, even if this process still has it
        mapped) is forgotten, all at once, and the images located again, so its rows come back as not
        cached, for the caller to recompute, rather than failing a read later.

        The shards are left memory-mapped (up to the open-maps limit), so reading the answer soon after
        does not touch the files again.
        """
        located = self.locate(keys, images)
        while not self._verify(located, dim):  # each round forgets at least one shard
            located = self.locate(keys, images)
        return located

    def _verify(self, locations: Locations, dim: int) -> bool:
        """Check every shard ``locations`` points at and forget those that fail; False if any did."""
        mask = locations.index >= 0
        ids, rows = locations.index[mask], locations.rows[mask]
        if not len(ids):
            return True
        needed = np.zeros(int(ids.max()) + 1, dtype=np.int64)
        np.maximum.at(needed, ids, rows + 1)  # rows each shard must have
        intact = True
        for sid in np.unique(ids).tolist():
            shard = locations.shards[sid]
            if not self._store.holds(shard, dim, int(needed[sid])):
                self._forget_shard(shard)
                intact = False
        return intact

    # ------------------------------------------------------------------------------------ reading

    def iter_rows(self, locations: Locations, dim: int, max_rows: int = 4096,
                  ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """The cached rows of ``locations``, shard by shard: ``(positions, rows)`` pairs.

        ``positions`` are flat indices ``i * n_views + v`` into ``(n, n_views)``; ``rows`` is a tensor
        ``(len(positions), dim)`` in the storage dtype: a slice of the memory-mapped shard when the rows
        are consecutive (the usual case), else a gathered copy. At most ``max_rows`` rows at a time.
        Grouping is done with numpy: no Python work per row. The rows are read-only: a slice of a
        read-only memory map cannot be written (the process would crash); copy them to modify them.

        Raises:
            MissingShardError: a shard is gone or unreadable; its rows are dropped from the index
                first, so looking the images up again finds them missing and they get recomputed.
                Not expected for :meth:`locate_verified`'s answer while its shards stay mapped.
        """
        try:
            yield from self._store.iter_rows(locations, dim, max_rows)
        except MissingShardError as exc:
            self._forget_shard(exc.shard)
            raise

    def read_locations(self, locations: Locations, dim: int) -> np.ndarray:
        """Gather the rows of ``locations`` as float32 ``(n, n_views, dim)``; zeros where not cached.

        Torch copies (and converts float16 -> float32, ~50x faster than numpy) shard by shard, a
        strided slice when the rows are one view of a run of images.

        Raises:
            MissingShardError: as :meth:`iter_rows`.
        """
        n_views, n = locations.index.shape
        return gather(self.iter_rows(locations, dim, max_rows=max(1, n * n_views)), n, n_views, dim)

    def stats(self) -> dict[str, Any]:
        """Rows, models and shard bytes in the cache."""
        n_rows, n_models = self.index.counts()
        shards = self.root / "shards"
        size = sum(f.stat().st_size for f in shards.rglob("*.npy")) if shards.exists() else 0
        return {"root": str(self.root), "rows": n_rows, "models": n_models, "bytes": size}
