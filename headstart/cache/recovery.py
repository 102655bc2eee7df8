"""Opening a cache folder's index, and rebuilding it from the shards' sidecars when it is unreadable.

A garbage or truncated ``index.sqlite`` is moved aside (``index.sqlite.corrupt-<time>``, with its WAL
files) under a lock on the folder, a new one is made and every shard whose sidecar is intact is put
back, so cached rows survive the index. An index found empty while shards lie on disk is refilled
the same way.
"""

from __future__ import annotations

import json
import sqlite3
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

from .index import Index
from .integrity import CacheWarning, read_sidecar, rows_of

INDEX = "index.sqlite"


def lock(root: Path) -> FileLock:
    """The folder-wide lock for rare whole-index work (recovery, ``cache clear``/``prune``)."""
    return FileLock(str(root / "index.lock"), timeout=600)


def open_index(root: Path, check: bool) -> Index:
    """The index of ``root``; with ``check``, also checked (once per process is enough) and recovered."""
    try:
        index = Index(root / INDEX)
        if check:
            index.check()
    except sqlite3.DatabaseError as exc:
        return _recover(root, exc)
    if check and index.counts()[0] == 0 and next(_sidecars(root), None) is not None:
        with lock(root):
            n_shards, n_rows = rebuild(index, root / "shards")
        if n_rows:
            warnings.warn(f"cache index {root / INDEX} was empty although shards lie beside it; "
                          f"{n_rows} rows of {n_shards} shards were put back", CacheWarning, stacklevel=3)
    return index


def _recover(root: Path, exc: sqlite3.DatabaseError) -> Index:
    with lock(root):
        try:  # another process may have recovered it while this one waited for the lock
            index = Index(root / INDEX)
            index.check()
            return index
        except sqlite3.DatabaseError:
            pass
        aside = root / f"{INDEX}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
        for suffix in ("", "-wal", "-shm"):
            source = root / f"{INDEX}{suffix}"
            if source.exists():
                source.replace(aside.with_name(aside.name + suffix))
        index = Index(root / INDEX)
        n_shards, n_rows = rebuild(index, root / "shards")
    warnings.warn(f"cache index {root / INDEX} was unreadable ({exc}); moved aside to {aside.name} and rebuilt "
                  f"from the shards: {n_rows} rows of {n_shards} shards kept", CacheWarning, stacklevel=3)
    return index


def _sidecars(root: Path) -> Iterator[Path]:
    shards = root / "shards"
    return shards.glob("*/*.json") if shards.is_dir() else iter(())


def rebuild(index: Index, shards: Path) -> tuple[int, int]:
    """Put every shard with an intact sidecar (and a file of the size it records) back into ``index``;
    (shards, rows) added. Checksums are checked later, on each shard's first read."""
    n_shards = n_rows = 0
    for sidecar in sorted(_sidecars(shards.parent)):
        npy = sidecar.with_suffix(".npy")
        try:
            meta = read_sidecar(npy)
            if npy.stat().st_size != meta["bytes"]:
                continue
        except (ValueError, OSError, KeyError):
            continue
        name = npy.relative_to(shards).as_posix()
        models = {k: (json.dumps(d, sort_keys=True), meta["dim"], meta["dtype"])
                  for k, d in meta.get("models", {}).items()}
        added = index.add_rows([(k, image, name, r) for k, image, r in rows_of(meta)], models)
        n_shards += added > 0
        n_rows += added
    return n_shards, n_rows
