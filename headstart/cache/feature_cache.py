"""`FeatureCache`: the index, the shards and this process's memory of a cache folder, as one object."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs
import torch

from .index import Index
from .integrity import CacheWarning, sidecar_path
from .locations import LocationMemo, Locations
from .overlay import LayeredIndex, writable
from .recovery import INDEX, open_index
from .shards import MissingShardError, ShardStore, gather

CACHE_ENV = "HEADSTART_CACHE_DIR"
_MEMO_COLUMNS = 2_000_000  # images remembered by the in-process location memo before it starts over


def default_cache_dir() -> Path:
    """``$HEADSTART_CACHE_DIR`` if set, else the per-user cache folder (e.g. ``~/.cache/headstart``)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path(platformdirs.user_cache_dir("headstart"))


def _make_folder(root: Path) -> None:
    """Create the cache folder; one that cannot be made is an error naming it and the fix."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from ..errors import UsageError

        raise UsageError(f"cannot create the cache folder {root} ({exc.strerror or exc}); pass --cache-dir "
                         f"(or set ${CACHE_ENV}) to a folder you can write to") from None


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
        self.verified: dict[str, tuple[int, int, int]] = {}  # shards whose checksum held, by file stamp
        self.index_checked = False  # the index passed SQLite's check (or was rebuilt) in this process

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

    A folder this process may not write to is read as it is, with one warning; rows it lacks are kept
    in a temporary overlay for as long as the cache is open (:mod:`.overlay`). An unreadable index is
    moved aside and rebuilt from the shards (:mod:`.recovery`); a damaged shard is dropped, with one
    warning naming it, and its rows are recomputed.

    Attributes:
        index: the SQLite :class:`~headstart.cache.index.Index` (a :class:`~.overlay.LayeredIndex` when
            the folder is read-only).
        read_only: whether the folder is read-only for this process.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, dtype: str = "float16", *,
                 memos: dict[str, FolderMemo] | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        _make_folder(self.root)
        self.dtype = np.dtype(dtype)
        self._memos = _MEMOS if memos is None else memos
        self._memo_key = str(self.root.resolve())
        self._memo = self._memos.setdefault(self._memo_key, FolderMemo())
        self._store = ShardStore(self.root / "shards", self._memo.maps, self._memo.verified)
        self._overlay: Path | None = None
        self.read_only = not writable(self.root)
        if self.read_only:
            self.index: Index | LayeredIndex
            self.index, self._overlay = self._open_overlay()
            self._write_store = ShardStore(self._overlay / "shards", self._memo.maps, self._memo.verified,
                                           names_from=self._overlay / "shards")
        else:
            self.index = open_index(self.root, check=not self._memo.index_checked)
            self._memo.index_checked = True
            self._write_store = self._store
        self._db = self.index.db if isinstance(self.index, Index) else None
        self._memo.open_caches += 1
        self._closed = False

    def _open_overlay(self) -> tuple[LayeredIndex, Path]:
        warnings.warn(f"cache folder {self.root} is read-only: its features are used as they are, and the rows "
                      "it lacks are computed into a temporary folder and not kept (make it writable or use "
                      "--cache-dir to keep them)", CacheWarning, stacklevel=3)
        overlay = Path(tempfile.mkdtemp(prefix="headstart-overlay-"))
        base = Index(self.root / INDEX, read_only=True) if (self.root / INDEX).exists() else None
        return LayeredIndex(base, Index(overlay / INDEX)), overlay

    def close(self) -> None:
        """Close the index. The folder's location memo outlives this object (the next FeatureCache on the
        folder starts warm), but its memory maps, which hold file descriptors, go with the last one."""
        self.index.close()
        if self._closed:
            return
        self._closed = True
        if self._overlay is not None:
            self._memo.maps.clear()
            self._memo.located.clear()  # locations in the overlay die with it
            shutil.rmtree(self._overlay, ignore_errors=True)
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

    def write(self, key: str | Sequence[str], images: Sequence[str], rows: np.ndarray,
              release: str | None = None) -> None:
        """Store ``rows[i]`` as the feature of ``images[i]``: one new shard and its sidecar, then one index
        transaction. Rows the index already holds (another process was first) keep their old location;
        a shard none of whose rows were needed is deleted.

        Args:
            key: the model key of every row, or one per row (e.g. all views of a batch of images in
                one shard, image by image, so that reading them back is one slice).
            release: drop this owner's claims on ``images`` in the same transaction (see :meth:`claim`).
        """
        if len(images) == 0:
            return
        if len(images) != len(rows):
            raise ValueError(f"{len(images)} image keys for {len(rows)} feature rows")
        keys = [key] * len(images) if isinstance(key, str) else list(key)
        if len(keys) != len(images):
            raise ValueError(f"{len(keys)} model keys for {len(images)} feature rows")
        models = self.index.descriptions(list(dict.fromkeys(keys)))
        shard = self._write_store.write(keys[0][:24], rows, self.dtype, keys, images, models)  # durable first
        if self.index.add_shard(shard, keys, images, release) == 0:  # another process stored them all first
            self._remove_files(shard)

    # ------------------------------------------------------------------------------------ sharing the work

    def claim(self, job: str, images: Sequence[str], owner: str, ttl: float) -> list[str]:
        """Claim the computing of ``images`` for ``job`` (e.g. a tuple of model keys) as ``owner``: the
        images no other owner claimed in the last ``ttl`` seconds. Processes extracting the same images
        into one folder so compute each about once; a claim dies with its owner after ``ttl``."""
        return self.index.claim(job, images, owner, ttl)

    def heartbeat(self, owner: str) -> None:
        """Refresh ``owner``'s claims (it is still working on them)."""
        self.index.heartbeat(owner)

    def release(self, owner: str, images: Sequence[str] | None = None) -> None:
        """Drop ``owner``'s claims on ``images`` (default: all its claims)."""
        self.index.release(owner, images)

    def _remove_files(self, shard: str) -> None:
        self._memo.verified.pop(shard, None)
        path = self._store.path(shard)
        for file in (path, sidecar_path(path)):
            with contextlib.suppress(OSError):
                file.unlink()

    def shard_path(self, shard: str) -> Path:
        """The file of a shard named in the index."""
        return self._store.path(shard)

    def drop_shard(self, shard: str) -> None:
        """Forget a shard's rows (so its images are recomputed) and delete what is left of its files (unless
        the folder is read-only)."""
        self._memo.maps.pop(shard, None)
        self._memo.located.clear()
        self.index.drop_shard(shard)
        if not self.read_only:
            self._remove_files(shard)

    def _forget_shard(self, shard: str, reason: str = "it is missing or unreadable") -> None:
        """:meth:`drop_shard` for a shard found gone, unreadable or damaged, with one warning naming it."""
        self.drop_shard(shard)
        warnings.warn(f"feature shard {self._store.path(shard)} cannot be used: {reason}; its rows are dropped "
                      "and will be computed again", CacheWarning, stacklevel=4)

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
            fault = self._store.fault(shard, dim, int(needed[sid]))
            if fault is not None:
                self._forget_shard(shard, fault)
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
            self._forget_shard(exc.shard, exc.reason)
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
