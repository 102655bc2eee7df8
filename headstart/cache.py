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

import hashlib
import json
import os
import sqlite3
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs

CACHE_ENV = "HEADSTART_CACHE_DIR"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, sha256 TEXT);
CREATE TABLE IF NOT EXISTS models (model_key TEXT PRIMARY KEY, description TEXT, dim INTEGER, dtype TEXT);
CREATE TABLE IF NOT EXISTS features (
    model_key TEXT, image TEXT, shard TEXT, row INTEGER, PRIMARY KEY (model_key, image));
CREATE TABLE IF NOT EXISTS failures (image TEXT PRIMARY KEY, reason TEXT);
CREATE TABLE IF NOT EXISTS memo (key TEXT PRIMARY KEY, value TEXT);
"""


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
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._shards: dict[str, np.ndarray] = {}

    def close(self) -> None:
        self._db.close()
        self._shards.clear()

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ image keys

    def image_keys(self, paths: Sequence[Path]) -> tuple[list[str | None], dict[int, str]]:
        """sha256 of each file's bytes, memoised on (path, size, mtime_ns).

        Returns:
            (keys, errors): ``keys[i]`` is ``None`` when file ``i`` could not be read, and then
            ``errors[i]`` says why (without the path).
        """
        keys: list[str | None] = []
        errors: dict[int, str] = {}
        memo = {row[0]: row[1:] for row in self._db.execute("SELECT path, size, mtime_ns, sha256 FROM files")}
        fresh: list[tuple[str, int, int, str]] = []
        for i, path in enumerate(paths):
            try:
                resolved = str(Path(path).resolve())
                st = os.stat(resolved)
                hit = memo.get(resolved)
                if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
                    keys.append(hit[2])
                    continue
                digest = hashlib.sha256(Path(resolved).read_bytes()).hexdigest()
            except OSError as exc:
                keys.append(None)
                errors[i] = f"cannot read file ({exc.strerror or exc})"
                continue
            keys.append(digest)
            fresh.append((resolved, st.st_size, st.st_mtime_ns, digest))
        if fresh:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)", fresh)
        return keys, errors

    # ------------------------------------------------------------------------------------ memo

    def get_memo(self, key: str) -> dict[str, Any] | None:
        """A small JSON value remembered under ``key`` (e.g. a backbone's digest and data config)."""
        row = self._db.execute("SELECT value FROM memo WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put_memo(self, key: str, value: dict[str, Any]) -> None:
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO memo VALUES (?, ?)", (key, json.dumps(value, sort_keys=True)))

    # ------------------------------------------------------------------------------------ features

    def register_model(self, key: str, description: dict[str, Any], dim: int) -> None:
        with self._db:
            self._db.execute(
                "INSERT OR IGNORE INTO models VALUES (?, ?, ?, ?)",
                (key, json.dumps(description, sort_keys=True), dim, self.dtype.name),
            )

    def lookup(self, key: str, images: Sequence[str]) -> dict[str, tuple[str, int]]:
        """Map each cached image key to its (shard, row) for ``key``."""
        wanted = set(images)
        found: dict[str, tuple[str, int]] = {}
        for image, shard, row in self._db.execute(
            "SELECT image, shard, row FROM features WHERE model_key = ?", (key,)
        ):
            if image in wanted:
                found[image] = (shard, row)
        return found

    def failures(self, images: Sequence[str]) -> dict[str, str]:
        wanted = set(images)
        return {img: reason for img, reason in self._db.execute("SELECT image, reason FROM failures")
                if img in wanted}

    def record_failures(self, failures: dict[str, str]) -> None:
        if failures:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO failures VALUES (?, ?)", list(failures.items()))

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
        with open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(rows, dtype=self.dtype))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO features VALUES (?, ?, ?, ?)",
                [(key, image, shard, r) for r, image in enumerate(images)],
            )

    def read(self, locations: Sequence[tuple[str, int]], dim: int) -> np.ndarray:
        """Gather rows from memory-mapped shards as a float32 array ``(len(locations), dim)``."""
        out = np.empty((len(locations), dim), dtype=np.float32)
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for i, (shard, row) in enumerate(locations):
            by_shard.setdefault(shard, []).append((i, row))
        for shard, pairs in by_shard.items():
            array = self._shards.get(shard)
            if array is None:
                array = np.load(self.root / "shards" / shard, mmap_mode="r")
                self._shards[shard] = array
            dest, rows = zip(*pairs)
            out[list(dest)] = array[list(rows)]
        return out

    def stats(self) -> dict[str, Any]:
        n_rows = self._db.execute("SELECT COUNT(*) FROM features").fetchone()[0]
        n_models = self._db.execute("SELECT COUNT(*) FROM models").fetchone()[0]
        size = sum(f.stat().st_size for f in (self.root / "shards").rglob("*.npy")) if (
            self.root / "shards").exists() else 0
        return {"root": str(self.root), "rows": n_rows, "models": n_models, "bytes": size}
