"""Rows and decode failures waiting to be written: one flush writes one shard of every view of those images."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

FLUSH_BYTES = 256 << 20  # flush pending rows at this size even before ``flush_every`` images
FLUSH_SECONDS = 10.0  # ... and when the oldest pending row is this old: a kill loses at most this much work
FLUSH_SECONDS_ENV = "HEADSTART_FLUSH_SECONDS"


def flush_seconds() -> float:
    """``$HEADSTART_FLUSH_SECONDS`` if set (a positive number), else :data:`FLUSH_SECONDS`."""
    value = os.environ.get(FLUSH_SECONDS_ENV)
    if value is None:
        return FLUSH_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        from ..errors import UsageError

        raise UsageError(f"${FLUSH_SECONDS_ENV} is {value!r}; expected a positive number of seconds (default "
                         f"{FLUSH_SECONDS:g}), or unset it")
    return seconds


class PendingRows:
    """Rows and permanent decode failures not yet in ``cache``. One flush writes one shard holding every
    view of these images, image by image, so reading them back is one slice. ``owner`` is the claim
    holder (see :meth:`~headstart.cache.FeatureCache.claim`): a flush releases its claims on the images
    written and keeps its other claims alive."""

    def __init__(self, cache: Any, decoder: str, row_bytes: int, owner: str | None = None) -> None:
        self.cache, self.decoder, self.row_bytes, self.owner = cache, decoder, row_bytes, owner
        self.rows: list[tuple[str, str, np.ndarray]] = []  # (model key, image key, row)
        self.permanent: dict[str, str] = {}
        self.images = 0
        self.since = time.monotonic()
        self.every = flush_seconds()

    def due(self, flush_every: int) -> bool:
        return (self.images >= flush_every or len(self.rows) * self.row_bytes >= FLUSH_BYTES  # big shards read fast
                or time.monotonic() - self.since >= self.every)

    def flush(self) -> None:
        if self.rows:
            self.cache.write([k for k, _, _ in self.rows], [name for _, name, _ in self.rows],
                             np.concatenate([row for _, _, row in self.rows]), release=self.owner)
            self.rows.clear()
        self.cache.record_failures(self.permanent, self.decoder)
        self.permanent.clear()
        if self.owner is not None:
            self.cache.heartbeat(self.owner)
        self.images = 0
        self.since = time.monotonic()
