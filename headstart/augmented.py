"""Augmentation glue: PCA colour statistics of a data set, augmented views for the feature cache, previews.

The transforms themselves live in :mod:`headstart.transforms`; this module connects them to data
folders, the feature cache and runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ._constants import DEFAULT_AUG_VIEWS  # noqa: F401  (also importable from here)
from ._io import atomic_write_bytes
from ._validation import check_positive_int, check_preset, check_seed
from .cache import FeatureCache
from .data import ImageDecodeError, decode_image, load_images
from .errors import DataError, UsageError

PCA_PIXELS_PER_IMAGE = 4096


def _decoded(paths: Sequence[Path], progress: bool, desc: str) -> Iterator[Any]:
    for path in tqdm(paths, desc=desc, unit="img", file=sys.stderr, disable=not progress, leave=False):
        try:
            yield decode_image(path)
        except ImageDecodeError:
            continue  # reported by feature extraction; statistics just skip it


def pca_stats_for(paths: Sequence[Path], cache: FeatureCache, *, seed: int = 0, progress: bool = True) -> Any:
    """AlexNet PCA colour statistics of these images, fitted once and remembered in the cache.

    The memo key is the sorted content hashes of the images plus the sampling settings, so the same
    training set (in any order, under any names) reuses the fitted statistics.
    """
    from .transforms import PCAStats, fit_pca_stats

    keys, _ = cache.image_keys(paths)
    known = sorted(k for k in keys if k is not None)
    if not known:
        raise DataError("no readable image to fit PCA colour statistics on: none of the files could be read (see "
                        "'headstart features DATA' for each file and why)")
    memo_key = "pca:" + hashlib.sha256(
        json.dumps([known, PCA_PIXELS_PER_IMAGE, seed]).encode()).hexdigest()
    cached = cache.get_memo(memo_key)
    if cached is not None:
        return PCAStats.from_dict(cached)
    stats = fit_pca_stats(_decoded(paths, progress, "pca stats"), max_pixels_per_image=PCA_PIXELS_PER_IMAGE,
                          seed=seed)
    cache.put_memo(memo_key, stats.to_dict())
    return stats


def pipeline_uses_pca(pipeline: Any) -> bool:
    """True when the pipeline holds a PCA colour step (which wants the data set's own statistics)."""
    from .transforms import PCAColor

    return any(isinstance(step, PCAColor) for step in getattr(pipeline, "steps", []))


def build_training_pipeline(preset: str, size: Sequence[int], overrides: dict[str, Any] | None,
                            train_paths: Sequence[Path], cache: FeatureCache, *, seed: int = 0,
                            progress: bool = True) -> Any:
    """The augmentation pipeline for a run, with PCA colour statistics fitted on its training images."""
    from .transforms import build_pipeline

    check_preset(preset)
    pipeline = build_pipeline(preset, size=tuple(size), overrides=overrides)
    if pipeline_uses_pca(pipeline):
        stats = pca_stats_for(train_paths, cache, seed=seed, progress=progress)
        pipeline = build_pipeline(preset, size=tuple(size), overrides=overrides, pca=stats)
    return pipeline


def check_overrides(preset: str, overrides: dict[str, Any] | None, size: Sequence[int] = (224, 224)) -> None:
    """Refuse bad ``--aug-param`` overrides of ``preset`` before any work (a pipeline is built at ``size``)."""
    if preset != "none" and overrides:
        from .transforms import build_pipeline

        build_pipeline(preset, size=tuple(size), overrides=overrides)


def pca_stats(data: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None, seed: int = 0,
              progress: bool = True) -> dict[str, Any]:
    """PCA colour statistics of every image in ``data`` (``headstart pca-stats``)."""
    check_seed(seed, "seed (--seed)")
    loaded = load_images(data, val_split=0, min_classes=1)
    with FeatureCache(cache_dir) as cache:
        stats = pca_stats_for(loaded.train.paths, cache, seed=seed, progress=progress)
    out = stats.to_dict()
    out["n_images"] = len(loaded.train)
    return out


def preview(data: str | os.PathLike[str], out: str | os.PathLike[str], *, preset: str = "standard",
            n: int = 16, n_views: int = 7, size: int = 224, seed: int = 0,
            overrides: dict[str, Any] | None = None, cache_dir: str | os.PathLike[str] | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Write a PNG grid of ``n`` images from ``data``: per image, the original and ``n_views`` augmented views."""
    from .transforms import preview_grid

    for value, flag in ((n, "n (--n)"), (n_views, "views (--views)"), (size, "size (--size)")):
        check_positive_int(value, flag)
    check_seed(seed, "seed (--seed)")
    if Path(out).suffix.lower() != ".png":
        raise UsageError(f"--out must name a .png file, e.g. preview.png; got '{out}'")
    check_preset(preset, "preset (--preset)")
    check_overrides(preset, overrides, (size, size))
    loaded = load_images(data, val_split=0, min_classes=1)
    images = loaded.train
    rng = np.random.default_rng(seed)
    picks: list[int] = []
    by_class = [list(rng.permutation(np.flatnonzero(images.labels == c))) for c in range(len(images.class_names))]
    while len(picks) < min(n, len(images)):  # round-robin over classes so every class shows up
        for members in by_class:
            if members and len(picks) < n:
                picks.append(int(members.pop()))
    with FeatureCache(cache_dir) as cache:
        pipeline = build_training_pipeline(preset, (size, size), overrides, images.paths, cache, seed=seed,
                                           progress=progress)
    decoded, used = [], []
    for i in picks:
        try:
            decoded.append(decode_image(images.paths[i]))
            used.append(str(images.paths[i]))
        except ImageDecodeError:
            continue
    if not decoded:
        raise DataError(f"none of the {len(picks)} images chosen in '{data}' could be decoded; check them with "
                        "'headstart features' (it lists each bad file and why)")
    grid = preview_grid(decoded, pipeline, n_views=n_views, seed=seed)
    out = Path(out)
    import io

    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    atomic_write_bytes(out, buffer.getvalue())
    return {"out": str(out), "images": used, "views": n_views, "preset": preset, "size": list(grid.size),
            "pipeline": pipeline.get_config()}
