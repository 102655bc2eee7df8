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
import hashlib
import json
import os
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
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
        self._shards: dict[str, np.ndarray] = {}

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
        self._db.close()
        self._shards.clear()

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ image keys

    def image_keys(self, paths: Sequence[Path]) -> tuple[list[str | None], dict[int, str]]:
        """sha256 of each file's bytes, memoised on (path, size, mtime, ctime, inode).

        ctime cannot be set from user space, so a rewrite that keeps size and mtime (``cp -p``,
        ``rsync -a``) still changes the memo key and the file is hashed again.

        Returns:
            (keys, errors): ``keys[i]`` is ``None`` when file ``i`` could not be read, and then
            ``errors[i]`` says why (without the path).
        """
        keys: list[str | None] = []
        errors: dict[int, str] = {}
        resolved: list[str | None] = []
        for path in paths:
            try:
                resolved.append(str(Path(path).resolve()))
            except OSError:
                resolved.append(None)
        memo = {row[0]: row[1:] for row in self._select_in(
            "SELECT path, size, mtime_ns, ctime_ns, inode, sha256 FROM file_hashes WHERE path IN ({marks})",
            (), [r for r in resolved if r is not None])}
        fresh: list[tuple[str, int, int, int, int, str]] = []
        for i, (path, real) in enumerate(zip(paths, resolved)):
            try:
                if real is None:
                    raise OSError(f"cannot resolve '{path}'")
                st = os.stat(real)
                stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
                hit = memo.get(real)
                if hit and tuple(hit[:4]) == stamp:
                    keys.append(hit[4])
                    continue
                digest = hashlib.sha256(Path(real).read_bytes()).hexdigest()
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
        try:
            real = str(Path(path).resolve())
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

    def write(self, key: str, images: Sequence[str], rows: np.ndarray) -> None:
        """Store ``rows[i]`` as the feature of ``images[i]``: one new shard, then one index transaction."""
        if len(images) == 0:
            return
        if len(images) != len(rows):
            raise ValueError(f"{len(images)} image keys for {len(rows)} feature rows")
        shard = f"{key[:24]}/{uuid.uuid4().hex}.npy"
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
                           [(key, image, shard, r) for r, image in enumerate(images)])

    def forget_shard(self, shard: str) -> None:
        """Drop the index rows of a shard that is gone or unreadable, so its images are recomputed."""
        self._shards.pop(shard, None)
        with self._transaction() as db:
            db.execute("DELETE FROM features WHERE shard = ?", (shard,))

    def read(self, locations: Sequence[tuple[str, int]], dim: int) -> np.ndarray:
        """Gather rows from memory-mapped shards as a float32 array ``(len(locations), dim)``.

        Raises:
            MissingShardError: a shard is gone or unreadable; its rows are dropped from the index
                first, so looking the images up again finds them missing and they get recomputed.
        """
        out = np.empty((len(locations), dim), dtype=np.float32)
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for i, (shard, row) in enumerate(locations):
            by_shard.setdefault(shard, []).append((i, row))
        for shard, pairs in by_shard.items():
            array = self._shards.get(shard)
            if array is None:
                try:
                    array = np.load(self.root / "shards" / shard, mmap_mode="r")
                    if array.ndim != 2 or array.shape[1] != dim:
                        raise ValueError(f"shape {array.shape}")
                except (OSError, ValueError):
                    self.forget_shard(shard)
                    raise MissingShardError(shard) from None
                self._shards[shard] = array
            dest, rows = (np.fromiter(v, dtype=np.int64, count=len(pairs)) for v in zip(*pairs))
            if rows.max() >= len(array):
                self.forget_shard(shard)
                raise MissingShardError(shard)
            block = torch.from_numpy(np.array(array[_as_index(rows)], copy=True))  # runs of rows: one slice
            where = _as_index(dest)
            target = torch.from_numpy(out)
            if isinstance(where, slice):  # torch converts float16 -> float32 ~50x faster than numpy
                target[where].copy_(block)
            else:
                target[torch.from_numpy(where)] = block.float()
        return out

    def stats(self) -> dict[str, Any]:
        n_rows = self._db.execute("SELECT COUNT(*) FROM features").fetchone()[0]
        n_models = self._db.execute("SELECT COUNT(*) FROM models").fetchone()[0]
        size = sum(f.stat().st_size for f in (self.root / "shards").rglob("*.npy")) if (
            self.root / "shards").exists() else 0
        return {"root": str(self.root), "rows": n_rows, "models": n_models, "bytes": size}
