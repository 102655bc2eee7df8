"""The on-disk feature cache: content-addressed, atomic, resumable.

Layout under the cache root::

    index.sqlite                   # WAL-mode SQLite: which (model key, image hash) lives where
    shards/<model key>/<id>.npy    # feature rows, float16 by default, memory-mapped on read
    shards/<model key>/<id>.json   # the shard's sidecar: sha256, size, each row's model key and image key

A *model key* is a sha256 over everything that changes the numbers except the image: backbone
name, weights digest, cut point, preprocessing signature, storage dtype. An *image key* is the
sha256 of the file's bytes, so renamed or moved files still hit. Shards are written to a
temporary name and renamed before the index points at them, so a reader never sees a half-written
shard and an interrupted extraction loses at most the rows not yet flushed. Each process checks a
shard's checksum on first reading it (a damaged one is dropped and recomputed); a lost index is
rebuilt from the sidecars; a read-only folder is read, with new rows kept in a temporary overlay.

Modules: :mod:`.index` (SQLite: rows, file-hash memo, decode failures, JSON memo), :mod:`.shards`
(shard files and memory maps), :mod:`.locations` (:class:`Locations` and the location memo),
:mod:`.feature_cache` (:class:`FeatureCache`, which ties them together), :mod:`.pending` (rows
waiting to be written as one shard), :mod:`.integrity` (sidecars and checksums), :mod:`.recovery`
(opening and rebuilding the index), :mod:`.overlay` (read-only folders).
"""

from .._io import atomic_write_bytes
from .feature_cache import CACHE_ENV, FeatureCache, FolderMemo, default_cache_dir, model_key
from .integrity import CacheWarning
from .locations import Locations
from .shards import MissingShardError

__all__ = [
    "CACHE_ENV",
    "CacheWarning",
    "FeatureCache",
    "FolderMemo",
    "Locations",
    "MissingShardError",
    "atomic_write_bytes",
    "default_cache_dir",
    "model_key",
]
