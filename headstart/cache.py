"""The on-disk feature cache: content-addressed, atomic, resumable.

Layout under the cache root::

    index.sqlite                   # WAL-mode SQLite: which (model key, image hash) lives where
    shards/<model key>/<id>.npy    # feature rows, float16 by default, memory-mapped on read

A *model key* is a sha256 over everything that changes the numbers except the image: backbone
name, weights digest, cut point, preprocessing signature, storage dtype. An *image key* is the
sha256 of the file's bytes, so renamed or moved files still hit. Shards are written to a
temporary name and renamed before the index points at them, so a reader never sees a half-written
shard and an interrupted extraction loses at most the rows not yet flushed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import os
import sqlite3
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs
import torch

CACHE_ENV = "HEADSTART_CACHE_DIR"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS file_hashes (
    path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, inode INTEGER, sha256 TEXT);
CREATE TABLE IF NOT EXISTS models (model_key TEXT PRIMARY KEY, description TEXT, dim INTEGER, dtype TEXT);
CREATE TABLE IF NOT EXISTS features (
    model_key TEXT, image TEXT, shard TEXT, row INTEGER, PRIMARY KEY (model_key, image));
CREATE INDEX IF NOT EXISTS features_by_shard ON features (shard);
CREATE TABLE IF NOT EXISTS decode_failures (image TEXT, decoder TEXT, reason TEXT, PRIMARY KEY (image, decoder));
CREATE TABLE IF NOT EXISTS memo (key TEXT PRIMARY KEY, value TEXT);
"""
_CHUNK = 400  # SQLite host parameters per query (plus the model keys)
_MEMO_COLUMNS = 2_000_000  # images remembered by the in-process location memo before it starts over


class MissingShardError(OSError):
    """The index points at a shard file that is gone or unreadable (its rows were dropped)."""

    def __init__(self, shard: str) -> None:
        super().__init__(f"feature shard '{shard}' is missing or unreadable")
        self.shard = shard


def _as_index(index: np.ndarray) -> slice | np.ndarray:
    """A slice when ``index`` is a run of consecutive integers (the usual case), else the array."""
    if len(index) and index[-1] - index[0] == len(index) - 1 and (np.diff(index) == 1).all():
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


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


def _memo_path(path: str | os.PathLike[str], cwd: str) -> str:
    """The file-hash memo's key: the absolute path, not normalised (``a/link/../b`` is not ``a/b``)."""
    path = os.fspath(path)
    return path if os.path.isabs(path) else os.path.join(cwd, path)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/filesystem allows fsync on a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def default_cache_dir() -> Path:
    """``$HEADSTART_CACHE_DIR`` if set, else the per-user cache folder (e.g. ``~/.cache/headstart``)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path(platformdirs.user_cache_dir("headstart"))


def model_key(description: dict[str, Any]) -> str:
    """sha256 of a JSON description of the model side of a feature (sorted keys)."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


class _FolderMemo:
    """What this process remembers of one cache folder, shared by every :class:`FeatureCache` opened on it.

    * ``located``: (model keys) -> :class:`_Located`, where the rows of images that have all of
      them cached live. A location never goes stale while its shard exists (rows are immutable, shard names are
      never reused), and :meth:`FeatureCache.verify` notices a vanished shard and clears this memo, so
      it stays right when other processes write or lose shards.
    * ``shards``: open memory maps; ``shard_names`` / ``shard_ids``: this process's shard numbering.
    """

    def __init__(self) -> None:
        self.shards: dict[str, torch.Tensor] = {}  # read-only memory maps (torch never writes to them)
        self.shard_names: list[str] = []
        self.shard_ids: dict[str, int] = {}
        self.located: dict[tuple[str, ...], _Located] = {}
        self.open_caches = 0  # FeatureCache objects open on this folder; the maps are let go at 0


