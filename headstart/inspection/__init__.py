"""``headstart inspect``: label errors, near-duplicates, leakage and outliers, from the cached features.

:mod:`.findings` computes them (:mod:`.confident` is confident learning, :mod:`.neighbours` the blocked
cosine similarities); :mod:`.output` writes ``findings.json``, ``findings.csv``, ``inspect.html`` and
the ``--fix`` manifest.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ..backbones import DEFAULT_BACKBONE
from ..cache import FeatureCache
from ..selection import DEFAULT_FOLDS
from .findings import NEAR_DUPLICATE, THUMBNAIL_NEAR, inspect_data
from .output import write_findings, write_fix

MEMO = "inspection:"  # + the data folder's absolute path -> where its latest findings are


def inspect(data: str | os.PathLike[str], *, out: str | os.PathLike[str] = "inspect",
            fix: str | os.PathLike[str] | None = None, backbone: str = DEFAULT_BACKBONE, weights: str = "default",
            cache_dir: str | os.PathLike[str] | None = None, folds: int = DEFAULT_FOLDS, seed: int = 0,
            near_duplicate: float = NEAR_DUPLICATE, thumbnail_near: float | None = THUMBNAIL_NEAR,
            batch_size: int = 32, num_workers: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Inspect the labelled images of ``data``; write the findings into ``out`` (and ``fix``'s manifest).

    ``near_duplicate``: the features' cosine similarity from which two images are near-duplicates;
    ``thumbnail_near``: the correlation of their 16 x 16 thumbnails from which they are too (shrunk or
    recompressed copies; ``None``: features only).

    Returns:
        The findings: ``label_issues`` (``path``, ``given``, ``suggested``, ``confidence``),
        ``near_duplicates`` (``a``, ``b``, ``similarity``, ``thumbnail_similarity``, ``across_splits``),
        ``exact_duplicates``, ``outliers`` (``path``, ``score``), ``classes`` (per class ``count``, ``cv_accuracy``,
        ``confused_with``), ``files`` written, ``seconds``.
    """
    _check_similarity(near_duplicate, "near_duplicate (--near-duplicate)", "a cosine similarity in (0, 1]")
    if thumbnail_near is not None:
        _check_similarity(thumbnail_near, "thumbnail_near (--thumbnail-near)", "a correlation in (0, 1] or off")
    start = time.perf_counter()
    findings, seen = inspect_data(data, backbone=backbone, weights=weights, cache_dir=cache_dir, folds=folds,
                                  seed=seed, near_duplicate=near_duplicate, thumbnail_near=thumbnail_near,
                                  batch_size=batch_size, num_workers=num_workers, progress=progress)
    findings["seconds"] = round(time.perf_counter() - start, 3)
    findings["files"] = write_findings(findings, Path(out))
    if fix is not None:
        findings["fix"] = write_fix(findings, seen, Path(fix))
    with FeatureCache(cache_dir) as cache:  # so the evaluation report can link the page
        cache.put_memo(MEMO + str(Path(data).resolve()), {"page": str(Path(findings["files"]["html"]).resolve())})
    return findings


def findings_page(cache: FeatureCache, data: str | os.PathLike[str]) -> str | None:
    """The inspection page last written for ``data``, if it still exists."""
    memo = cache.get_memo(MEMO + str(Path(data).resolve()))
    page = memo.get("page") if memo else None
    return page if page and Path(page).is_file() else None


__all__ = ["findings_page", "inspect"]


def _check_similarity(value: Any, name: str, expected: str) -> None:
    from ..errors import UsageError

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise UsageError(f"{name} must be {expected}; got {value!r}")
