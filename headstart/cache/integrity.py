"""What each shard says about itself: a JSON sidecar with its checksum and the keys of its rows.

``shards/<prefix>/<id>.npy`` has ``<id>.json`` beside it, written after the shard and before the index
points at it. The sidecar holds the sha256 and size of the ``.npy`` file (checked the first time a
process reads the shard: a zeroed, truncated or bit-flipped shard is caught, not served) and, for each
row, its model key and image key, so a lost index can be rebuilt from the shards alone.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from .._io import atomic_write_bytes, sha256_file

FORMAT = 1


class HashingWriter:
    """A write-only file object that passes bytes to ``handle`` and hashes them on the way."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self.sha256.update(data)
        self.size += len(memoryview(data).cast("B"))
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def sidecar_path(shard_path: Path) -> Path:
    return shard_path.with_suffix(".json")


def _numbered(values: Sequence[str]) -> tuple[list[str], list[int]]:
    """(distinct values in first-seen order, the position of each value in that list)."""
    ids: dict[str, int] = {}
    of_row = [ids.setdefault(v, len(ids)) for v in values]
    return list(ids), of_row


def write_sidecar(shard_path: Path, writer: HashingWriter, keys: Sequence[str], images: Sequence[str],
                  dim: int, dtype: str, models: dict[str, Any]) -> None:
    """Describe a shard just written through ``writer``: checksum, size, shape and each row's keys."""
    key_list, key_of_row = _numbered(keys)
    image_list, image_of_row = _numbered(images)
    meta = {"format": FORMAT, "sha256": writer.sha256.hexdigest(), "bytes": writer.size,
            "rows": len(images), "dim": dim, "dtype": dtype, "models": models,
            "keys": key_list, "key_of_row": key_of_row, "images": image_list, "image_of_row": image_of_row}
    atomic_write_bytes(sidecar_path(shard_path), json.dumps(meta, separators=(",", ":")).encode())


def read_sidecar(shard_path: Path) -> dict[str, Any]:
    """The shard's sidecar. Raises ``ValueError`` (missing, unreadable or not a sidecar) with the reason."""
    try:
        meta = json.loads(sidecar_path(shard_path).read_bytes())
    except FileNotFoundError:
        raise ValueError("its checksum file is missing") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"its checksum file is unreadable ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("sha256"), str):
        raise ValueError("its checksum file is not one headstart wrote")
    return meta


def stamp(path: Path) -> tuple[int, int, int]:
    """(size, mtime, inode): what must not change for a verified shard to stay verified in this process."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


def damage(shard_path: Path) -> str | None:
    """Why the shard cannot be trusted (missing checksum, wrong size, wrong sha256), or None if it is intact."""
    try:
        meta = read_sidecar(shard_path)
        size = shard_path.stat().st_size
        if size != meta.get("bytes"):
            return f"it has {size} bytes, its checksum file says {meta.get('bytes')}"
        digest = sha256_file(shard_path)
    except ValueError as exc:
        return str(exc)
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    return None if digest == meta["sha256"] else "its sha256 does not match its checksum file"


def rows_of(meta: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(model key, image key, row) of every row a sidecar describes."""
    keys, images = meta["keys"], meta["images"]
    return [(keys[k], images[i], r) for r, (k, i) in enumerate(zip(meta["key_of_row"], meta["image_of_row"]))]


class CacheWarning(UserWarning):
    """Something in the cache folder was damaged or unusable and was worked around (one line, naming it)."""
