"""The frozen-backbone branch of ``headstart train``: a head on cached (optionally augmented) pooled features.

The head is chosen by cross-validation over a grid (:mod:`headstart.selection`) and refit on every
training image, or is the one fixed head of ``--select none`` (optionally with a CV report).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import distributed
from .backbones import Backbone
from .cache import FeatureCache
from .data import require_every_class
from .ensemble import align_classes
from .errors import UsageError
from .features import FeatureResult, View, extract_features, extract_views
from .heads import make_head
from .metrics import classification_metrics
from .runs import Run, write_run
from .selection import DEFAULT_FOLDS, Grid, Selection
from .sources import Classifier
from .train_common import (
    HeldOut,
    TrainData,
    cached_views,
    content_keys,
    log,
    report_bad_files,
    run_info,
    training_pipeline,
)

if TYPE_CHECKING:
    from .training import TrainConfig


def train_frozen(config: TrainConfig, data: TrainData, bb: Backbone, cache: FeatureCache, out: Path, progress: bool,
                 start: float, auto: dict[str, Any] | None = None) -> tuple[Run | None, HeldOut | None]:
    """Fit the head on the frozen backbone's features of ``data`` and save the run to ``out``.

    Returns:
        The saved run and its validation probabilities (None without a validation set); under torchrun,
        ``(None, None)`` on ranks other than 0, once their share of the features is cached.
    """
    log(progress, "frozen: every layer; training the head on cached pooled features")
    pipeline = training_pipeline(config, bb, data.train, cache, progress)
    views = cached_views(config, bb, pipeline)
    if distributed.active():  # under torchrun: every rank extracts its share; rank 0 alone fits the head
        _extract_shares(config, data, bb, views, cache)
        if not distributed.is_main():
            return None, None
    if pipeline is not None:
        log(progress, f"augmentation '{config.augment}': {config.aug_views} cached views per training image")
    result, val_result, features = _extract(config, data, bb, views, cache, progress)
    bad = report_bad_files(progress, data.loaded.bad_files + result.bad_files
                           + (val_result.bad_files if val_result else []))
    x_train, y_train = result.features[result.ok], data.train.labels[result.ok]  # (n, views, d)
    require_every_class(y_train, data.train.class_names, bad)
    metrics: dict[str, Any] = {"n_train": len(y_train)}
    if auto is not None:
        metrics["freeze_auto"] = auto
    head_start = time.perf_counter()
    ok_paths = [p for p, ok in zip(data.train.paths, result.ok) if ok]
    head, selection = _frozen_head(config, x_train, y_train, data.train.class_names, ok_paths, bb, cache, metrics,
                                   progress)
    metrics["head_seconds"] = round(time.perf_counter() - head_start, 3)
    held_out = _validate(head, data, val_result, metrics, progress)
    metrics["seconds"] = round(time.perf_counter() - start, 3)
    metrics["features"] = features
    head_info = {"selected": selection is not None,
                 "setting": selection.best.name if selection else f"{config.head or 'linear'} (fixed)",
                 "candidate": asdict(selection.best) if selection else None,
                 "feature_source": selection.best.source if selection else "pooled"}
    info = run_info(config, data, bb, metrics, len(bad), precision=result.precision, engine=result.engine,
                    pipeline=pipeline,
                    backbone={"name": bb.name, "weights": config.weights, "weights_source": bb.weights_source,
                              "weights_digest": bb.weights_digest, "num_features": bb.num_features,
                              "freeze": "all"},
                    head=head_info)
    path = write_run(out, info, head, metrics, bad)
    log(progress, f"saved run to {path}")
    return Run.load(path), held_out


def _extract_shares(config: TrainConfig, data: TrainData, bb: Backbone, views: list[View],
                    cache: FeatureCache) -> None:
    """This rank's share (by content hash) of every feature the head needs, into the shared cache; then
    wait for the other ranks."""
    common = {"cache": cache, "precision": config.precision, "batch_size": config.batch_size,
              "num_workers": config.num_workers, "progress": False, "load": False, "full_batches": True}
    extract_views(bb, [data.train.paths[i] for i in distributed.my_share(cache, data.train.paths)], views, **common)
    if data.val is not None:
        mine = distributed.my_share(cache, data.val.paths)
        extract_features(bb, [data.val.paths[i] for i in mine], desc="val features", **common)
    distributed.barrier()


def _extract(config: TrainConfig, data: TrainData, bb: Backbone, views: list[View], cache: FeatureCache,
             progress: bool) -> tuple[FeatureResult, FeatureResult | None, dict[str, Any]]:
    """Features of the training images (every view) and of the validation images (clean), and a summary."""
    common = {"cache": cache, "precision": config.precision, "batch_size": config.batch_size,
              "num_workers": config.num_workers, "progress": progress, "full_batches": True}
    result = extract_views(bb, data.train.paths, views, **common)
    val_result = extract_features(bb, data.val.paths, desc="val features", **common) if data.val else None
    parts = [result] + ([val_result] if val_result else [])
    n_computed, n_cached = sum(r.n_computed for r in parts), sum(r.n_cached for r in parts)
    seconds = sum(r.seconds for r in parts)
    log(progress, f"features: {n_computed} computed, {n_cached} from cache, "
                  f"{sum(len(r.bad_files) for r in parts)} bad, {seconds:.1f}s")
    return result, val_result, {"n_computed": n_computed, "n_cached": n_cached, "seconds": round(seconds, 3),
                                "views_per_train_image": len(views)}


def _validate(head: Any, data: TrainData, val_result: FeatureResult | None, metrics: dict[str, Any],
              progress: bool) -> HeldOut | None:
    """Validation metrics into ``metrics``; the head's probabilities on the validation images."""
    if data.val is None or val_result is None:
        return None
    names = data.train.class_names
    proba = np.zeros((len(data.val), len(names)))
    x_val, y_val = val_result.features[val_result.ok], data.val.labels[val_result.ok]
    if len(y_val):
        proba[val_result.ok] = align_classes(head.predict_proba(x_val), head.classes_, names)
        metrics["val"] = classification_metrics(y_val, proba[val_result.ok], names)
        log(progress, f"validation accuracy {metrics['val']['accuracy']:.4f} on {len(y_val)} images")
    else:
        log(progress, "warning: no usable validation image (all failed to decode); no validation metrics")
    return HeldOut(proba, val_result.ok, data.val.labels)


