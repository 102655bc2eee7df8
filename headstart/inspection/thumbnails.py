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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from ..cache import FeatureCache
from ..cache.feature_cache import model_key
from ..data.decode import ImageDecodeError, decode_image

SIDE = 16
DIM = SIDE * SIDE * 3
DESCRIPTION = {"kind": "thumbnail", "side": SIDE, "mode": "RGB", "resample": "box", "centred": "global", "v": 1}
CHUNK = 2048  # thumbnails computed, then stored, at a time


def thumbnail(path: str | os.PathLike[str]) -> np.ndarray:
    """The centred, unit-length ``SIDE x SIDE`` RGB thumbnail of an image (zeros for a flat or unreadable one)."""
    try:
        image = decode_image(path, min_size=(4 * SIDE, 4 * SIDE))  # a JPEG of 256+ pixels: at a reduced scale
    except ImageDecodeError:
        return np.zeros(DIM, dtype=np.float32)
    pixels = np.asarray(image.resize((SIDE, SIDE), Image.Resampling.BOX), dtype=np.float64).ravel()
    pixels -= pixels.mean()
    norm = np.linalg.norm(pixels)
    return (pixels / norm if norm > 1e-6 else np.zeros(DIM)).astype(np.float32)


def thumbnails(paths: Sequence[str | os.PathLike[str]], keys: Sequence[str], cache: FeatureCache,
               progress: bool = False) -> np.ndarray:
    """``(n, DIM)`` thumbnails of ``paths`` (content keys ``keys``): from the cache, the rest computed and stored."""
    key = model_key(DESCRIPTION)
    cache.register_models([(key, DESCRIPTION, DIM)])
    rows = cache.read_locations(cache.locate_verified([key], list(keys), DIM), DIM)[:, 0]
    missing = np.flatnonzero(~rows.any(axis=1)).tolist()  # (a flat image's zeros are recomputed: cheap)
    first_of: dict[str, int] = {}
    for i in missing:  # exact copies (one content key) are decoded once
        first_of.setdefault(keys[i], i)
    todo_all = list(first_of.values())
    bar = _progress(len(todo_all)) if progress and todo_all else None
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # Pillow decodes without the GIL
        for first in range(0, len(todo_all), CHUNK):
            todo = todo_all[first:first + CHUNK]
            rows[todo] = np.stack(list(pool.map(thumbnail, [paths[i] for i in todo])))
            cache.write(key, [keys[i] for i in todo], rows[todo])
            if bar is not None:
                bar.update(len(todo))
    if bar is not None:
        bar.close()
    for i in missing:
        rows[i] = rows[first_of[keys[i]]]
    return rows


def _progress(total: int):  # -> tqdm
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="thumbnails", unit="img")
