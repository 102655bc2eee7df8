"""Training orchestration: ``headstart train`` with a frozen backbone, fine-tuning or an ensemble.

:func:`train` loads and splits the data, creates the backbone, then either fits a head on cached
(optionally augmented) pooled features, fine-tunes the top stages (:mod:`headstart.finetune`), or
trains ensemble members and assembles them into one run (:mod:`headstart.inference`).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import save_file

from . import __version__
from .augmented import DEFAULT_AUG_VIEWS, build_training_pipeline
from .backbones import DEFAULT_BACKBONE, Backbone, check_backbone_name, create_backbone
from .cache import FeatureCache, atomic_write_bytes
from .data import ImageSet, LoadedData, load_images, stratified_split
from .errors import DataError, UsageError
from .features import augmented_views, clean_view, extract_features, extract_views
from .finetune import parse_freeze
from .heads import make_head
from .inference import (
    EnsembleRun,
    _align,
    load_run,
    run_probabilities,
    write_ensemble,
)
from .metrics import classification_metrics
from .preprocess import preprocessing_signature
from .runs import Run, write_run
from .selection import DEFAULT_FOLDS, Grid, Selection
from .sources import Classifier
from .stages import stage_plan


@dataclass
class TrainConfig:
    """Everything that configures ``headstart train``; the CLI fills the same fields."""

    backbone: str = DEFAULT_BACKBONE  # timm model name
    weights: str = "default"  # "default" (packaged or timm download), "random", or a file path
    select: str = "cv"  # "cv": choose the head by k-fold CV over a grid, refit on all; "none": one fixed head
    head: str | None = None  # "linear" or "mlp"; None = both (select cv) or linear (select none)
    head_params: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the head (select none)
    grid: dict[str, Any] = field(default_factory=dict)  # narrow the selection grid, e.g. {"C": [0.1, 1]}
    val_split: float = 0.0  # fraction held out per class when the data has no val/ folder (scored, never selects)
    cv: int | None = None  # folds: of the selection (None = 5), or with select none a CV report (None = off)
    seed: int = 0  # seed of the split, the folds and the head
    precision: str = "auto"  # backbone arithmetic: auto, fp32, bf16, fp16
    batch_size: int = 32  # images per backbone forward
    num_workers: int | None = None  # decoding processes; None = one per spare core
    cache_dir: str | None = None  # feature cache; None = $HEADSTART_CACHE_DIR or the user cache
    augment: str = "none"  # augmentation preset for the augmented feature cache: none, light, standard, heavy
    aug_views: int | None = None  # augmented views cached per training image; None = 8 when augment is set
    aug_params: dict[str, Any] = field(default_factory=dict)  # overrides, e.g. {"affine": {"degrees": 20}}
    freeze: str = "all"  # "all" (head only), "none", "auto", "probe", or N = freeze the first N stages
    budget: float | None = None  # minutes for --freeze auto's comparison and retraining (None: 10)
    finetune: dict[str, Any] = field(default_factory=dict)  # FinetuneConfig fields (epochs, lr, ...)
    resume: bool = False  # continue an interrupted fine-tuning run from its last checkpoint
    ensemble: int = 1  # members per backbone (they differ in bootstrap sample and seed); backbone may be "a,b,c"
    bootstrap: int | None = None  # train on a stratified bootstrap sample of the training split, with this seed


def _log(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _open_cache(cache_dir: str | os.PathLike[str] | None) -> FeatureCache:
    return FeatureCache(cache_dir)


def _cross_validate(config: TrainConfig, x: np.ndarray, y: np.ndarray, groups: list[str],
                    bar: Any = None) -> dict[str, Any]:
    """k-fold CV accuracy of the one fixed head of ``--select none --cv K`` (folds as the selection's)."""
    from .selection import fold_count, make_folds

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


def train(
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: TrainConfig | None = None,
    *,
    progress: bool = True,
    **overrides: Any,
) -> Run | EnsembleRun:
    """Train a classifier head on a frozen pre-trained backbone and save the run to ``out``.

    Args:
        data: class-folder tree, ``train/``+``val/`` tree, or CSV manifest (see :func:`load_images`).
        out: run folder to write (replaced if it holds a previous run).
        config: a :class:`TrainConfig`; keyword ``overrides`` replace its fields.
        progress: progress bars and messages on stderr.

    Returns:
        The saved :class:`Run`; ``run.metrics`` holds validation (and CV) metrics.
    """
    config = config or TrainConfig()
    unknown = set(overrides) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        known = sorted(TrainConfig.__dataclass_fields__)
        raise UsageError(f"unknown train option(s) {sorted(unknown)}; known: {known}")
    config = TrainConfig(**{**asdict(config), **overrides})
    config.weights = _absolute_weights(config.weights)  # a run must find its weights from any folder
    config.cache_dir = None if config.cache_dir is None else str(config.cache_dir)
    _validate_train_config(config, Path(out))  # fail on bad settings before any heavy work
    if "," in config.backbone or config.ensemble > 1:
        return _train_ensemble(config, data, Path(out), progress)
    start = time.perf_counter()
    loaded: LoadedData = load_images(data, val_split=0, seed=config.seed)
    for note in loaded.notes:
        _log(progress, f"note: {note}")
    with _open_cache(config.cache_dir) as cache:
        train_set, val_set, val_from = _split(loaded, config, cache, progress)
        if config.bootstrap is not None:
            from .ensemble import bootstrap_indices

            train_set = train_set.subset(bootstrap_indices(train_set.labels, config.bootstrap))
        bb = create_backbone(config.backbone, config.weights, memo=cache)
        _log(progress, f"backbone {bb.name} ({bb.weights_source}), features {bb.num_features}-d, "
                       f"input {bb.data_config['input_size'][1]}px")
        freeze = parse_freeze(config.freeze)
        auto = None
        if freeze == "auto":
            freeze, config, auto = _auto_freeze(config, bb, train_set, val_set, cache, Path(out), progress)
        if freeze == "probe":
            from .probe import format_probe_table, probe

            freeze, reason, probe_rows = probe(bb, train_set, val_set, cache, precision=config.precision,
                                               num_workers=config.num_workers, progress=progress)
            _log(progress, "probe: a linear head on each stage's pooled output\n" + format_probe_table(probe_rows))
            _log(progress, f"--freeze probe: {reason}")
        if freeze != "all":
            return _train_finetuned(config, data, loaded, train_set, val_set, val_from, bb, cache,
                                    0 if freeze == "none" else int(freeze), Path(out), progress, start, auto)
        _log(progress, "frozen: every layer; training the head on cached pooled features")
        views = [clean_view(bb.data_config)]
        pipeline = None
        if config.augment != "none":
            pipeline = build_training_pipeline(config.augment, bb.data_config["input_size"][1:], config.aug_params,
                                               train_set.paths, cache, seed=config.seed, progress=progress)
            views += augmented_views(pipeline, bb.data_config, config.aug_views, seed=config.seed)
            _log(progress, f"augmentation '{config.augment}': {config.aug_views} cached views per training image")
        common = {"cache": cache, "precision": config.precision, "batch_size": config.batch_size,
                  "num_workers": config.num_workers, "progress": progress}
        result = extract_views(bb, train_set.paths, views, **common)
        val_result = extract_features(bb, val_set.paths, desc="val features", **common) if val_set else None
    feature_bad = result.bad_files + (val_result.bad_files if val_result else [])
    bad = [b.to_dict() for b in loaded.bad_files + feature_bad]
    n_computed = result.n_computed + (val_result.n_computed if val_result else 0)
    n_cached = result.n_cached + (val_result.n_cached if val_result else 0)
    feature_seconds = result.seconds + (val_result.seconds if val_result else 0.0)
    _log(progress, f"features: {n_computed} computed, {n_cached} from cache, {len(feature_bad)} bad, "
                   f"{feature_seconds:.1f}s")
    for item in bad:
        _log(progress, f"skipped {item['path']}: {item['reason']}")
    x_train, y_train = result.features[result.ok], train_set.labels[result.ok]  # (n, views, d)
    names = train_set.class_names
    present = np.bincount(y_train, minlength=len(names))
    if (present == 0).any():
        lost = [names[i] for i in np.flatnonzero(present == 0)]
        examples = "; ".join(f"{b['path']}: {b['reason']}" for b in bad[:3])
        raise DataError(f"class(es) {lost} have no usable training image after skipping {len(bad)} "
                        f"bad file(s), e.g. {examples}")
    metrics: dict[str, Any] = {"n_train": len(y_train)}
    if auto is not None:
        metrics["freeze_auto"] = auto
    head_start = time.perf_counter()
    ok_paths = [p for p, ok in zip(train_set.paths, result.ok) if ok]
    head, selection = _frozen_head(config, x_train, y_train, names, ok_paths, bb, metrics, progress)
    metrics["head_seconds"] = round(time.perf_counter() - head_start, 3)
    if val_set is not None and val_result is not None:
        x_val, y_val = val_result.features[val_result.ok], val_set.labels[val_result.ok]
        if len(y_val):
            proba = _align(head.predict_proba(x_val), head.classes_, names)
            metrics["val"] = classification_metrics(y_val, proba, names)
            _log(progress, f"validation accuracy {metrics['val']['accuracy']:.4f} on {len(y_val)} images")
        else:
            _log(progress, "warning: no usable validation image (all failed to decode); no validation metrics")
    metrics["seconds"] = round(time.perf_counter() - start, 3)
    metrics["features"] = {"n_computed": n_computed, "n_cached": n_cached, "seconds": round(feature_seconds, 3),
                           "views_per_train_image": len(views)}
    info = {
        "headstart_version": __version__,
        "class_names": names,
        "backbone": {"name": bb.name, "weights": config.weights, "weights_source": bb.weights_source,
                     "weights_digest": bb.weights_digest, "num_features": bb.num_features, "freeze": "all"},
        "preprocessing": preprocessing_signature(bb.data_config, result.precision),
        "data_config": bb.data_config,
        "config": asdict(config),
        "augmentation": None if pipeline is None else {"pipeline": pipeline.config(), "views": config.aug_views,
                                                       "seed": config.seed},
        "head": {"selected": selection is not None,
                 "setting": selection.best.name if selection else f"{config.head or 'linear'} (fixed)",
                 "candidate": asdict(selection.best) if selection else None,
                 "feature_source": selection.best.source if selection else "pooled"},
        "data": {"source": str(data), "layout": loaded.layout, "val_from": val_from,
                 "n_train": len(y_train), "n_val": int(metrics.get("val", {}).get("n_images", 0)),
                 "class_counts": train_set.class_counts(), "n_bad_files": len(bad)},
    }
    path = write_run(Path(out), info, head, metrics, bad)
    _log(progress, f"saved run to {path}")
    return Run.load(path)


def _frozen_head(config: TrainConfig, x: np.ndarray, y: np.ndarray, names: list[str], paths: list[Path],
                 bb: Backbone, metrics: dict[str, Any], progress: bool) -> tuple[Any, Selection | None]:
    """The head on the cached features of ``paths``; adds ``selection`` / ``cv`` to ``metrics``."""
    with _open_cache(config.cache_dir) as cache:
        keys, _ = cache.image_keys(paths)
        groups = [k if k is not None else f"unreadable:{i}" for i, k in enumerate(keys)]  # duplicates share a fold
        head, selection = _fit_head(config, x, y, names, groups, bb, cache, progress)
    if selection is not None:
        metrics["selection"] = selection.summary()
        metrics["cv"] = {"folds": selection.folds, "accuracy": metrics["selection"]["cv_accuracy"],
                         "std": metrics["selection"]["cv_std"], "log_loss": metrics["selection"]["cv_log_loss"],
                         "fold_accuracy": selection.fold_accuracy, "selected_among": len(selection.leaderboard)}
    elif config.select == "none" and config.cv:
        metrics["cv"] = _cross_validate(config, x, y, groups)
        _log(progress, f"{config.cv}-fold CV accuracy {metrics['cv']['accuracy']:.4f} "
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
        _log(progress, f"note: a class has a single distinct usable image, too few to cross-validate; training "
                       f"one {config.head or 'linear'} head without selection")
        params = {"class_weight": config.head_params["class_weight"]} if "class_weight" in config.head_params else {}
        return make_head(config.head or "linear", **params).fit_views(x, labels), None
    grid, classifier = _selection_grid(config, bb, cache, progress)
    selection = select_head(x, y, grid=grid, folds=config.cv or DEFAULT_FOLDS, groups=groups, seed=config.seed,
                            classifier=classifier, progress=progress)
    for note in selection.notes:
        _log(progress, f"note: {note}")
    _log(progress, f"selection: {len(selection.leaderboard)} head settings, {selection.folds}-fold CV "
                   f"({selection.seconds:.1f}s); best first:\n" + format_leaderboard(selection.leaderboard, 5))
    _log(progress, f"chosen: {selection.best.name} (temperature {selection.temperature:.2f}); refitting it on all "
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
        _log(progress, f"note: {note}")
    return grid, classifier


def _train_ensemble(config: TrainConfig, data: Any, out: Path, progress: bool) -> EnsembleRun:
    """One member per backbone and per ``ensemble`` index, each a complete run, assembled into one folder.

    Members of one backbone share its cached features and differ in their bootstrap sample of the
    training split (and seed): heads on the same features with only another seed are nearly identical.
    The validation split is the same for every member.
    """
    backbones = [b.strip() for b in config.backbone.split(",") if b.strip()]
    plan = [(b, m) for b in backbones for m in range(config.ensemble)]
    scratch = out.parent / f".{out.name}.members"
    if not config.resume:
        shutil.rmtree(scratch, ignore_errors=True)
    member_dirs = []
    for i, (name, m) in enumerate(plan):
        if config.resume and (scratch / str(i) / "run.json").is_file():
            _log(progress, f"ensemble member {i + 1}/{len(plan)}: already trained, kept")
            member_dirs.append(scratch / str(i))
            continue
        _log(progress, f"ensemble member {i + 1}/{len(plan)}: {name}"
                       + (f", bootstrap sample {m + 1}" if config.ensemble > 1 else ""))
        params = dict(config.head_params)
        if config.head == "mlp" and config.select == "none":
            params["seed"] = config.seed * 1000 + m
        member_cfg = replace(config, backbone=name, ensemble=1, head_params=params,
                             cv=config.cv if config.select == "cv" else 0,
                             bootstrap=config.seed * 1000 + m if config.ensemble > 1 else None)
        train(data, scratch / str(i), member_cfg, progress=progress)
        member_dirs.append(scratch / str(i))
    extra = {"config": asdict(config), "headstart_version": __version__}
    run = write_ensemble(out, member_dirs, move=True, extra=extra)
    shutil.rmtree(scratch, ignore_errors=True)
    metrics: dict[str, Any] = {"members": [m.metrics.get("val", {}).get("accuracy") for m in run.members]}
    loaded = load_images(data, val_split=0, seed=config.seed)
    with _open_cache(config.cache_dir) as cache:
        _, val_set, _ = _split(loaded, config, cache, progress=False)
        if val_set is not None:
            probs = run_probabilities(run, val_set.paths, cache, batch_size=config.batch_size,
                                      num_workers=config.num_workers, progress=progress)
            if probs.ok.any():
                metrics["val"] = classification_metrics(val_set.labels[probs.ok], probs.proba, run.class_names)
                _log(progress, f"ensemble validation accuracy {metrics['val']['accuracy']:.4f} "
                               f"(members: {', '.join(f'{a:.4f}' for a in metrics['members'] if a is not None)})")
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    info["metrics"] = metrics
    atomic_write_bytes(out / "run.json", json.dumps(info, indent=2).encode())
    _log(progress, f"saved ensemble run ({len(plan)} members) to {out}")
    loaded_run = load_run(out)
    assert isinstance(loaded_run, EnsembleRun)
    return loaded_run


def _train_finetuned(config: TrainConfig, data: Any, loaded: LoadedData, train_set: ImageSet,
                     val_set: ImageSet | None, val_from: str, bb: Backbone, cache: FeatureCache, n_frozen: int,
                     out: Path, progress: bool, start: float, auto: dict[str, Any] | None = None) -> Run:
    """The fine-tuning branch of :func:`train` (``freeze`` is not ``all``)."""
    from .backbones import state_dict_digest
    from .calibration import scale_head
    from .features import AugmentedTransform
    from .finetune import FinetuneConfig, cleanup, finetune
    from .heads import LinearHead

    ft_cfg = FinetuneConfig(**config.finetune)
    plan_names = stage_plan(bb.model, whole_ok=n_frozen == 0).names
    _log(progress, f"fine-tuning {bb.name}: {n_frozen} of {len(plan_names)} stages frozen "
                   f"({', '.join(plan_names[:n_frozen]) or 'none'}); training the rest and a new head")
    clean = clean_view(bb.data_config)
    train_views = [clean]
    augment_transform = None
    pipeline = None
    if config.augment != "none":
        pipeline = build_training_pipeline(config.augment, bb.data_config["input_size"][1:], config.aug_params,
                                           train_set.paths, cache, seed=config.seed, progress=progress)
        if n_frozen >= 1 and ft_cfg.cache_cut:
            train_views += augmented_views(pipeline, bb.data_config, config.aug_views, seed=config.seed)
            _log(progress, f"augmentation '{config.augment}': {config.aug_views} cached views per image at the cut")
        else:
            augment_transform = AugmentedTransform(pipeline, bb.data_config, config.seed, 0)
            _log(progress, f"augmentation '{config.augment}': a fresh view per image per epoch, in workers")
    work_dir = out.parent / f".{out.name}.finetune"
    result = finetune(bb, train_set, val_set, n_frozen=n_frozen, cfg=ft_cfg, cache=cache, train_views=train_views,
                      val_view=clean, augment_transform=augment_transform, work_dir=work_dir, resume=config.resume,
                      seed=config.seed, precision=config.precision, num_workers=config.num_workers,
                      progress=progress, log=lambda m: _log(progress, m))
    model = result.model
    backbone_state = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}
    digest = state_dict_digest(model.backbone)
    head = LinearHead.from_layer(model.head, train_set.class_names)
    if auto is not None and auto.get("temperature"):  # --freeze auto compared the model at this temperature
        scale_head(head, auto["temperature"])
    train_paths = {str(p) for p in train_set.paths}
    n_used = len(train_set) - sum(1 for b in result.bad_files if b.path in train_paths)
    metrics: dict[str, Any] = {"n_train": n_used, "best_epoch": result.best_epoch,
                               "history": result.history, "seconds_per_epoch": round(result.seconds_per_epoch, 3),
                               "cut_cache_seconds": round(result.cut_seconds, 3),
                               "features": {"n_computed": 0, "n_cached": 0, "seconds": 0.0}}
    if auto is not None:
        metrics["freeze_auto"] = auto
    from .backbones import Backbone as _Backbone

    tuned = _Backbone(bb.name, model.backbone.eval(), bb.data_config, bb.num_features, "run:backbone.safetensors",
                      digest)
    if val_set is not None:
        val_result = extract_features(tuned, val_set.paths, cache=cache, precision=config.precision,
                                      batch_size=config.batch_size, num_workers=config.num_workers,
                                      progress=progress, desc="val features")
        if val_result.ok.any():
            x_val, y_val = val_result.features[val_result.ok], val_set.labels[val_result.ok]
            metrics["val"] = classification_metrics(y_val, head.predict_proba(x_val), train_set.class_names)
            _log(progress, f"validation accuracy {metrics['val']['accuracy']:.4f} on {len(y_val)} images "
                           f"(best epoch {result.best_epoch})")
    metrics["seconds"] = round(time.perf_counter() - start, 3)
    info = {
        "headstart_version": __version__,
        "class_names": list(train_set.class_names),
        "backbone": {"name": bb.name, "weights": "run:backbone.safetensors", "weights_source": "fine-tuned",
                     "base_weights": config.weights, "base_weights_digest": bb.weights_digest,
                     "weights_digest": digest, "num_features": bb.num_features, "freeze": n_frozen,
                     "frozen_stages": plan_names[:n_frozen]},
        "preprocessing": preprocessing_signature(bb.data_config, _resolve_precision_for(config.precision)),
        "data_config": bb.data_config,
        "config": asdict(config),
        "finetune": asdict(ft_cfg),
        "augmentation": None if pipeline is None else {"pipeline": pipeline.config(), "views": config.aug_views,
                                                       "seed": config.seed},
        "data": {"source": str(data), "layout": loaded.layout, "val_from": val_from,
                 "n_train": len(train_set) - sum(1 for b in result.bad_files if b.path in train_paths),
                 "n_val": int(metrics.get("val", {}).get("n_images", 0)),
                 "class_counts": train_set.class_counts(), "n_bad_files": len(loaded.bad_files + result.bad_files)},
    }
    bad = [b.to_dict() for b in loaded.bad_files + result.bad_files]
    for item in bad:
        _log(progress, f"skipped {item['path']}: {item['reason']}")
    history_lines = "".join(json.dumps(row) + "\n" for row in result.history)
    path = write_run(out, info, head, metrics, bad, extra={
        "backbone.safetensors": lambda p: save_file(backbone_state, str(p), metadata={"headstart": "backbone"}),
        "metrics.jsonl": lambda p: p.write_text(history_lines, encoding="utf-8")})
    cleanup(work_dir)
    _log(progress, f"saved run to {path}")
    return Run.load(path)


def _auto_freeze(config: TrainConfig, bb: Backbone, train_set: ImageSet, val_set: ImageSet | None,
                 cache: FeatureCache, out: Path, progress: bool) -> tuple[str | int, TrainConfig, dict[str, Any]]:
    """``--freeze auto``: the depth chosen on a held-out fold, and the config to retrain it on every image."""
    from .finetune import cleanup
    from .freeze_auto import auto_freeze, format_table

    work_dir = out.parent / f".{out.name}.auto"
    try:
        choice = auto_freeze(bb, train_set, val_set, cache, config=config, work_dir=work_dir,
                             budget_minutes=config.budget, progress=progress, log=lambda m: _log(progress, m))
    finally:
        cleanup(work_dir)
    chosen = next(t for t in choice.trials if t.freeze == choice.freeze and not t.skipped)
    _log(progress, "--freeze auto: held-out comparison (* = chosen)\n" + format_table(choice.trials, chosen))
    for note in choice.notes:
        _log(progress, f"note: {note}")
    _log(progress, f"--freeze auto: {choice.reason}; retraining it on all {len(train_set)} training images")
    if choice.freeze == "all":
        return "all", config, choice.report()
    finetune = {**config.finetune, "epochs": choice.epochs}
    config = replace(config, augment=choice.augment, aug_views=choice.aug_views, finetune=finetune)
    return choice.freeze, config, choice.report()




def _resolve_precision_for(precision: str) -> str:
    import torch

    from .preprocess import resolve_precision

    return resolve_precision(precision, torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def _absolute_weights(weights: Any) -> str:
    weights = str(weights)
    if weights in ("default", "random"):
        return weights
    return str(Path(weights).resolve())


def _validate_train_config(config: TrainConfig, out: Path) -> None:
    from .heads import HEAD_TYPES
    from .runs import check_out_folder

    if config.select not in ("cv", "none"):
        raise UsageError(f"select must be 'cv' (choose the head by cross-validation) or 'none' (one fixed head); "
                         f"got '{config.select}'")
    if config.head is not None and config.head not in HEAD_TYPES:
        raise UsageError(f"head must be one of {', '.join(HEAD_TYPES)}; got '{config.head}'")
    make_head(config.head or "linear", **config.head_params).validate_params()
    if config.select == "cv":
        _check_selection_options(config)
    elif config.grid:
        raise UsageError(f"grid options {sorted(config.grid)} need --select cv; drop them or --select none")
    if not (isinstance(config.batch_size, int) and config.batch_size >= 1):
        raise UsageError(f"batch_size must be a positive integer; got {config.batch_size!r}")
    if config.num_workers is not None and not (isinstance(config.num_workers, int) and config.num_workers >= 0):
        raise UsageError(f"num_workers must be an integer >= 0; got {config.num_workers!r}")
    if not 0.0 <= config.val_split < 1.0:
        raise UsageError(f"val_split must be in [0, 1); got {config.val_split}. Use e.g. 0.2 to hold out 20%")
    if config.augment == "none" and config.aug_views:
        raise UsageError(f"aug_views={config.aug_views} needs an augmentation preset; add e.g. --augment standard")
    if config.augment != "none":
        from .transforms import PRESETS

        if config.augment not in PRESETS:
            raise UsageError(f"augment must be one of {', '.join(PRESETS)}; got '{config.augment}'")
        if config.aug_views is None:
            config.aug_views = DEFAULT_AUG_VIEWS
        if not (isinstance(config.aug_views, int) and config.aug_views >= 1):
            raise UsageError(f"aug_views must be a positive integer; got {config.aug_views!r}")
    freeze = parse_freeze(config.freeze)
    if freeze != "all":
        from .finetune import FinetuneConfig

        unknown = set(config.finetune) - set(FinetuneConfig.__dataclass_fields__)
        if unknown:
            raise UsageError(f"unknown fine-tuning option(s) {sorted(unknown)}")
        FinetuneConfig(**config.finetune).validate()
        if config.cv and freeze != "auto":
            raise UsageError("--cv works with --freeze all or auto (a head on frozen features); fine-tuning "
                             "reports validation accuracy")
        if config.grid and freeze != "auto":
            raise UsageError("--grid-* options choose a head on frozen features; they do not apply to fine-tuning")
    if config.budget is not None and (freeze != "auto" or not isinstance(config.budget, (int, float))
                                      or not config.budget > 0):
        raise UsageError(f"budget (minutes > 0) limits --freeze auto's comparison; got {config.budget!r} with "
                         f"--freeze {config.freeze}")
    if not (isinstance(config.ensemble, int) and config.ensemble >= 1):
        raise UsageError(f"ensemble must be a positive integer (members per backbone); got {config.ensemble!r}")
    if not (isinstance(config.seed, int) and config.seed >= 0):
        raise UsageError(f"seed must be an integer >= 0; got {config.seed!r}")
    if config.select == "none" and config.cv and ("," in config.backbone or config.ensemble > 1):
        raise UsageError("--cv reports one model's cross-validated accuracy; drop it for ensembles "
                         "(they report validation accuracy)")
    if "," in config.backbone:
        for name in (b.strip() for b in config.backbone.split(",")):
            if name:
                check_backbone_name(name)
    if config.cv is not None and not (isinstance(config.cv, int) and (config.cv == 0 or config.cv >= 2)):
        raise UsageError(f"cv must be at least 2 folds (or 0 = off with --select none); got {config.cv!r}")
    if config.select == "cv" and config.cv == 0:
        raise UsageError("--cv 0 turns cross-validation off, which the selection needs; use --select none "
                         "to train one fixed head")
    check_out_folder(out)


def _check_selection_options(config: TrainConfig) -> None:
    """With ``select='cv'`` the grid sets the head's parameters; a fixed one is a contradiction."""
    fixed = sorted(set(config.head_params) - {"class_weight", "seed"})
    if fixed:
        flags = ", ".join("--" + k.replace("_", "-") for k in fixed)
        raise UsageError(f"{flags} fix(es) the head, but the head is chosen by cross-validation (--select cv); "
                         "use --select none to train exactly that head, or narrow the search with --grid-C / "
                         "--grid-mlp")
    if config.head_params.get("class_weight") not in (None, "balanced"):
        raise UsageError("a class_weight dict fixes the head; with selection only 'balanced' narrows the grid. "
                         "Use select='none' to train with those weights")
    if config.head_params.get("seed", config.seed) != config.seed:
        raise UsageError(f"head_params seed {config.head_params['seed']} differs from seed {config.seed}, which "
                         "seeds the selection's heads; set seed= instead")
    options = dict(config.grid)
    if config.head is not None:
        options.setdefault("head", [config.head])
    Grid.from_options(options)


def _split(loaded: LoadedData, config: TrainConfig, cache: FeatureCache,
           progress: bool) -> tuple[ImageSet, ImageSet | None, str]:
    """Training and validation sets; a split is stratified and keeps identical files on one side."""
    keys, _ = cache.image_keys(loaded.train.paths)
    groups = [k if k is not None else f"unreadable:{i}" for i, k in enumerate(keys)]
    labels_of: dict[str, set[int]] = {}
    for g, label in zip(groups, loaded.train.labels):
        labels_of.setdefault(g, set()).add(int(label))
    clashes = [g for g, labels in labels_of.items() if len(labels) > 1]
    if clashes:
        example = [str(p) for p, g in zip(loaded.train.paths, groups) if g == clashes[0]]
        _log(progress, f"warning: {len(clashes)} image(s) appear, byte for byte, in more than one class, "
                       f"e.g. {example}")
    if loaded.val is not None:
        return loaded.train, loaded.val, loaded.val_from
    if config.val_split == 0:
        return loaded.train, None, "none"
    train_idx, val_idx = stratified_split(loaded.train.labels, config.val_split, config.seed, groups=groups)
    if not len(val_idx):
        return loaded.train, None, "none"
    return loaded.train.subset(train_idx), loaded.train.subset(val_idx), "split"
