"""The cache's SQLite index: where each feature row lives, plus the small memos kept beside it.

Tables: ``features`` (model key, image hash) -> (shard, row); ``models`` (what each model key
means); ``file_hashes`` (the file-hash memo); ``decode_failures`` (per decoder); ``memo`` (small JSON
values). WAL mode, ``synchronous=FULL`` and explicit transactions: the index never outruns the shards.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .._io import disk_full, sha256_file

SCHEMA = """
CREATE TABLE IF NOT EXISTS file_hashes (
    path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, inode INTEGER, sha256 TEXT);
CREATE TABLE IF NOT EXISTS models (model_key TEXT PRIMARY KEY, description TEXT, dim INTEGER, dtype TEXT);
CREATE TABLE IF NOT EXISTS features (
    model_key TEXT, image TEXT, shard TEXT, row INTEGER, PRIMARY KEY (model_key, image));
CREATE INDEX IF NOT EXISTS features_by_shard ON features (shard);
CREATE TABLE IF NOT EXISTS decode_failures (image TEXT, decoder TEXT, reason TEXT, PRIMARY KEY (image, decoder));
CREATE TABLE IF NOT EXISTS memo (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS claims (
    job TEXT, image TEXT, owner TEXT, time REAL, PRIMARY KEY (job, image));
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


def _read_error(exc: OSError, path: str) -> str:
    """Why a file could not be hashed, without its path."""
    if isinstance(exc, FileNotFoundError):
        return "broken symbolic link (its target does not exist)" if os.path.islink(path) else "file not found"
    if exc.errno == errno.ELOOP:
        return "symbolic link loop"
    return f"cannot read file ({exc.strerror or exc})"


def new_owner() -> str:
    """A claim owner's name: host, process id and a random part (one per extraction)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def owner_alive(owner: str) -> bool:
    """False for an owner on this host whose process is gone (killed: its claims need not wait to expire)."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        return True
    return True


class Index:
    """One connection to ``index.sqlite`` in a cache folder (created with its tables if missing).

    With ``read_only`` the file is opened as immutable (no locks, no journal: a folder this process may
    not write to) and every write is skipped.
    """

    def __init__(self, path: Path, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        if read_only:
            self.db = sqlite3.connect(f"{path.resolve().as_uri()}?immutable=1", uri=True, isolation_level=None)
            return
        self.db = sqlite3.connect(path, timeout=60, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # the index is small; never let it outrun the shards
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def check(self) -> None:
        """Raise ``sqlite3.DatabaseError`` unless SQLite finds the file sound (a quick structural check)."""
        result = self.db.execute("PRAGMA quick_check(1)").fetchone()
        if result is None or result[0] != "ok":
            raise sqlite3.DatabaseError(result[0] if result else "no answer from quick_check")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write: every statement inside commits together or not at all. A full disk becomes
        :class:`~headstart.errors.DiskFullError` naming the folder."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException as exc:
            self.db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
                raise disk_full(self.path, exc) from exc
            raise
        try:
            self.db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if "full" in str(exc):
                self.db.execute("ROLLBACK")
                raise disk_full(self.path, exc) from exc
            raise

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
                digest = sha256_file(real)
            except OSError as exc:
                keys.append(None)
                errors[i] = _read_error(exc, real)
                continue
            keys.append(digest)
            fresh.append((_db_text(real), *stamp, digest))
        if fresh and not self.read_only:
            with self._transaction() as db:
                db.executemany(_HASH_ROW, fresh)
        return keys, errors

    def remember_hash(self, path: str | os.PathLike[str], digest: str) -> None:
        """Record that ``path`` (as it is now on disk) holds content ``digest``."""
        real = _memo_path(path, os.getcwd())
        if self.read_only:
            return
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
        if self.read_only:
            return
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO memo VALUES (?, ?)", (key, json.dumps(value, sort_keys=True)))

    # ------------------------------------------------------------------------------------ decode failures

    def failures(self, images: Sequence[str], decoder: str) -> dict[str, str]:
        """Images already known to be undecodable by ``decoder``, with the reason."""
        return {img: reason for img, reason in self._select_in(
            "SELECT image, reason FROM decode_failures WHERE decoder = ? AND image IN ({marks})", (decoder,), images)}

    def record_failures(self, failures: dict[str, str], decoder: str) -> None:
        if failures and not self.read_only:
            with self._transaction() as db:
                db.executemany("INSERT OR REPLACE INTO decode_failures VALUES (?, ?, ?)",
                               [(img, decoder, reason) for img, reason in failures.items()])

    # ------------------------------------------------------------------------------------ models and rows

    def register_models(self, models: Sequence[tuple[str, dict[str, Any], int]], dtype: str) -> None:
        """Record (key, description, dim) of models not yet known, in one transaction (none if all known)."""
        known = {k for (k,) in self._select_in("SELECT model_key FROM models WHERE model_key IN ({marks})", (),
                                               [m[0] for m in models])}
        new = [(k, json.dumps(d, sort_keys=True), dim, dtype) for k, d, dim in models if k not in known]
        if new and not self.read_only:
            with self._transaction() as db:
                db.executemany("INSERT OR IGNORE INTO models VALUES (?, ?, ?, ?)", new)

    def descriptions(self, keys: Sequence[str]) -> dict[str, Any]:
        """The JSON description of each known model key (what a shard's sidecar records)."""
        return {k: json.loads(d) for k, d in self._select_in(
            "SELECT model_key, description FROM models WHERE model_key IN ({marks})", (), keys)}

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

    def add_shard(self, shard: str, keys: Sequence[str], images: Sequence[str], release: str | None = None) -> int:
        """Point ``(keys[r], images[r])`` at row ``r`` of ``shard`` (which must already be durable) where the
        index has no row for that pair yet (a location, once given, never changes), and drop the claims
        of ``release`` on these images, in one transaction. Returns the rows added (0: the shard is
        redundant, as another process computed the same rows first)."""
        with self._transaction() as db:
            before = db.total_changes
            db.executemany("INSERT OR IGNORE INTO features VALUES (?, ?, ?, ?)",
                           [(k, image, shard, r) for r, (k, image) in enumerate(zip(keys, images))])
            added = db.total_changes - before
            if release is not None:
                db.executemany("DELETE FROM claims WHERE owner = ? AND image = ?",
                               [(release, image) for image in dict.fromkeys(images)])
        return added

    def add_rows(self, rows: Sequence[tuple[str, str, str, int]], models: dict[str, tuple[str, int, str]]) -> int:
        """Insert ``(model key, image, shard, row)`` rows and ``{key: (description JSON, dim, dtype)}`` models
        where missing (rebuilding the index from the shards); returns the rows added."""
        with self._transaction() as db:
            db.executemany("INSERT OR IGNORE INTO models VALUES (?, ?, ?, ?)",
                           [(k, *m) for k, m in models.items()])
            before = db.total_changes
            db.executemany("INSERT OR IGNORE INTO features VALUES (?, ?, ?, ?)", rows)
            return db.total_changes - before

    def drop_shard(self, shard: str) -> None:
        """Forget every row of ``shard``."""
        if self.read_only:
            return
        with self._transaction() as db:
            db.execute("DELETE FROM features WHERE shard = ?", (shard,))

    # ------------------------------------------------------------------------------------ claims

    def claim(self, job: str, images: Sequence[str], owner: str, ttl: float) -> list[str]:
        """Claim ``images`` of ``job`` for ``owner``, except those another owner claimed less than ``ttl``
        seconds ago (a claim is refreshed by :meth:`heartbeat`) and whose process is alive; the images
        claimed, in one transaction."""
        if self.read_only:
            return list(images)
        with self._transaction() as db:
            now = time.time()
            db.execute("DELETE FROM claims WHERE job = ? AND time < ?", (job, now - ttl))
            taken = {image for image, other in self._select_in(
                "SELECT image, owner FROM claims WHERE job = ? AND owner != ? AND image IN ({marks})", (job, owner),
                images) if owner_alive(other)}
            mine = [image for image in dict.fromkeys(images) if image not in taken]
            db.executemany("INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?)",
                           [(job, image, owner, now) for image in mine])
        return mine

    def heartbeat(self, owner: str) -> None:
        """Keep ``owner``'s claims alive."""
        if not self.read_only:
            with self._transaction() as db:
                db.execute("UPDATE claims SET time = ? WHERE owner = ?", (time.time(), owner))

    def release(self, owner: str, images: Sequence[str] | None = None) -> None:
        """Drop ``owner``'s claims on ``images``, or all of them (its work is done, or it stopped)."""
        if self.read_only:
            return
        with self._transaction() as db:
            if images is None:
                db.execute("DELETE FROM claims WHERE owner = ?", (owner,))
            else:
                db.executemany("DELETE FROM claims WHERE owner = ? AND image = ?", [(owner, i) for i in images])

    def shards(self) -> dict[str, int]:
        """Every shard the index points at, with its number of rows."""
        return dict(self.db.execute("SELECT shard, COUNT(*) FROM features GROUP BY shard"))

    def counts(self) -> tuple[int, int]:
        """(feature rows, models) in the index."""
        n_rows = self.db.execute("SELECT COUNT(*) FROM features").fetchone()[0]
        n_models = self.db.execute("SELECT COUNT(*) FROM models").fetchone()[0]
        return n_rows, n_models