def _frozen_head(config: TrainConfig, x: np.ndarray, y: np.ndarray, names: list[str], paths: list[Path],
                 bb: Backbone, cache: FeatureCache, metrics: dict[str, Any],
                 progress: bool) -> tuple[Any, Selection | None]:
    """The head on the cached features of ``paths``; adds ``selection`` / ``cv`` to ``metrics``."""
    groups = content_keys(cache, paths)  # duplicates share a fold
    head, selection = _fit_head(config, x, y, names, groups, bb, cache, progress)
    if selection is not None:
        metrics["selection"] = selection.summary()
        metrics["cv"] = {"folds": selection.folds, "accuracy": metrics["selection"]["cv_accuracy"],
                         "std": metrics["selection"]["cv_std"], "log_loss": metrics["selection"]["cv_log_loss"],
                         "fold_accuracy": selection.fold_accuracy, "selected_among": len(selection.leaderboard)}
    elif config.select == "none" and config.cv:
        metrics["cv"] = _cross_validate(config, x, y, groups)
        log(progress, f"{config.cv}-fold CV accuracy {metrics['cv']['accuracy']:.4f} "
                      f"(+/- {metrics['cv']['std']:.4f})")
    return head, selection


def _fit_head(config: TrainConfig, x: np.ndarray, y: np.ndarray, names: list[str], groups: list[str],
              bb: Backbone, cache: FeatureCache, progress: bool) -> tuple[Any, Selection | None]:
    """The final head on all training images: chosen by CV over the grid, or the one fixed head."""
    labels = np.asarray(names)[y]
    if config.select == "none":
        return make_head(config.head or "linear", **config.head_params).fit_views(x, labels), None
    from .selection import fit_candidate, format_leaderboard, select_head

    keys = np.asarray(groups)
    if min(len(set(keys[y == c])) for c in np.unique(y)) < 2:
        log(progress, f"note: a class has a single distinct usable image, too few to cross-validate; training "
                      f"one {config.head or 'linear'} head without selection")
        params = {"class_weight": config.head_params["class_weight"]} if "class_weight" in config.head_params else {}
        return make_head(config.head or "linear", **params).fit_views(x, labels), None
    grid, classifier = _selection_grid(config, bb, cache, progress)
    selection = select_head(x, y, grid=grid, folds=config.cv or DEFAULT_FOLDS, groups=groups, seed=config.seed,
                            classifier=classifier, progress=progress)
    for note in selection.notes:
        log(progress, f"note: {note}")
    log(progress, f"selection: {len(selection.leaderboard)} head settings, {selection.folds}-fold CV "
                  f"({selection.seconds:.1f}s); best first:\n" + format_leaderboard(selection.leaderboard, 5))
    log(progress, f"chosen: {selection.best.name} (temperature {selection.temperature:.2f}); refitting it on all "
                  f"{len(y)} training images")
    head = fit_candidate(selection.best, x, labels, classifier=classifier, seed=config.seed,
                         temperature=selection.temperature)
    return head, selection


def _selection_grid(config: TrainConfig, bb: Backbone, cache: FeatureCache,
                    progress: bool) -> tuple[Grid, Classifier | None]:
    """The grid of ``config`` (``--grid-*``, narrowed by ``--head`` and ``--class-weight``) and the classifier."""
    from .selection import grid_with_classifier

    options = dict(config.grid)
    if config.head is not None:
        options.setdefault("head", [config.head])
        if config.head == "mlp":
            options.setdefault("mlp_min_images", 0)  # asked for by name: tried whatever the data size
    if config.head_params.get("class_weight") == "balanced":
        options.setdefault("class_weight", ["balanced"])
    grid, classifier, note = grid_with_classifier(options, bb, config.weights, memo=cache)
    if note:
        log(progress, f"note: {note}")
    return grid, classifier


def _cross_validate(config: TrainConfig, x: np.ndarray, y: np.ndarray, groups: list[str],
                    bar: Any = None) -> dict[str, Any]:
    """k-fold CV accuracy of the one fixed head of ``--select none --cv K`` (folds as the selection's)."""
    from .folds import fold_count, make_folds

    folds, _ = fold_count(y, config.cv or 0, groups)
    if folds != config.cv:
        raise UsageError(f"--cv {config.cv} needs at least {config.cv} distinct usable images in every class "
                         f"(the smallest class has {folds}); lower --cv")
    scores = []
    for train_idx, test_idx in make_folds(y, groups, folds, config.seed):  # x: (n, views, d); view 0 is clean
        head = make_head(config.head or "linear", **config.head_params).fit_views(x[train_idx], y[train_idx])
        scores.append(head.score(x[test_idx, 0], y[test_idx]))
        if bar is not None:
            bar.update(1)
    return {"folds": folds, "accuracy": float(np.mean(scores)), "std": float(np.std(scores)),
            "fold_accuracy": [float(s) for s in scores]}