class _Located:
    """Locations of images with every row of one tuple of model keys cached; arrays grow by doubling."""

    def __init__(self, n_views: int) -> None:
        self.columns: dict[str, int] = {}
        self.index = np.empty((n_views, 64), dtype=np.int32)
        self.rows = np.empty((n_views, 64), dtype=np.int64)

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


_MEMOS: dict[str, _FolderMemo] = {}


def _open_maps_limit() -> int:
    """Memory maps kept open per folder: each holds a file descriptor, so a quarter of the process's limit."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # no ``resource`` module (Windows)
        return 128
    return 4096 if soft == resource.RLIM_INFINITY else max(16, min(4096, soft // 4))


_OPEN_MAPS = _open_maps_limit()


class FeatureCache:
    """Feature rows keyed by (model key, image content hash).

    Args:
        root: cache folder; created if missing. ``None`` uses :func:`default_cache_dir`.
        dtype: storage dtype of new shards (``float16`` halves disk and I/O; see the benchmark).
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, dtype: str = "float16") -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        self._db = sqlite3.connect(self.root / "index.sqlite", timeout=60, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # the index is small; never let it outrun the shards
        self._db.executescript(_SCHEMA)
        self._memo_key = str(self.root.resolve())
        memo = _MEMOS.get(self._memo_key)
        if memo is None:
            memo = _MEMOS[self._memo_key] = _FolderMemo()
        memo.open_caches += 1
        self._memo = memo
        self._closed = False
        self._shards, self._shard_names, self._shard_ids, self._located = (
            memo.shards, memo.shard_names, memo.shard_ids, memo.located)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write: every statement inside commits together or not at all."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _select_in(self, sql: str, fixed: tuple[Any, ...], values: Sequence[str]) -> Iterator[tuple[Any, ...]]:
        unique = list(dict.fromkeys(values))
        for start in range(0, len(unique), _CHUNK):
            chunk = unique[start:start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            yield from self._db.execute(sql.format(marks=marks), (*fixed, *chunk))

    def close(self) -> None:
        """Close the index. The folder's location memo outlives this object (the next FeatureCache on the
        folder starts warm), but its memory maps, which hold file descriptors, go with the last one."""
        self._db.close()
        if self._closed:
            return
        self._closed = True
        self._memo.open_caches -= 1
        if self._memo.open_caches <= 0:
            self._shards.clear()
            if not self.root.exists():  # a temporary cache that is gone: nothing of it is worth keeping
                _MEMOS.pop(self._memo_key, None)

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ image keys

    def image_keys(self, paths: Sequence[Path]) -> tuple[list[str | None], dict[int, str]]:
        """sha256 of each file's bytes, memoised on (path, size, mtime, ctime, inode).

        ctime cannot be set from user space, so a rewrite that keeps size and mtime (``cp -p``,
        ``rsync -a``) still changes the memo key and the file is hashed again. The memo is keyed by
        the absolute path as written (symbolic links are not resolved: ``stat`` follows them, and
        the inode in the stamp is the target's, so a re-pointed link is hashed again).

        Returns:
            (keys, errors): ``keys[i]`` is ``None`` when file ``i`` could not be read, and then
            ``errors[i]`` says why (without the path).
        """
        keys: list[str | None] = []
        errors: dict[int, str] = {}
        cwd = os.getcwd()
        absolute = [_memo_path(path, cwd) for path in paths]
        memo = {row[0]: row[1:] for row in self._select_in(
            "SELECT path, size, mtime_ns, ctime_ns, inode, sha256 FROM file_hashes WHERE path IN ({marks})",
            (), absolute)}
        fresh: list[tuple[str, int, int, int, int, str]] = []
        for i, real in enumerate(absolute):
            try:
                st = os.stat(real)
                stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
                hit = memo.get(real)
                if hit and tuple(hit[:4]) == stamp:
                    keys.append(hit[4])
                    continue
                with open(real, "rb") as handle:
                    digest = hashlib.file_digest(handle, "sha256").hexdigest() if hasattr(
                        hashlib, "file_digest") else hashlib.sha256(handle.read()).hexdigest()
            except OSError as exc:
                keys.append(None)
                errors[i] = "file not found" if isinstance(exc, FileNotFoundError) else \
                    f"cannot read file ({exc.strerror or exc})"
                continue
            keys.append(digest)
            fresh.append((real, *stamp, digest))
        if fresh:
            with self._transaction() as db:
                db.executemany("INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?, ?, ?)", fresh)
        return keys, errors

    def remember_hash(self, path: Path, digest: str) -> None:
        """Record that ``path`` (as it is now on disk) holds content ``digest``."""
        real = _memo_path(path, os.getcwd())
        try:
            st = os.stat(real)
        except OSError:
            return
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?, ?, ?)",
                       (real, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, digest))

    # ------------------------------------------------------------------------------------ memo

    def get_memo(self, key: str) -> dict[str, Any] | None:
        """A small JSON value remembered under ``key`` (e.g. a backbone's digest and data config)."""
        row = self._db.execute("SELECT value FROM memo WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put_memo(self, key: str, value: dict[str, Any]) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO memo VALUES (?, ?)", (key, json.dumps(value, sort_keys=True)))

    # ------------------------------------------------------------------------------------ features

    def register_models(self, models: Sequence[tuple[str, dict[str, Any], int]]) -> None:
        """Record (key, description, dim) of models not yet known, in one transaction (none if all known)."""
        known = {k for (k,) in self._select_in("SELECT model_key FROM models WHERE model_key IN ({marks})", (),
                                               [m[0] for m in models])}
        new = [(k, json.dumps(d, sort_keys=True), dim, self.dtype.name) for k, d, dim in models if k not in known]
        if new:
            with self._transaction() as db:
                db.executemany("INSERT OR IGNORE INTO models VALUES (?, ?, ?, ?)", new)

    def register_model(self, key: str, description: dict[str, Any], dim: int) -> None:
        self.register_models([(key, description, dim)])

    def lookup(self, key: str, images: Sequence[str]) -> dict[str, tuple[str, int]]:
        """Map each cached image key to its (shard, row) for ``key``."""
        return self.lookup_many([key], images)[0]

    def lookup_many(self, keys: Sequence[str], images: Sequence[str]) -> list[dict[str, tuple[str, int]]]:
        """:meth:`lookup` for several model keys in one pass over the index."""
        found: dict[str, dict[str, tuple[str, int]]] = {k: {} for k in keys}
        unique_keys = list(dict.fromkeys(keys))
        key_marks = ",".join("?" * len(unique_keys))  # the primary key (model_key, image) serves both lists
        rows = self._select_in("SELECT model_key, image, shard, row FROM features "
                               f"WHERE model_key IN ({key_marks}) AND image IN ({{marks}})", tuple(unique_keys),
                               images)
        for key, image, shard, row in rows:
            found[key][image] = (shard, row)
        return [found[k] for k in keys]

    def failures(self, images: Sequence[str], decoder: str) -> dict[str, str]:
        """Images already known to be undecodable by this ``decoder`` (e.g. decode version + Pillow version)."""
        return {img: reason for img, reason in self._select_in(
            "SELECT image, reason FROM decode_failures WHERE decoder = ? AND image IN ({marks})", (decoder,), images)}

    def record_failures(self, failures: dict[str, str], decoder: str) -> None:
        """Remember permanent decode failures (the bytes are not an image), so they are not retried."""
        if failures:
            with self._transaction() as db:
                db.executemany("INSERT OR REPLACE INTO decode_failures VALUES (?, ?, ?)",
                               [(img, decoder, reason) for img, reason in failures.items()])

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
        shard = f"{keys[0][:24]}/{uuid.uuid4().hex}.npy"
        path = self.root / "shards" / shard
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "wb") as handle:
                np.save(handle, np.ascontiguousarray(rows, dtype=self.dtype))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        _fsync_dir(path.parent)  # the rename is durable before the index points at it
        with self._transaction() as db:
            db.executemany("INSERT OR REPLACE INTO features VALUES (?, ?, ?, ?)",
                           [(k, image, shard, r) for r, (k, image) in enumerate(zip(keys, images))])

    def forget_shard(self, shard: str) -> None:
        """Drop the index rows of a shard that is gone or unreadable, so its images are recomputed."""
        self._shards.pop(shard, None)
        self._located.clear()
        with self._transaction() as db:
            db.execute("DELETE FROM features WHERE shard = ?", (shard,))

    def _shard_id(self, shard: str) -> int:
        sid = self._shard_ids.get(shard)
        if sid is None:
            sid = self._shard_ids[shard] = len(self._shard_names)
            self._shard_names.append(shard)
        return sid

    def locate(self, keys: Sequence[str], images: Sequence[str | None]) -> Locations:
        """Where each image's row lives for each model key: a :class:`Locations` of shape ``(len(keys), n)``.

        ``None`` image keys are never found. Images whose rows were all found before in this process
        are answered from memory without a query; the others from the index.
        """
        n, n_views = len(images), len(keys)
        index = np.full((n_views, n), -1, dtype=np.int32)
        rows = np.zeros((n_views, n), dtype=np.int64)
        memo_key = tuple(keys)
        memo = self._located.get(memo_key)
        hit = np.zeros(n, dtype=bool)
        if memo is not None:
            cols = np.fromiter((memo.columns.get(k, -1) for k in images), np.int64, count=n)  # type: ignore[arg-type]
            hit = cols >= 0
            index[:, hit] = memo.index[:, cols[hit]]
            rows[:, hit] = memo.rows[:, cols[hit]]
        todo = [i for i in np.flatnonzero(~hit).tolist() if images[i] is not None]
        if not todo:
            return Locations(self._shard_names, index, rows)
        found = self.lookup_many(keys, [images[i] for i in todo])
        for v, located in enumerate(found):
            for i in todo:
                where = located.get(images[i])  # type: ignore[arg-type]
                if where is not None:
                    index[v, i] = self._shard_id(where[0])
                    rows[v, i] = where[1]
        complete = [i for i in todo if (index[:, i] >= 0).all()]
        if complete:
            if sum(len(m.columns) for m in self._located.values()) + len(complete) > _MEMO_COLUMNS:
                self._located.clear()
                memo = None
            if memo is None:
                memo = self._located[memo_key] = _Located(n_views)
            memo.add([images[i] for i in complete], index[:, complete], rows[:, complete])  # type: ignore[misc]
        return Locations(self._shard_names, index, rows)

    def _load_shard(self, shard: str) -> np.ndarray:
        """Memory-map a shard. Running out of file descriptors or memory is not the shard's fault: the
        maps are let go and it is tried once more, and if that fails too the error is raised as it is
        (only a shard that is really missing or damaged gets forgotten)."""
        try:
            return np.load(self.root / "shards" / shard, mmap_mode="r")
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                raise
            self._shards.clear()
        try:
            return np.load(self.root / "shards" / shard, mmap_mode="r")
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                raise RuntimeError(f"cannot open feature shard '{shard}': {exc.strerror}; raise the limit of "
                                   "open files (ulimit -n) or free memory") from exc
            raise

    def _shard_array(self, shard: str, dim: int) -> torch.Tensor:
        """The shard memory-mapped read-only, as a tensor ``(rows, dim)`` in the storage dtype."""
        tensor = self._shards.get(shard)
        if tensor is None:
            try:
                array = self._load_shard(shard)
                if array.ndim != 2 or array.shape[1] != dim:
                    raise ValueError(f"shape {array.shape}")
            except (OSError, ValueError):
                self.forget_shard(shard)
                raise MissingShardError(shard) from None
            with warnings.catch_warnings():  # torch warns that the array is read-only; we only ever read it
                warnings.simplefilter("ignore", UserWarning)
                tensor = torch.from_numpy(array)
            if len(self._shards) >= _OPEN_MAPS:
                self._shards.clear()
            self._shards[shard] = tensor
        return tensor

    def verify(self, locations: Locations, dim: int) -> bool:
        """Check that every shard ``locations`` points at is on disk and readable; forget all that are not.

        Returns:
            False if any shard was forgotten: locate the images again, and their rows are missing.
        """
        intact = True
        for sid in np.unique(locations.index[locations.index >= 0]).tolist():
            shard = locations.shards[sid]
            if shard in self._shards and not (self.root / "shards" / shard).exists():
                self._shards.pop(shard)  # deleted, though still readable through our map: forget it anyway
            try:
                self._shard_array(shard, dim)
            except MissingShardError:
                intact = False
        return intact

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
        """
        flat_index = locations.index.T.reshape(-1)
        present = np.flatnonzero(flat_index >= 0)
        if not len(present):
            return
        present = present[np.argsort(flat_index[present], kind="stable")]  # by shard, image order within
        ids = flat_index[present]
        starts = np.concatenate([[0], np.flatnonzero(np.diff(ids)) + 1, [len(ids)]])
        flat_rows = locations.rows.T.reshape(-1)
        for begin, end in itertools.pairwise(starts.tolist()):
            shard = locations.shards[int(ids[begin])]
            source = self._shard_array(shard, dim)
            for start in range(begin, end, max_rows):
                positions = present[start:min(end, start + max_rows)]
                src = flat_rows[positions]
                if src.max() >= len(source):
                    self.forget_shard(shard)
                    raise MissingShardError(shard)
                where = _as_index(src)
                yield positions, (source[where] if isinstance(where, slice) else
                                  source.index_select(0, torch.from_numpy(src)))

    def read_locations(self, locations: Locations, dim: int) -> np.ndarray:
        """Gather the rows of ``locations`` as float32 ``(n, n_views, dim)``; zeros where not cached.

        Torch copies (and converts float16 -> float32, ~50x faster than numpy) shard by shard, a
        strided slice when the rows are one view of a run of images.

        Raises:
            MissingShardError: as :meth:`iter_rows`.
        """
        n_views, n = locations.index.shape
        out = np.zeros((n, n_views, dim), dtype=np.float32)
        target = torch.from_numpy(out.reshape(n * n_views, dim))
        for dest, block in self.iter_rows(locations, dim, max_rows=max(1, n * n_views)):
            step = int(dest[1] - dest[0]) if len(dest) > 1 else 1
            if step > 0 and dest[-1] - dest[0] == step * (len(dest) - 1) and (np.diff(dest) == step).all():
                target[int(dest[0]):int(dest[-1]) + 1:step].copy_(block)
            else:
                target.index_copy_(0, torch.from_numpy(dest), block.float())
        return out

    def read(self, locations: Sequence[tuple[str, int]], dim: int) -> np.ndarray:
        """Gather rows given as ``(shard, row)`` pairs as a float32 array ``(len(locations), dim)``.

        Raises:
            MissingShardError: as :meth:`read_locations`.
        """
        index = np.fromiter((self._shard_id(shard) for shard, _ in locations), np.int32, count=len(locations))
        rows = np.fromiter((row for _, row in locations), np.int64, count=len(locations))
        return self.read_locations(Locations(self._shard_names, index[None], rows[None]), dim)[:, 0]

    def stats(self) -> dict[str, Any]:
        n_rows = self._db.execute("SELECT COUNT(*) FROM features").fetchone()[0]
        n_models = self._db.execute("SELECT COUNT(*) FROM models").fetchone()[0]
        size = sum(f.stat().st_size for f in (self.root / "shards").rglob("*.npy")) if (
            self.root / "shards").exists() else 0
        return {"root": str(self.root), "rows": n_rows, "models": n_models, "bytes": size}
