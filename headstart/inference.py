"""Probabilities of a saved run (single or ensemble), with optional test-time multi-crop.

Scoring only: per member and per view from the feature cache (read where the rows lie in the
shards), then averaged (views, then members). :mod:`headstart.tta` owns the crop geometry.
Each member's features (and crop features) come from the cache of its own backbone. Runs on disk,
single or ensemble, belong to :mod:`headstart.runs`, whose names are re-exported here for older imports.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._validation import check_tta_average, check_tta_mode
from .backbones import Backbone, create_backbone
from .cache import FeatureCache
from .data import BadFile
from .engines import openvino_available
from .ensemble import align_classes, average_probabilities
from .errors import RunError, UsageError
from .features import FeatureResult, View, extract_views
from .runs import (  # noqa: F401  (re-exported: these lived here before)
    AnyRun,
    EnsembleRun,
    Run,
    combine_runs,
    load_run,
    members_of,
    write_ensemble,
)
from .tta import tta_views


@dataclass
class Probabilities:
    """Averaged class probabilities of the images that could be used."""

    proba: np.ndarray  # (n_ok, n_classes), columns in the run's class order
    ok: np.ndarray  # (n,) bool
    bad_files: list[BadFile] = field(default_factory=list)
    n_computed: int = 0  # backbone forwards (views) this call needed
    seconds: float = 0.0


def load_run_backbone(run: Run, weights: str | None, cache: FeatureCache) -> Backbone:
    """The backbone a run was trained on, with the run's own preprocessing; refuses other weights."""
    spec = run.info["backbone"]
    source = weights if weights is not None else spec["weights"]
    if source.startswith("run:"):  # fine-tuned weights saved inside the run folder
        source = str(run.path / source.removeprefix("run:"))
    if source not in ("default", "random") and not Path(source).exists():
        raise RunError(f"run '{run.path}' was trained with the weights file '{source}', which is missing; "
                       "pass its new location with --weights")
    bb = create_backbone(spec["name"], source, memo=cache)
    bb.data_config = dict(run.info["data_config"])  # the run's preprocessing, whatever timm resolves today
    if bb.weights_digest != spec["weights_digest"]:
        raise RunError(
            f"run '{run.path}' was trained on '{spec['name']}' weights with digest {spec['weights_digest'][:12]}, "
            f"but the weights found now have digest {bb.weights_digest[:12]}; pass the original file with --weights"
        )
    bb.engine = _run_engine(run)
    return bb


def _run_engine(run: Run) -> str:
    """The engine a run's features were computed with (``torch`` for runs older than engines), so they are
    scored alike; PyTorch, with a note, where that engine is not installed."""
    engine = run.info.get("preprocessing", {}).get("engine", "torch")
    if engine == "openvino" and not openvino_available():
        print(f"note: run '{run.path}' was trained with the OpenVINO engine, which is not installed here; "
              "scoring with PyTorch (features agree within cosine 0.999; pip install openvino to match exactly)",
              file=sys.stderr)
        return "torch"
    return engine


def view_probabilities(head: Any, backbone: Backbone, paths: Sequence[Path], views: Sequence[View],
                       cache: FeatureCache, *, precision: str = "auto", average: str = "mean", batch_size: int = 32,
                       num_workers: int | None = None, progress: bool = True, desc: str = "features",
                       ) -> tuple[np.ndarray, FeatureResult]:
    """One head's probabilities for ``paths``, averaged over ``views`` (e.g. :func:`~headstart.tta.tta_views`).

    Missing features are computed into the cache; then the features are read back block by block
    (:func:`predict_proba_cached`), so memory stays bounded whatever the number of crops.

    Returns:
        (probabilities of the images in ``result.ok``, columns in ``head.classes_`` order; the extraction result).
    """
    result = extract_views(backbone, paths, views, cache=cache, precision=precision, batch_size=batch_size,
                           num_workers=num_workers, progress=progress, load=False, desc=desc)
    return predict_proba_cached(head, cache, result, average), result


def run_probabilities(run: AnyRun, paths: Sequence[Path], cache: FeatureCache, *, tta: str = "none",
                      average: str = "mean", members: Sequence[int] | None = None, weights: str | None = None,
                      batch_size: int = 32, num_workers: int | None = None, progress: bool = True) -> Probabilities:
    """Class probabilities for ``paths``: per member, per TTA view, averaged (views, then members).

    Args:
        tta: ``none``, ``flip``, ``5crop``, ``10crop`` or ``multiscale``; all views of a batch of images
            go through the backbone as one batch, and crop features are cached like the rest.
        average: how views are averaged: ``mean`` or ``geomean``.
        members: indices of the ensemble members to use (default all); a single run is member 0.
        weights: a backbone weights file that replaces the run's recorded one (single runs only).
    """
    check_tta_mode(tta)
    start = time.perf_counter()
    all_members = members_of(run)
    chosen = list(range(len(all_members))) if members is None else list(members)
    if weights is not None and len(all_members) > 1:
        raise UsageError("--weights replaces the backbone file of a single run; an ensemble's members keep theirs")
    names = run.class_names
    if not paths:
        return Probabilities(proba=np.zeros((0, len(names))), ok=np.zeros(0, dtype=bool))
    probas, oks, computed = [], None, 0
    bad: dict[str, BadFile] = {}
    for i in chosen:
        member = all_members[i]
        bb = load_run_backbone(member, weights, cache)
        views = tta_views(bb.data_config, tta)
        member_proba, result = view_probabilities(
            member.head, bb, paths, views, cache, precision=member.info["preprocessing"]["precision"],
            average=average, batch_size=batch_size, num_workers=num_workers, progress=progress,
            desc=f"features ({bb.name}, {len(views)} view{'s' if len(views) > 1 else ''})")
        computed += result.n_computed
        full = np.zeros((len(paths), len(names)))
        full[result.ok] = align_classes(member_proba, member.head.classes_, names)
        probas.append(full)
        oks = result.ok if oks is None else oks & result.ok
        for item in result.bad_files:  # a file can fail for one member only (e.g. non-finite features)
            bad.setdefault(item.path, item)
    assert oks is not None
    member_weights = [run.member_weights[i] for i in chosen] if isinstance(run, EnsembleRun) else None
    proba = average_probabilities([p[oks] for p in probas], member_weights)
    return Probabilities(proba=proba, ok=oks, bad_files=list(bad.values()), n_computed=computed,
                         seconds=time.perf_counter() - start)


