"""Atomic file writes: a reader sees the old file or the whole new one, never a half-written one."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform allows fsync on a directory)."""
    with contextlib.suppress(OSError):  # not every platform/filesystem allows fsync on a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Create ``path`` from ``write(handle)``: a temporary file in the same folder, fsync, rename, fsync
    of the folder. The temporary file is removed if anything fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        if _is_disk_full(exc):
            raise disk_full(path, exc) from exc
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def copy_tree_durable(source: Path, target: Path) -> None:
    """``shutil.copytree`` with every file and folder fsynced, so that a rename of ``target`` (or of the
    folder holding it) into place afterwards never exposes empty or partial copies after a crash."""
    import shutil

    def copy(src: str, dst: str) -> None:
        shutil.copy2(src, dst)
        fd = os.open(dst, os.O_RDONLY)  # (a copy of a read-only file is read-only: fsync needs no write access)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    shutil.copytree(source, target, copy_function=copy)
    for folder in [target, *(p for p in target.rglob("*") if p.is_dir())]:
        fsync_dir(folder)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in blocks (the one file hash: cache, runs, weights, exports)."""
    with open(path, "rb") as handle:
        if hasattr(hashlib, "file_digest"):  # Python >= 3.11
            return hashlib.file_digest(handle, "sha256").hexdigest()
        digest = hashlib.sha256()
        while block := handle.read(1 << 20):
            digest.update(block)
        return digest.hexdigest()


def _is_disk_full(exc: OSError) -> bool:
    """ENOSPC/EDQUOT, or numpy's short write ("N requested and M written"), which carries no errno."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT) or (exc.errno is None and "requested and" in str(exc))


def disk_full(path: Path, exc: BaseException) -> Exception:
    """The error for a write to ``path`` that failed on a full file system: names the folder and the fix."""
    from .errors import DiskFullError

    error = DiskFullError(f"no space left on {Path(path).parent} (writing {Path(path).name}: {exc}); "
                          "free space or use --cache-dir / --out on another disk")
    error.errno = errno.ENOSPC
    return error


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    atomic_write(path, lambda handle: handle.write(data))
