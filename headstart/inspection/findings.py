"""``headstart inspect``: look at a labelled data set through its cached features.

One pass over the data: the clean view's pooled features (from the cache), out-of-fold probabilities
of the head the selection would choose (every image ranked, grouped by content), then

* likely label errors: confident learning on those probabilities (:mod:`.confident`);
* exact copies (same bytes) and near-duplicates: pairs whose features' cosine similarity reaches
  ``NEAR_DUPLICATE``, or whose tiny thumbnails correlate at ``THUMBNAIL_NEAR`` or more (shrunk or
  recompressed copies, :mod:`.thumbnails`) with features at least ``THUMBNAIL_FEATURE_FLOOR`` alike;
  each marked when it spans the given train/val splits (leakage);
* outliers: images far from their nearest neighbours in feature space (:mod:`.neighbours`);
* per class: count, out-of-fold accuracy, the classes it is confused with.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..backbones import DEFAULT_BACKBONE, create_backbone
from ..cache import FeatureCache
from ..data import load_images
from ..errors import DataError
from ..features import extract_features
from ..selection import DEFAULT_FOLDS, Grid, Selection, fit_candidate, grid_with_classifier, select_head
from ..sources import Classifier
from .confident import find_label_issues
from .neighbours import neighbours
from .thumbnails import thumbnails

NEAR_DUPLICATE = 0.93  # cosine similarity of pooled features; see benchmarks/inspection.py
THUMBNAIL_NEAR = 0.985  # correlation of 16 x 16 thumbnails (copies >= 0.993, distinct photos <= 0.968) ...
THUMBNAIL_FEATURE_FLOOR = 0.5  # ... of images whose features agree this much too (such copies: >= 0.65)
OUTLIER_Z = 3.5  # robust z-score of the k-NN distance from which an image is flagged as an outlier
MAX_OUTLIERS = 50
MIN_LISTED = 3  # the farthest images listed even when none is flagged (small or mixed sets: a wide spread)
KNN = 5


@dataclass
class Inspected:
    """The images inspected: paths, labels, split, content keys, features and out-of-fold probabilities."""

    paths: list[Path]
    labels: np.ndarray
    split: list[str]  # "train" or "val" (a given val/ folder)
    class_names: list[str]
    keys: list[str]
    features: np.ndarray  # (n, d) pooled, clean view
    oof: np.ndarray  # (n, k)
    setting: str
    bad_files: list[dict[str, str]]
    thumbnails: np.ndarray | None = None  # (n, thumbnails.DIM), the second near-duplicate signal


def inspect_data(data: str | os.PathLike[str], *, backbone: str = DEFAULT_BACKBONE, weights: str = "default",
                 cache_dir: str | os.PathLike[str] | None = None, folds: int = DEFAULT_FOLDS, seed: int = 0,
                 near_duplicate: float = NEAR_DUPLICATE, thumbnail_near: float | None = THUMBNAIL_NEAR,
                 batch_size: int = 32, num_workers: int | None = None,
                 progress: bool = True) -> tuple[dict[str, Any], Inspected]:
    """The findings of one data set (see the module docstring) and what they were computed from;
    ``thumbnail_near=None`` looks for near-duplicates by the features alone."""
    seen = _load(data, backbone, weights, cache_dir, folds, seed, batch_size, num_workers, progress,
                 thumbnails_too=thumbnail_near is not None)
    findings = {"data": str(data), "n_images": len(seen.paths), "setting": seen.setting,
                "label_issues": label_issues(seen), **similar(seen, near_duplicate, thumbnail_near),
                "classes": classes(seen), "bad_files": seen.bad_files}
    return findings, seen


def _load(data: str | os.PathLike[str], backbone: str, weights: str, cache_dir: Any, folds: int, seed: int,
          batch_size: int, num_workers: int | None, progress: bool, thumbnails_too: bool = True) -> Inspected:
    loaded = load_images(data, val_split=0, min_classes=2)
    parts = [(loaded.train, "train")] + ([(loaded.val, "val")] if loaded.val is not None else [])
    paths = [p for part, _ in parts for p in part.paths]
    names = loaded.train.class_names
    labels = np.concatenate([_relabel(part.labels, part.class_names, names) for part, _ in parts])
    split = [tag for part, tag in parts for _ in part.paths]
    with FeatureCache(cache_dir) as cache:
        bb = create_backbone(backbone, weights, memo=cache)
        result = extract_features(bb, paths, cache=cache, batch_size=batch_size, num_workers=num_workers,
                                  progress=progress, desc="features")
        found = cache.image_keys(paths)[0]
        keys = [k or f"unreadable:{i}" for i, k in enumerate(found)]
        grid, classifier, _ = grid_with_classifier({}, bb, weights, memo=cache)
        ok = np.flatnonzero(result.ok)
        small = thumbnails([paths[i] for i in ok], [found[i] for i in ok], cache, progress) if thumbnails_too else None
    bad = [b.to_dict() for b in loaded.bad_files + result.bad_files]
    if len(np.unique(labels[ok])) < 2:
        raise DataError(f"'{data}' has fewer than 2 classes with usable images; inspect needs labelled classes")
    x, y, groups = result.features[ok], labels[ok], [keys[i] for i in ok]
    oof, setting = out_of_fold(x, y, groups, grid, folds, seed, classifier, progress)
    return Inspected([paths[i] for i in ok], y, [split[i] for i in ok], names, groups, x, oof, setting, bad, small)


def out_of_fold(x: np.ndarray, y: np.ndarray, groups: Sequence[str], grid: Grid, folds: int, seed: int,
                classifier: Classifier | None, progress: bool = False) -> tuple[np.ndarray, str]:
    """(out-of-fold probabilities of every image, the setting): the selection's winner, cross-fitted on
    every image when it was ranked on a sample."""
    selection = select_head(x, y, grid=grid, folds=folds, groups=groups, seed=seed, classifier=classifier,
                            progress=progress)
    oof = selection.oof_proba if selection.sample is None else cross_fit(selection, x, y, groups, seed, classifier)
    return oof, selection.best.name


def cross_fit(selection: Selection, x: np.ndarray, y: np.ndarray, groups: Sequence[str], seed: int,
              classifier: Classifier | None) -> np.ndarray:
    """Out-of-fold probabilities of the selection's winner on every image, when it was ranked on a sample:
    the winner fitted ``selection.folds`` times, each time without one fold (identical files together)."""
    k = int(y.max()) + 1
    oof = np.zeros((len(y), k))
    fold_of = group_folds(y, groups, selection.folds, seed)
    for f in range(selection.folds):
        train, test = np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)
        head = fit_candidate(selection.best, x[train], y[train], classifier=classifier, seed=seed,
                             temperature=selection.temperature)
        oof[np.ix_(test, head.classes_)] = head.predict_proba(x[test])
    return oof


def group_folds(y: np.ndarray, groups: Sequence[str], folds: int, seed: int) -> np.ndarray:
    """A fold per image: each class's groups (identical files) shuffled and dealt round-robin, in O(n)
    (scikit-learn's StratifiedGroupKFold takes about a minute on 50,000 groups)."""
    first: dict[str, int] = {}
    for i, g in enumerate(groups):
        first.setdefault(g, i)
    names = np.asarray(list(first))
    labels = y[np.asarray(list(first.values()))]
    rng = np.random.default_rng(seed)
    fold_of_group: dict[str, int] = {}
    for c in np.unique(labels):
        members = rng.permutation(names[labels == c])
        fold_of_group.update({g: i % folds for i, g in enumerate(members.tolist())})
    return np.asarray([fold_of_group[g] for g in groups])


def _relabel(labels: np.ndarray, own: Sequence[str], names: Sequence[str]) -> np.ndarray:
    index = {name: i for i, name in enumerate(names)}
    return np.asarray([index[own[j]] for j in labels], dtype=np.int64)


def label_issues(seen: Inspected) -> list[dict[str, Any]]:
    """Likely label errors, lowest self-confidence first."""
    return [{"path": str(seen.paths[t.index]), "given": seen.class_names[t.given],
             "suggested": seen.class_names[t.suggested], "confidence": round(t.confidence, 4),
             "self_confidence": round(t.self_confidence, 4), "split": seen.split[t.index]}
            for t in find_label_issues(seen.oof, seen.labels)]


def similar(seen: Inspected, threshold: float, thumbnail_near: float | None = THUMBNAIL_NEAR) -> dict[str, Any]:
    """Exact copies, near-duplicates and outliers.

    A near-duplicate pair's ``thumbnail_similarity`` is set when its thumbnails correlate at
    ``thumbnail_near`` or more (None otherwise, or without thumbnails); such pairs come first (the
    surest copies), then the others by the features' cosine ``similarity``.
    """
    found = neighbours(seen.features, threshold, k=KNN, same=seen.keys)
    pairs = {(i, j): (s, None) for i, j, s in found.pairs}
    if seen.thumbnails is not None and thumbnail_near is not None:
        norms = np.maximum(np.linalg.norm(seen.features, axis=1), 1e-12)  # (cosines of these pairs only)
        for i, j, t in neighbours(seen.thumbnails, thumbnail_near, k=0, same=seen.keys).pairs:
            cosine = float(seen.features[i] @ seen.features[j] / (norms[i] * norms[j]))
            s = pairs.get((i, j), (cosine, None))[0]
            if s >= THUMBNAIL_FEATURE_FLOOR:
                pairs[i, j] = (s, t)
    near = [{"a": str(seen.paths[i]), "b": str(seen.paths[j]), "similarity": round(s, 4),
             "thumbnail_similarity": None if t is None else round(t, 4),
             "across_splits": seen.split[i] != seen.split[j]}
            for (i, j), (s, t) in sorted(pairs.items(), key=lambda item: (-(item[1][1] or 0.0), -item[1][0]))]
    return {"exact_duplicates": _exact(seen), "near_duplicates": near, "near_duplicate_threshold": threshold,
            "thumbnail_threshold": thumbnail_near, "outliers": _outliers(seen, found.knn_distance)}


def _exact(seen: Inspected) -> list[dict[str, Any]]:
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(seen.keys):
        groups.setdefault(key, []).append(i)
    return [{"paths": [str(seen.paths[i]) for i in rows], "labels": sorted({seen.class_names[seen.labels[i]]
                                                                          for i in rows}),
             "across_splits": len({seen.split[i] for i in rows}) > 1} for rows in groups.values() if len(rows) > 1]


def _outliers(seen: Inspected, distance: np.ndarray) -> list[dict[str, Any]]:
    """The images farthest from their nearest neighbours, farthest first: those ``flagged`` (robust z-score of
    the distance >= ``OUTLIER_Z``), and at least the ``MIN_LISTED`` farthest of a set of 10 or more."""
    if len(distance) < 3:
        return []
    median = float(np.median(distance))
    mad = float(np.median(np.abs(distance - median))) * 1.4826 or 1e-12
    z = (distance - median) / mad
    listed = max(int((z >= OUTLIER_Z).sum()), MIN_LISTED if len(distance) >= 10 else 0)
    order = np.argsort(-distance, kind="stable")[:min(listed, MAX_OUTLIERS)].tolist()
    return [{"path": str(seen.paths[i]), "label": seen.class_names[seen.labels[i]],
             "score": round(float(distance[i]), 4), "z": round(float(z[i]), 2), "flagged": bool(z[i] >= OUTLIER_Z)}
            for i in order]


def classes(seen: Inspected) -> dict[str, Any]:
    """Per class: images, out-of-fold accuracy, and the classes its images are most often taken for."""
    k = len(seen.class_names)
    predicted = seen.oof.argmax(axis=1)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (seen.labels, predicted), 1)
    out = {}
    for i, name in enumerate(seen.class_names):
        total = int(confusion[i].sum())
        confused = [(seen.class_names[j], int(confusion[i, j])) for j in np.argsort(-confusion[i]).tolist()
                    if j != i and confusion[i, j]][:3]
        out[name] = {"count": total, "cv_accuracy": round(float(confusion[i, i]) / total, 4) if total else None,
                     "confused_with": [{"class": c, "count": n} for c, n in confused]}
    return out
