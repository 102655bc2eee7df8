"""Tiny colour thumbnails: the second near-duplicate signal, for copies the backbone's features miss.

Pooled features are about what an image shows, so a copy shrunk to half size and recompressed can fall
to a cosine of 0.65 with its original while two different photos of a forest reach 0.92
(benchmarks/inspection.py). A 16 x 16 RGB thumbnail, centred on its mean and scaled to unit length,
barely changes under resizing and JPEG compression: such copies keep a correlation of 0.993 or more
with their original, where distinct photos of both benchmark sets stay at or below 0.968.

Thumbnails are kept in the feature cache (model key of ``DESCRIPTION``), so they are decoded once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

from ..cache import FeatureCache
from ..cache.feature_cache import model_key
from ..data.decode import ImageDecodeError, decode_image, draft_description
from ..preprocess import decoder_id

SIDE = 16
DIM = SIDE * SIDE * 3
DRAFT = (4 * SIDE, 4 * SIDE)  # a JPEG of 256+ pixels a side is decoded at a reduced scale (its DCT)
DESCRIPTION = {"kind": "thumbnail", "side": SIDE, "mode": "RGB", "resample": "box", "centred": "global", "v": 1,
               "decoder": decoder_id(), "draft": draft_description(DRAFT)}
CHUNK = 2048  # thumbnails stored at a time


def thumbnail(path: str | os.PathLike[str]) -> np.ndarray:
    """The centred, unit-length ``SIDE x SIDE`` RGB thumbnail of an image (zeros for a flat or unreadable one)."""
    try:
        image = decode_image(path, min_size=DRAFT)
    except ImageDecodeError:
        return np.zeros(DIM, dtype=np.float32)
    pixels = np.asarray(image.resize((SIDE, SIDE), Image.Resampling.BOX), dtype=np.float64).ravel()
    pixels -= pixels.mean()
    norm = np.linalg.norm(pixels)
    return (pixels / norm if norm > 1e-6 else np.zeros(DIM)).astype(np.float32)


def thumbnails(paths: Sequence[str | os.PathLike[str]], keys: Sequence[str | None], cache: FeatureCache,
               progress: bool = False) -> np.ndarray:
    """``(n, DIM)`` thumbnails of ``paths`` (content keys ``keys``; ``None`` for a file without one, whose
    thumbnail is computed but not stored): from the cache, the rest decoded one by one and stored.

    One at a time, in this thread: decoding changes process-wide state (warning filters, and for TIFF
    files the stderr descriptor) that threads would share; about 1,000 images/s on one core.
    """
    key = model_key(DESCRIPTION)
    cache.register_models([(key, DESCRIPTION, DIM)])
    located = cache.locate_verified([key], list(keys), DIM)
    rows = cache.read_locations(located, DIM)[:, 0]
    first_of: dict[str | int, int] = {}
    for i in np.flatnonzero(located.index[0] < 0).tolist():  # exact copies (one content key) decoded once
        first_of.setdefault(keys[i] if keys[i] is not None else i, i)
    todo = list(first_of.values())
    for start in _chunks(len(todo), progress):
        part = todo[start:start + CHUNK]
        rows[part] = np.stack([thumbnail(paths[i]) for i in part])
        stored = [i for i in part if keys[i] is not None]
        cache.write(key, [keys[i] for i in stored], rows[stored])
    for i in np.flatnonzero(located.index[0] < 0).tolist():
        rows[i] = rows[first_of[keys[i] if keys[i] is not None else i]]
    return rows


def _chunks(total: int, progress: bool) -> Iterator[int]:
    """The first index of each chunk of ``CHUNK``, with a progress bar of images when asked."""
    from tqdm.auto import tqdm

    with tqdm(total=total, desc="thumbnails", unit="img", disable=not progress or total == 0) as bar:
        for start in range(0, total, CHUNK):
            yield start
            bar.update(min(CHUNK, total - start))
