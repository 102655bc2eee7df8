"""Rows and decode failures waiting to be written: one flush writes one shard of every view of those images."""

from __future__ import annotations

from typing import Any

import numpy as np

FLUSH_BYTES = 256 << 20  # flush pending rows at this size even before ``flush_every`` images


class PendingRows:
    """Rows and permanent decode failures not yet in ``cache``. One flush writes one shard holding every
    view of these images, image by image, so reading them back is one slice."""

    def __init__(self, cache: Any, decoder: str, row_bytes: int) -> None:
        self.cache, self.decoder, self.row_bytes = cache, decoder, row_bytes
        self.rows: list[tuple[str, str, np.ndarray]] = []  # (model key, image key, row)
        self.permanent: dict[str, str] = {}
        self.images = 0

    def due(self, flush_every: int) -> bool:
        return self.images >= flush_every or len(self.rows) * self.row_bytes >= FLUSH_BYTES  # big shards read fast

    def flush(self) -> None:
        if self.rows:
            self.cache.write([k for k, _, _ in self.rows], [name for _, name, _ in self.rows],
                             np.concatenate([row for _, _, row in self.rows]))
            self.rows.clear()
        self.cache.record_failures(self.permanent, self.decoder)
        self.permanent.clear()
        self.images = 0
