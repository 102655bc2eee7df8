"""The cache's SQLite index: where each feature row lives, plus the small memos kept beside it.

Tables: ``features`` (model key, image hash) -> (shard, row); ``models`` (what each model key
means); ``file_hashes`` (the file-hash memo); ``decode_failures`` (per decoder); ``memo`` (small JSON
values). WAL mode, ``synchronous=FULL`` and explicit transactions: the index never outruns the shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

SCHEMA = """
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
_HASH_ROW = "INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?, ?, ?)"


def _memo_path(path: str | os.PathLike[str], cwd: str) -> str:
    """The file-hash memo's key: the absolute path, not normalised (``a/link/../b`` is not ``a/b``)."""
    path = os.fspath(path)
    return path if os.path.isabs(path) else os.path.join(cwd, path)


def _db_text(path: str) -> str:
    """``path`` as text SQLite can store: itself, or for a name that is not valid UTF-8 (bytes the OS gave,
    decoded with surrogate escapes) ``bytes:`` and the hex of its bytes; no absolute path starts so."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return "bytes:" + os.fsencode(path).hex()


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def _file_sha256(path: str) -> str:
    with open(path, "rb") as handle:
        if hasattr(hashlib, "file_digest"):
            return hashlib.file_digest(handle, "sha256").hexdigest()
        return hashlib.sha256(handle.read()).hexdigest()


def _read_error(exc: OSError) -> str:
    """Why a file could not be hashed, without its path."""
    return "file not found" if isinstance(exc, FileNotFoundError) else f"cannot read file ({exc.strerror or exc})"


class Index:
    """One connection to ``index.sqlite`` in a cache folder (created with its tables if missing)."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, timeout=60, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # the index is small; never let it outrun the shards
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write: every statement inside commits together or not at all."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _select_in(self, sql: str, fixed: tuple[Any, ...], values: Sequence[str]) -> Iterator[tuple[Any, ...]]:
        unique = list(dict.fromkeys(values))
        for start in range(0, len(unique), _CHUNK):
            chunk = unique[start:start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            yield from self.db.execute(sql.format(marks=marks), (*fixed, *chunk))

    # ------------------------------------------------------------------------------------ file hashes

    def image_keys(self, paths: Sequence[str | os.PathLike[str]]) -> tuple[list[str | None], dict[int, str]]:
        """sha256 of each file's bytes, memoised on (absolute path, size, mtime, ctime, inode);
        see :meth:`~headstart.cache.FeatureCache.image_keys`."""
        keys: list[str | None] = []
        errors: dict[int, str] = {}
        cwd = os.getcwd()
        absolute = [_memo_path(path, cwd) for path in paths]
        memo = {row[0]: row[1:] for row in self._select_in(
            "SELECT path, size, mtime_ns, ctime_ns, inode, sha256 FROM file_hashes WHERE path IN ({marks})",
            (), [_db_text(real) for real in absolute])}
        fresh: list[tuple[str, int, int, int, int, str]] = []
        for i, real in enumerate(absolute):
            try:
                stamp = _stamp(os.stat(real))
                hit = memo.get(_db_text(real))
                if hit and tuple(hit[:4]) == stamp:
                    keys.append(hit[4])
                    continue
                digest = _file_sha256(real)
            except OSError as exc:
                keys.append(None)
                errors[i] = _read_error(exc)
                continue
            keys.append(digest)
            fresh.append((_db_text(real), *stamp, digest))
        if fresh:
            with self._transaction() as db:
                db.executemany(_HASH_ROW, fresh)
        return keys, errors

    def remember_hash(self, path: str | os.PathLike[str], digest: str) -> None:
        """Record that ``path`` (as it is now on disk) holds content ``digest``."""
        real = _memo_path(path, os.getcwd())
        try:
            st = os.stat(real)
        except OSError:
            return
        with self._transaction() as db:
            db.execute(_HASH_ROW, (_db_text(real), *_stamp(st), digest))

    # ------------------------------------------------------------------------------------ JSON memo

    def get_memo(self, key: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT value FROM memo WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put_memo(self, key: str, value: dict[str, Any]) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO memo VALUES (?, ?)", (key, json.dumps(value, sort_keys=True)))

    # ------------------------------------------------------------------------------------ decode failures

    def failures(self, images: Sequence[str], decoder: str) -> dict[str, str]:
        """Images already known to be undecodable by ``decoder``, with the reason."""
        return {img: reason for img, reason in self._select_in(
            "SELECT image, reason FROM decode_failures WHERE decoder = ? AND image IN ({marks})", (decoder,), images)}

    def record_failures(self, failures: dict[str, str], decoder: str) -> None:
        if failures:
            with self._transaction() as db:
                db.executemany("INSERT OR REPLACE INTO decode_failures VALUES (?, ?, ?)",
                               [(img, decoder, reason) for img, reason in failures.items()])

    # ------------------------------------------------------------------------------------ models and rows

    def register_models(self, models: Sequence[tuple[str, dict[str, Any], int]], dtype: str) -> None:
        """Record (key, description, dim) of models not yet known, in one transaction (none if all known)."""
        known = {k for (k,) in self._select_in("SELECT model_key FROM models WHERE model_key IN ({marks})", (),
                                               [m[0] for m in models])}
        new = [(k, json.dumps(d, sort_keys=True), dim, dtype) for k, d, dim in models if k not in known]
        if new:
            with self._transaction() as db:
                db.executemany("INSERT OR IGNORE INTO models VALUES (?, ?, ?, ?)", new)

    def lookup(self, keys: Sequence[str], images: Sequence[str]) -> list[dict[str, tuple[str, int]]]:
        """For each model key, ``{image: (shard, row)}`` of the cached ``images``, in one pass over the index."""
        found: dict[str, dict[str, tuple[str, int]]] = {k: {} for k in keys}
        unique_keys = list(dict.fromkeys(keys))
        key_marks = ",".join("?" * len(unique_keys))  # the primary key (model_key, image) serves both lists
        rows = self._select_in("SELECT model_key, image, shard, row FROM features "
                               f"WHERE model_key IN ({key_marks}) AND image IN ({{marks}})", tuple(unique_keys),
                               images)
        for key, image, shard, row in rows:
            found[key][image] = (shard, row)
        return [found[k] for k in keys]

    def add_shard(self, shard: str, keys: Sequence[str], images: Sequence[str]) -> None:
        """Point ``(keys[r], images[r])`` at row ``r`` of ``shard`` (which must already be durable)."""
        with self._transaction() as db:
            db.executemany("INSERT OR REPLACE INTO features VALUES (?, ?, ?, ?)",
                           [(k, image, shard, r) for r, (k, image) in enumerate(zip(keys, images))])

    def drop_shard(self, shard: str) -> None:
        """Forget every row of ``shard``."""
        with self._transaction() as db:
            db.execute("DELETE FROM features WHERE shard = ?", (shard,))

    def counts(self) -> tuple[int, int]:
        """(feature rows, models) in the index."""
        n_rows = self.db.execute("SELECT COUNT(*) FROM features").fetchone()[0]
        n_models = self.db.execute("SELECT COUNT(*) FROM models").fetchone()[0]
        return n_rows, n_models
