"""A cache folder this process may not write to: its index read as it is, new rows in a temporary overlay.

Reads see the folder's rows first, then the overlay's; every write (new shards, file-hash memo, decode
failures) goes to the overlay, a temporary folder removed when the cache is closed. So a read-only
cache serves what it holds and the run still gets the features of images it lacks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .index import Index


class LayeredIndex:
    """The :class:`Index` interface over ``base`` (opened read-only) and ``top`` (writable, temporary)."""

    read_only = False

    def __init__(self, base: Index | None, top: Index) -> None:
        self.base, self.top = base, top
        self.path = top.path

    def _layers(self) -> list[Index]:
        return [self.top] if self.base is None else [self.base, self.top]

    def close(self) -> None:
        for layer in self._layers():
            layer.close()

    def image_keys(self, paths: Sequence[str | os.PathLike[str]]) -> tuple[list[str | None], dict[int, str]]:
        return self.top.image_keys(paths)

    def remember_hash(self, path: str | os.PathLike[str], digest: str) -> None:
        self.top.remember_hash(path, digest)

    def get_memo(self, key: str) -> dict[str, Any] | None:
        found = self.top.get_memo(key)
        return found if found is not None or self.base is None else self.base.get_memo(key)

    def put_memo(self, key: str, value: dict[str, Any]) -> None:
        self.top.put_memo(key, value)

    def failures(self, images: Sequence[str], decoder: str) -> dict[str, str]:
        return {k: v for layer in self._layers() for k, v in layer.failures(images, decoder).items()}

    def record_failures(self, failures: dict[str, str], decoder: str) -> None:
        self.top.record_failures(failures, decoder)

    def register_models(self, models: Sequence[tuple[str, dict[str, Any], int]], dtype: str) -> None:
        self.top.register_models(models, dtype)

    def descriptions(self, keys: Sequence[str]) -> dict[str, Any]:
        return {k: v for layer in self._layers() for k, v in layer.descriptions(keys).items()}

    def lookup(self, keys: Sequence[str], images: Sequence[str]) -> list[dict[str, tuple[str, int]]]:
        found = self.top.lookup(keys, images)
        if self.base is not None:
            for mine, theirs in zip(found, self.base.lookup(keys, images)):
                mine.update(theirs)  # the folder's own rows first
        return found

    def add_shard(self, shard: str, keys: Sequence[str], images: Sequence[str], release: str | None = None) -> int:
        return self.top.add_shard(shard, keys, images, release)

    def drop_shard(self, shard: str) -> None:
        self.top.drop_shard(shard)

    def claim(self, job: str, images: Sequence[str], owner: str, ttl: float) -> list[str]:
        return list(dict.fromkeys(images))  # nobody else writes to a private overlay

    def heartbeat(self, owner: str) -> None:
        pass

    def release(self, owner: str, images: Sequence[str] | None = None) -> None:
        pass

    def counts(self) -> tuple[int, int]:
        counts = [layer.counts() for layer in self._layers()]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def shards(self) -> dict[str, int]:
        return {k: v for layer in self._layers() for k, v in layer.shards().items()}


def writable(folder: Path) -> bool:
    """Whether this process may create files in ``folder`` and write its index (if there is one)."""
    index = folder / "index.sqlite"
    return os.access(folder, os.W_OK | os.X_OK) and (not index.exists() or os.access(index, os.W_OK))
