"""Shard files: feature rows as ``.npy`` arrays, written atomically, read through memory maps."""

from __future__ import annotations

import errno
import itertools
import uuid
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_write
from .integrity import HashingWriter, damage, stamp, write_sidecar
from .locations import Locations

_NO_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOMEM)


class MissingShardError(OSError):
    """The index points at a shard file that is gone, unreadable or damaged (its rows were dropped)."""

    def __init__(self, shard: str, reason: str = "it is missing or unreadable") -> None:
        super().__init__(f"feature shard '{shard}': {reason}")
        self.shard = shard
        self.reason = reason


def _open_maps_limit() -> int:
    """Memory maps kept open per folder: each holds a file descriptor, so a quarter of the process's limit."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # no ``resource`` module (Windows)
        return 128
    return 4096 if soft == resource.RLIM_INFINITY else max(16, min(4096, soft // 4))


_OPEN_MAPS = _open_maps_limit()


def _as_index(index: np.ndarray) -> slice | np.ndarray:
    """A slice when ``index`` is a run of consecutive integers (the usual case), else the array."""
    if len(index) and index[-1] - index[0] == len(index) - 1 and (np.diff(index) == 1).all():
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


class ShardStore:
    """The shards under ``folder`` and this process's read-only memory maps of them (``maps``, shared by
    every cache open on the folder; at most ``_OPEN_MAPS`` at a time, torch never writes to them).

    Every shard's checksum is checked the first time this process maps it (``verified`` remembers the
    file's size, mtime and inode afterwards, so a file replaced later is checked again).
    """

    def __init__(self, folder: Path, maps: dict[str, torch.Tensor], verified: dict[str, tuple[int, int, int]],
                 names_from: Path | None = None) -> None:
        self.folder = folder
        self.maps = maps
        self.verified = verified
        self.names_from = names_from  # write new shards here, named by absolute path (a read-only cache's overlay)

    def path(self, shard: str) -> Path:
        return self.folder / shard  # an absolute name (an overlay's shard) stays itself

    def write(self, prefix: str, rows: np.ndarray, dtype: np.dtype, keys: Sequence[str], images: Sequence[str],
              models: dict[str, Any]) -> str:
        """A new shard ``<prefix>/<random>.npy`` holding ``rows`` in ``dtype``, and its sidecar (checksum and
        the keys of each row), both durable on return; its name."""
        shard = f"{prefix}/{uuid.uuid4().hex}.npy"
        if self.names_from is not None:
            shard = str(self.names_from / shard)
        hashed: list[HashingWriter] = []

        def save(handle: Any) -> None:
            hashed.append(HashingWriter(handle))
            np.save(hashed[0], np.ascontiguousarray(rows, dtype=dtype))

        path = self.path(shard)
        atomic_write(path, save)
        write_sidecar(path, hashed[0], keys, images, rows.shape[1], np.dtype(dtype).name, models)
        self.verified[shard] = stamp(path)
        return shard

    def _check(self, shard: str) -> None:
        """Raise :class:`MissingShardError` if the shard's bytes are not those its sidecar describes
        (checked once per process while the file stays the same)."""
        path = self.path(shard)
        try:
            now = stamp(path)
        except OSError:
            raise MissingShardError(shard) from None
        if self.verified.get(shard) == now:
            return
        reason = damage(path)
        if reason is not None:
            raise MissingShardError(shard, reason)
        self.verified[shard] = now

    def _load(self, shard: str) -> np.ndarray:
        """Memory-map a shard. Running out of file descriptors or memory is not the shard's fault: the
        maps are let go and it is tried once more, and if that fails too the error is raised as it is
        (only a shard that is really missing or damaged counts as missing)."""
        try:
            return np.load(self.path(shard), mmap_mode="r")
        except OSError as exc:
            if exc.errno not in _NO_RESOURCES:
                raise
            self.maps.clear()
        try:
            return np.load(self.path(shard), mmap_mode="r")
        except OSError as exc:
            if exc.errno in _NO_RESOURCES:
                raise RuntimeError(f"cannot open feature shard '{shard}': {exc.strerror}; raise the limit of "
                                   "open files (ulimit -n) or free memory") from exc
            raise

    def array(self, shard: str, dim: int) -> torch.Tensor:
        """The shard memory-mapped read-only, as a tensor ``(rows, dim)`` in the storage dtype.

        Raises:
            MissingShardError: the file is gone, unreadable or not ``(rows, dim)``.
        """
        tensor = self.maps.get(shard)
        if tensor is None:
            self._check(shard)
            try:
                array = self._load(shard)
                if array.ndim != 2 or array.shape[1] != dim:
                    raise ValueError(f"shape {array.shape}")
            except (OSError, ValueError) as exc:
                self.maps.pop(shard, None)
                if isinstance(exc, ValueError):
                    raise MissingShardError(shard, f"its rows are not {dim} wide") from None
                raise MissingShardError(shard) from None
            with warnings.catch_warnings():  # torch warns that the array is read-only; we only ever read it
                warnings.simplefilter("ignore", UserWarning)
                tensor = torch.from_numpy(array)
            if len(self.maps) >= _OPEN_MAPS:
                self.maps.clear()
            self.maps[shard] = tensor
        return tensor

    def fault(self, shard: str, dim: int, n_rows: int) -> str | None:
        """Why the shard cannot serve ``n_rows`` rows of ``dim`` (gone, even if still mapped here; damaged;
        too short), or None if it can. It is left mapped when it can."""
        if shard in self.maps and not self.path(shard).exists():
            self.maps.pop(shard)  # deleted, though still readable through our map: forget it anyway
        try:
            n = len(self.array(shard, dim))
        except MissingShardError as exc:
            return exc.reason
        return None if n >= n_rows else f"it has {n} rows, the index expects at least {n_rows}"

    def iter_rows(self, locations: Locations, dim: int, max_rows: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """See :meth:`~headstart.cache.FeatureCache.iter_rows`."""
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
            source = self.array(shard, dim)
            for start in range(begin, end, max_rows):
                positions = present[start:min(end, start + max_rows)]
                src = flat_rows[positions]
                if src.max() >= len(source):
                    raise MissingShardError(shard)
                where = _as_index(src)
                yield positions, (source[where] if isinstance(where, slice) else
                                  source.index_select(0, torch.from_numpy(src)))


def gather(blocks: Iterator[tuple[np.ndarray, torch.Tensor]], n: int, n_views: int, dim: int) -> np.ndarray:
    """Copy ``(positions, rows)`` blocks into float32 ``(n, n_views, dim)``, zeros elsewhere: a strided
    slice when the positions are evenly spaced (one view of a run of images), else an indexed copy."""
    out = np.zeros((n, n_views, dim), dtype=np.float32)
    target = torch.from_numpy(out.reshape(n * n_views, dim))
    for dest, block in blocks:
        step = int(dest[1] - dest[0]) if len(dest) > 1 else 1
        if step > 0 and dest[-1] - dest[0] == step * (len(dest) - 1) and (np.diff(dest) == step).all():
            target[int(dest[0]):int(dest[-1]) + 1:step].copy_(block)
        else:
            target.index_copy_(0, torch.from_numpy(dest), block.float())
    return out
