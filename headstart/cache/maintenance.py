"""Looking after a cache folder: what it holds, whether it is sound, and tidying or clearing it.

``headstart cache info|verify|prune|clear`` call these. Orphans are shard files the index does not
point at (a writer killed between writing a shard and committing the index, or files of an older
version); a shard younger than ``min_age`` seconds is never an orphan, as its writer may be about to
commit it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from .feature_cache import FeatureCache
from .integrity import damage
from .recovery import INDEX, lock

ORPHAN_MIN_AGE = 600.0  # seconds


def _on_disk(cache: FeatureCache) -> list[str]:
    shards = cache.root / "shards"
    return sorted(p.relative_to(shards).as_posix() for p in shards.glob("*/*.npy")) if shards.is_dir() else []


def _leftovers(cache: FeatureCache, min_age: float) -> tuple[list[str], list[Path]]:
    """(orphan shard names, other leftover files: lone sidecars, temporary files), older than ``min_age``."""
    referenced = cache.index.shards()
    now = time.time()
    shards = cache.root / "shards"
    old = [p for p in shards.rglob("*") if p.is_file() and now - p.stat().st_mtime >= min_age] if shards.is_dir() \
        else []
    orphans = sorted(p.relative_to(shards).as_posix() for p in old if p.suffix == ".npy"
                     and not p.name.startswith(".") and p.relative_to(shards).as_posix() not in referenced)
    other = [p for p in old if p.name.endswith(".tmp")
             or (p.suffix == ".json" and not p.with_suffix(".npy").exists())]
    return orphans, other


def info(cache: FeatureCache, min_age: float = ORPHAN_MIN_AGE) -> dict[str, Any]:
    """Size, models (with their rows) and orphan shards of the cache folder."""
    db = cache.index.db
    per_model = dict(db.execute("SELECT model_key, COUNT(*) FROM features GROUP BY model_key"))
    models = []
    for key, description, dim, dtype in db.execute("SELECT model_key, description, dim, dtype FROM models"):
        described = json.loads(description)
        models.append({"key": key[:16], "backbone": described.get("backbone"), "cut": described.get("cut"),
                       "view": described.get("view"), "dim": dim, "dtype": dtype, "rows": per_model.get(key, 0)})
    orphans, other = _leftovers(cache, min_age)
    files = [p for p in cache.root.rglob("*") if p.is_file()]
    return {"root": str(cache.root), "bytes": sum(p.stat().st_size for p in files), "rows": sum(per_model.values()),
            "shards": len(cache.index.shards()), "models": models, "orphan_shards": orphans,
            "leftover_files": [str(p) for p in other], "read_only": cache.read_only,
            "corrupt_index_copies": sorted(p.name for p in cache.root.glob(f"{INDEX}.corrupt-*"))}


def verify(cache: FeatureCache) -> dict[str, Any]:
    """Check the index (SQLite's integrity check) and every shard it points at (size and sha256 against
    its sidecar). A damaged shard is dropped from the index and deleted, as on reading, so the next run
    recomputes its rows; the answer lists them."""
    row = cache.index.db.execute("PRAGMA integrity_check(1)").fetchone()
    index_state = row[0] if row else "no answer"
    damaged = []
    for shard in sorted(cache.index.shards()):
        reason = damage(cache.shard_path(shard))
        if reason is not None:
            damaged.append({"shard": str(cache.shard_path(shard)), "reason": reason})
            cache.drop_shard(shard)
    return {"root": str(cache.root), "index": index_state, "shards_checked": len(cache.index.shards()) + len(damaged),
            "damaged": damaged}


def prune(cache: FeatureCache, min_age: float = ORPHAN_MIN_AGE) -> dict[str, Any]:
    """Delete orphan shards, lone sidecars, temporary files and moved-aside corrupt indexes."""
    with lock(cache.root):
        orphans, other = _leftovers(cache, min_age)
        paths = [cache.root / "shards" / name for name in orphans]
        paths += [p.with_suffix(".json") for p in paths] + other + list(cache.root.glob(f"{INDEX}.corrupt-*"))
        freed = 0
        for path in paths:
            with contextlib.suppress(OSError):
                size = path.stat().st_size
                path.unlink()
                freed += size
    return {"root": str(cache.root), "removed_shards": len(orphans), "removed_files": len(paths), "bytes_freed": freed}


def clear(root: Path) -> dict[str, Any]:
    """Delete the whole cache folder's contents (index, shards, converted engines)."""
    freed = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0
    if root.exists():
        with lock(root):
            for child in root.iterdir():
                if child.name == "index.lock":
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    return {"root": str(root), "bytes_freed": freed}