def average_views(proba: np.ndarray, method: str = "mean") -> np.ndarray:
    """Average the class probabilities of the views of each image.

    Args:
        proba: ``(n, n_views, k)`` probabilities.
        method: ``mean`` (arithmetic mean) or ``geomean`` (geometric mean, renormalised to sum to 1;
            probabilities are clipped at 1e-12 so a zero in one view does not veto a class outright).

    Returns:
        ``(n, k)`` float64 probabilities; each row sums to 1.

    Example:
        >>> average_views(np.array([[[0.8, 0.2], [0.4, 0.6]]]))
        array([[0.6, 0.4]])
    """
    check_tta_average(method, "method")
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 3 or proba.shape[1] < 1 or proba.shape[2] < 1:
        raise UsageError(f"proba must have shape (n_images, n_views, n_classes); got {proba.shape}")
    if not np.isfinite(proba).all():
        raise UsageError("proba has NaN or infinite values; check the features of every view")
    if method == "mean":
        return proba.mean(axis=1)
    log_mean = np.log(np.clip(proba, 1e-12, 1.0)).mean(axis=1)
    log_mean -= log_mean.max(axis=1, keepdims=True)  # exp of values <= 0 cannot overflow
    out = np.exp(log_mean)
    return out / out.sum(axis=1, keepdims=True)


def predict_proba_views(head: Any, features: np.ndarray, method: str = "mean") -> np.ndarray:
    """Probabilities of a fitted head on every view, averaged per image.

    Args:
        head: a fitted head with ``predict_proba`` (e.g. :class:`~headstart.heads.LinearHead`).
        features: ``(n, n_views, dim)`` from :func:`~headstart.features.extract_views`.
        method: as in :func:`average_views`.

    Returns:
        ``(n, k)`` probabilities, columns in ``head.classes_`` order.
    """
    features = np.asarray(features)
    if features.ndim != 3:
        raise UsageError(f"features must have shape (n_images, n_views, dim); got {features.shape}")
    n, v, d = features.shape
    proba = np.asarray(head.predict_proba(features.reshape(n * v, d)))
    return average_views(proba.reshape(n, v, -1), method)


def predict_proba_cached(head: Any, cache: FeatureCache, result: FeatureResult, method: str = "mean",
                         max_rows: int = 1024) -> np.ndarray:
    """:func:`predict_proba_views` over features left in the cache, without gathering them first.

    ``result`` comes from :func:`~headstart.features.extract_views` with ``load=False``. The head runs on
    each shard's rows as they lie in the memory-mapped file (float16, converted block by block), and
    only the probabilities are gathered, so evaluating a large folder with 10 crops never holds its
    crop features in memory (100,000 images x 10 crops x 1280 floats would be 5 GB).

    Returns:
        ``(result.ok.sum(), k)`` probabilities of the images whose views are all cached, in order.

    Example:
        >>> result = extract_views(backbone, paths, views, cache=cache, load=False)   # doctest: +SKIP
        >>> proba = predict_proba_cached(head, cache, result)                          # doctest: +SKIP
    """
    if result.locations is None:
        raise UsageError("result has no cache locations; pass the result of extract_views(..., load=False)")
    located = result.locations if result.ok.all() else result.locations.take(np.flatnonzero(result.ok))
    n_views, n = located.index.shape
    if hasattr(head, "logit_function"):  # headstart heads: logits per shard group, one softmax at the end
        logit_fn = head.logit_function()
        logits = torch.zeros((n * n_views, len(head.classes_)), dtype=torch.float32)
        for positions, rows in cache.iter_rows(located, result.dim, max_rows=max_rows):
            if positions[-1] - positions[0] == len(positions) - 1:  # sorted and unique: a run of positions
                logits[int(positions[0]):int(positions[-1]) + 1] = logit_fn(rows.float())
            else:
                logits[torch.from_numpy(positions)] = logit_fn(rows.float())
        proba = torch.softmax(logits.double(), dim=1).numpy()  # as head.predict_proba does
    else:  # any other head with predict_proba
        proba = np.zeros((n * n_views, len(head.classes_)))
        for positions, rows in cache.iter_rows(located, result.dim, max_rows=max_rows):
            proba[positions] = head.predict_proba(rows.to(torch.float32, copy=True).numpy())  # never the map
    if n == 0:
        return np.zeros((0, len(head.classes_)))
    return average_views(proba.reshape(n, n_views, -1), method)
