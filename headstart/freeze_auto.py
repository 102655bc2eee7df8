"""``--freeze auto``: decide how deep to fine-tune from evidence on a held-out fold, within a time budget.

The candidates, cheapest first: the frozen network with the head chosen by cross-validation
(``all``), then fine-tuning with the top 1, 2 and 3 stages trainable (cut-cached, augmented,
early-stopped on the fold). Each is scored on the same held-out fold (a stratified 20% of the
training images, identical files on one side, or the ``val/`` folder) by log-loss after a
temperature fitted per candidate on those images (:func:`~headstart.calibration.calibrated_losses`;
fitting it on half of the fold and scoring the other half was tried and was too noisy on folds of
40-70 images: a half without errors drives the temperature to its bound). The lowest is the reference; the cheapest
candidate within the noise of it (one standard error of the per-image paired difference, and at
least :data:`MIN_MARGIN`) is chosen, so a costlier candidate must win clearly. The fine-tuned
candidates also pick their epoch on that fold, which flatters them a little; the margin is the
guard against that too.

Before each fine-tuning candidate its cost (cut cache, epochs on the fold's training part, and the
retraining of the winner on every image) is predicted from a timed forward pass of each stage; a
candidate that would take the run past the budget is skipped and the table says so. After a
candidate has run, the prediction of the next is corrected by how far off the last one was.

A fine-tuned winner is shipped with the temperature it was compared with (its logits divided by
it, folded into the head): what was compared is what the user gets. The frozen head is shipped as
the cross-validated selection made it (with the selection's own temperature).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._constants import DEFAULT_BUDGET_MINUTES
from .backbones import Backbone
from .cache import FeatureCache
from .calibration import calibrated_losses, fit_temperature
from .data import ImageSet, stratified_split
from .errors import UsageError

MIN_MARGIN = 0.01  # held-out log-loss a costlier candidate must gain at the least, whatever the noise
HELD_OUT = 0.2  # fraction of each class held out to compare the candidates (when there is no val/)
AUTO_AUGMENT = "standard"  # augmentation of the fine-tuning candidates when --augment is not given
AUTO_AUG_VIEWS = 4  # augmented views cached at the cut per image (the cut cache is the main cost)
TOP_STAGES = (1, 2, 3)  # fine-tuning candidates: this many top stages trainable
_EPS = 1e-15


@dataclass
class Trial:
    """One row of the comparison: a candidate depth and what it scored on the held-out fold."""

    name: str
    freeze: str | int  # "all" or the number of frozen stages
    trainable: int  # stages trained (0 = head only): the cost order
    image_loss: np.ndarray | None = None  # log-loss per held-out image, NaN where unusable (None: not run)
    accuracy: float | None = None
    seconds: float = 0.0
    predicted_seconds: float | None = None
    best_epoch: int | None = None
    skipped: str | None = None
    seconds_per_epoch: float | None = None  # fine-tuning: mean seconds of one epoch on the fit part
    calibrated: np.ndarray | None = None  # the same after a fitted temperature (what the choice compares)
    temperature: float | None = None  # that temperature; a fine-tuned winner is retrained and shipped with it

    @property
    def log_loss(self) -> float | None:
        return None if self.image_loss is None else float(np.nanmean(self.image_loss))

    @property
    def calibrated_log_loss(self) -> float | None:
        return None if self.calibrated is None else float(np.nanmean(self.calibrated))

    def row(self) -> dict[str, Any]:
        return {"candidate": self.name, "freeze": self.freeze, "trainable_stages": self.trainable,
                "accuracy": self.accuracy, "log_loss": self.log_loss,
                "calibrated_log_loss": self.calibrated_log_loss, "seconds": round(self.seconds, 2),
                "predicted_seconds": None if self.predicted_seconds is None else round(self.predicted_seconds, 1),
                "best_epoch": self.best_epoch, "skipped": self.skipped,
                "seconds_per_epoch": None if self.seconds_per_epoch is None else round(self.seconds_per_epoch, 2),
                "temperature": None if self.temperature is None else round(self.temperature, 4)}


def choose(trials: Sequence[Trial], min_margin: float = MIN_MARGIN) -> tuple[Trial, str]:
    """The cheapest trial whose held-out log-loss is within the noise of the lowest; and why.

    Noise is one standard error of the per-image paired difference to the lowest (over the images
    both could use), at least ``min_margin``. The losses compared are the calibrated ones when the
    trials have them (see :func:`calibrated_losses`). Trials not run (skipped) are ignored.
    """
    done = sorted((t for t in trials if t.image_loss is not None), key=lambda t: t.trainable)
    if not done:
        raise ValueError("no candidate was scored")
    loss = {id(t): t.calibrated if t.calibrated is not None else t.image_loss for t in done}
    common = ~np.any([np.isnan(loss[id(t)]) for t in done], axis=0)  # images every candidate could use
    mean = {id(t): float(loss[id(t)][common].mean()) for t in done}
    best = min(done, key=lambda t: mean[id(t)])
    for t in done:
        diff = loss[id(t)][common] - loss[id(best)][common]
        se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
        margin = max(se, min_margin)
        if diff.mean() <= margin:
            if t is best:
                return t, f"{t.name} has the lowest held-out log-loss ({mean[id(t)]:.4f})"
            return t, (f"{t.name} is within the noise of the lowest held-out log-loss ({mean[id(t)]:.4f} vs "
                       f"{mean[id(best)]:.4f} for {best.name}, margin {margin:.4f}) and cheaper")
    raise AssertionError("unreachable: the best trial is within its own margin")


def format_table(trials: Sequence[Trial], chosen: Trial | None = None) -> str:
    """The comparison as a text table."""
    lines = [f"  {'candidate':<36} {'held-out acc':>12} {'log-loss':>9} {'calibrated':>10} {'minutes':>8} "
             f"{'s/epoch':>8} {'epoch':>6}"]
    for t in trials:
        mark = "*" if t is chosen else " "
        if t.skipped:
            lines.append(f"{mark} {t.name:<36} {'skipped: ' + t.skipped}")
            continue
        epoch = "" if t.best_epoch is None else str(t.best_epoch)
        calibrated = "" if t.calibrated is None else f"{t.calibrated_log_loss:.4f}"
        per_epoch = "" if t.seconds_per_epoch is None else f"{t.seconds_per_epoch:.1f}"
        lines.append(f"{mark} {t.name:<36} {t.accuracy:>12.4f} {t.log_loss:>9.4f} {calibrated:>10} "
                     f"{t.seconds / 60:>8.2f} {per_epoch:>8} {epoch:>6}")
    return "\n".join(lines)


@dataclass
class AutoChoice:
    """What :func:`auto_freeze` decided: the depth, the settings to retrain with, and the evidence."""

    freeze: str | int
    epochs: int | None  # fine-tuning epochs for the retraining on every image (the fold's best epoch)
    temperature: float | None  # a fine-tuned winner's logits are divided by it (fitted on the held-out fold)
    augment: str
    aug_views: int
    reason: str
    trials: list[Trial]
    budget_minutes: float
    seconds: float
    notes: list[str] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        return {"chosen": self.freeze, "reason": self.reason, "budget_minutes": self.budget_minutes,
                "seconds": round(self.seconds, 2), "epochs": self.epochs, "temperature": self.temperature,
                "augment": self.augment,
                "aug_views": self.aug_views, "candidates": [t.row() for t in self.trials], "notes": self.notes}


def held_out_split(train_set: ImageSet, val_set: ImageSet | None, cache: FeatureCache,
                   seed: int) -> tuple[ImageSet, ImageSet, str]:
    """The fold the candidates are compared on: ``val/`` when given, else a stratified 20% (grouped)."""
    if val_set is not None:
        return train_set, val_set, "the validation images"
    keys, _ = cache.image_keys(train_set.paths)
    groups = [k if k is not None else f"unreadable:{i}" for i, k in enumerate(keys)]
    for c, name in enumerate(train_set.class_names):
        distinct = len({g for g, label in zip(groups, train_set.labels) if label == c})
        if distinct < 3:
            raise UsageError(f"--freeze auto holds out {HELD_OUT:.0%} of each class and cross-validates the rest, "
                             f"so every class needs 3 distinct images; class '{name}' has {distinct}. Add images, "
                             "or choose the depth yourself (--freeze all or --freeze N)")
    fit_idx, held_idx = stratified_split(train_set.labels, HELD_OUT, seed, groups=groups)
    return train_set.subset(fit_idx), train_set.subset(held_idx), f"a held-out {HELD_OUT:.0%} of each class"


def stage_seconds(backbone: Backbone, precision: str, device: torch.device, batch: int = 8) -> list[float]:
    """Seconds per image of a forward pass through each stage, then the tail (one timed batch)."""
    from .preprocess import autocast
    from .stages import stage_plan

    plan = stage_plan(backbone.model, whole_ok=True)
    backbone.model.to(device).eval()
    x = torch.zeros(batch, *backbone.data_config["input_size"], device=device)
    out = []
    with torch.no_grad(), autocast(device, precision):
        plan.run(x)  # warm-up
        for i in range(len(plan)):
            t0 = time.perf_counter()
            x = plan.run(x, i, i + 1)
            out.append((time.perf_counter() - t0) / batch)
        t0 = time.perf_counter()
        plan.tail(x)
        out.append((time.perf_counter() - t0) / batch)
    return out


def trial_seconds(per_stage: Sequence[float], n_frozen: int, n_fit: int, n_held: int, views: int,
                  epochs: int) -> float:
    """Predicted cost of trying one fine-tuning depth: its cut cache, then the epochs on the fit part.

    A training step costs about three forward passes (forward, and backward through activations and
    weights) of the trainable stages; decoding and augmenting an image is counted as one more pass
    through the frozen ones. Each epoch also scores the held-out images.
    """
    frozen, trainable = float(sum(per_stage[:n_frozen])), float(sum(per_stage[n_frozen:]))
    return 2 * frozen * (n_fit * views + n_held) + epochs * trainable * (3 * n_fit + n_held)


def retrain_seconds(per_stage: Sequence[float], n_frozen: int, n_held: int, n_all: int, views: int,
                    epochs: int) -> float:
    """Predicted cost of retraining a depth on every image: the held-out images' augmented views, the epochs."""
    frozen, trainable = float(sum(per_stage[:n_frozen])), float(sum(per_stage[n_frozen:]))
    return 2 * frozen * n_held * (views - 1) + 3 * trainable * epochs * n_all


def auto_freeze(backbone: Backbone, train_set: ImageSet, val_set: ImageSet | None, cache: FeatureCache, *,
                config: Any, work_dir: Path, budget_minutes: float | None = None, progress: bool = True,
                log: Callable[[str], None] = lambda m: None) -> AutoChoice:
    """Compare the frozen head with fine-tuning the top 1, 2, 3 stages on a held-out fold; pick by evidence.

    ``config`` is the :class:`~headstart.training.TrainConfig` (precision, workers, seed, augmentation,
    fine-tuning settings). Returns the :class:`AutoChoice`; the caller retrains the winner on every image.
    """
    from .finetune import FinetuneConfig
    from .preprocess import resolve_precision
    from .stages import stage_plan

    start = time.perf_counter()
    budget = DEFAULT_BUDGET_MINUTES if budget_minutes is None else float(budget_minutes)
    if not budget > 0:
        raise UsageError(f"--budget must be a number of minutes > 0; got {budget_minutes!r}")
    fit_set, held_set, held_from = held_out_split(train_set, val_set, cache, config.seed)
    log(f"--freeze auto: comparing the frozen head with fine-tuning on {held_from} ({len(held_set)} images), "
        f"budget {budget:g} min")
    trials = [_frozen_trial(backbone, fit_set, held_set, cache, config, progress)]
    n_stages = len(stage_plan(backbone.model, whole_ok=True))
    augment = config.augment if config.augment != "none" else AUTO_AUGMENT
    views = config.aug_views if config.augment != "none" else AUTO_AUG_VIEWS
    ft_cfg = FinetuneConfig(**config.finetune)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    per_stage = stage_seconds(backbone, resolve_precision(config.precision, device), device)
    notes, correction = [], 1.0
    for top in TOP_STAGES:
        n_frozen = n_stages - top
        name = f"fine-tune top {top} stage{'s' if top > 1 else ''}"
        if n_frozen < 1:
            notes.append(f"{name}: {backbone.name} has only {n_stages} stages")
            continue
        sizes = (len(fit_set), len(held_set))
        trial_part = trial_seconds(per_stage, n_frozen, *sizes, 1 + views, ft_cfg.epochs)
        predicted = correction * (trial_part + retrain_seconds(per_stage, n_frozen, sizes[1], len(train_set),
                                                               1 + views, ft_cfg.epochs))
        elapsed = time.perf_counter() - start
        if elapsed + predicted > budget * 60:
            reason = f"needs ~{predicted / 60:.1f} min, {max(0.0, budget - elapsed / 60):.1f} min of the budget left"
            trials.append(Trial(name, n_frozen, top, predicted_seconds=predicted, skipped=reason))
            continue
        trial = finetune_trial(name, top, n_frozen, backbone, train_set.paths, fit_set, held_set, cache, config,
                               ft_cfg, augment, views, work_dir, progress)
        trial.predicted_seconds = predicted
        correction = float(np.clip(trial.seconds / max(1e-6, trial_part), 0.25, 4.0))  # this machine, these images
        trials.append(trial)
        log(f"  {name}: held-out accuracy {trial.accuracy:.4f}, log-loss {trial.log_loss:.4f} "
            f"({trial.seconds / 60:.1f} min)")
    skipped = [t.name for t in trials if t.skipped]
    if skipped:
        notes.append(f"{len(skipped)} candidate(s) skipped for the {budget:g} min budget ({', '.join(skipped)}); "
                     "raise --budget to try them")
    chosen, reason = choose(trials)
    temperature = chosen.temperature if chosen.freeze != "all" else None
    return AutoChoice(chosen.freeze, chosen.best_epoch, temperature, augment, views, reason, trials, budget,
                      time.perf_counter() - start, notes)


def _trial(name: str, freeze: str | int, top: int, proba: np.ndarray, ok: np.ndarray, y: np.ndarray,
           seconds: float, best_epoch: int | None = None) -> Trial:
    """A scored trial from the probabilities of the usable held-out images (``ok`` marks them)."""
    full = np.full((len(ok), proba.shape[1]), np.nan)
    full[np.flatnonzero(ok)] = proba
    loss = np.full(len(ok), np.nan)
    loss[ok] = -np.log(np.clip(proba[np.arange(len(proba)), y[ok]], _EPS, 1.0))
    accuracy = float((proba.argmax(1) == y[ok]).mean())
    return Trial(name, freeze, top, loss, accuracy, seconds, calibrated=calibrated_losses(full, y),
                 best_epoch=best_epoch, temperature=fit_temperature(proba, y[ok]) if len(proba) else 1.0)


def _frozen_trial(backbone: Backbone, fit_set: ImageSet, held_set: ImageSet, cache: FeatureCache, config: Any,
                  progress: bool) -> Trial:
    """The head chosen by cross-validation on the fit part's cached features, scored on the held-out fold."""
    from .features import extract_features
    from .selection import DEFAULT_FOLDS, fit_candidate, grid_with_classifier, select_head

    t0 = time.perf_counter()
    common = {"cache": cache, "precision": config.precision, "batch_size": config.batch_size,
              "num_workers": config.num_workers, "progress": progress}
    fit = extract_features(backbone, fit_set.paths, **common)
    held = extract_features(backbone, held_set.paths, desc="held-out features", **common)
    x, y = fit.features[fit.ok], fit_set.labels[fit.ok]
    grid, classifier, _ = grid_with_classifier(dict(config.grid), backbone, config.weights, memo=cache)
    keys, _ = cache.image_keys([p for p, ok in zip(fit_set.paths, fit.ok) if ok])
    sel = select_head(x, y, grid=grid, folds=config.cv or DEFAULT_FOLDS, groups=[k or str(i) for i, k in
                      enumerate(keys)], seed=config.seed, classifier=classifier)
    head = fit_candidate(sel.best, x, y, classifier=classifier, seed=config.seed, temperature=sel.temperature)
    proba = np.zeros((int(held.ok.sum()), len(fit_set.class_names)))
    proba[:, head.classes_] = head.predict_proba(held.features[held.ok])
    return _trial(f"frozen, {sel.best.name}", "all", 0, proba, held.ok, held_set.labels, time.perf_counter() - t0)


def finetune_trial(name: str, top: int, n_frozen: int, backbone: Backbone, all_paths: Sequence[Path],
                   fit_set: ImageSet, held_set: ImageSet, cache: FeatureCache, config: Any, ft_cfg: Any,
                   augment: str, views: int, work_dir: Path, progress: bool) -> Trial:
    """Fine-tune a copy of the backbone with ``n_frozen`` stages frozen, early-stopped on the held-out fold.

    ``config`` needs ``seed``, ``aug_params``, ``precision`` and ``num_workers`` (a TrainConfig has them);
    ``all_paths`` (every training image) fits the augmentation's colour statistics, as the retraining does.
    """
    from .augmented import build_training_pipeline
    from .features import augmented_views, clean_view
    from .finetune import cleanup, finetune

    t0 = time.perf_counter()
    clone = Backbone(backbone.name, copy.deepcopy(backbone.model), backbone.data_config, backbone.num_features,
                     backbone.weights_source, backbone.weights_digest)  # the frozen stages' cache stays valid
    # fitted on every training image, as the retraining's pipeline is: the cut cache of the fit part is reused
    pipeline = build_training_pipeline(augment, backbone.data_config["input_size"][1:], config.aug_params,
                                       all_paths, cache, seed=config.seed, progress=progress)
    augmented = augmented_views(pipeline, backbone.data_config, views, seed=config.seed)
    train_views = [clean_view(backbone.data_config), *augmented]
    trial_dir = work_dir / f"top{top}"
    try:
        result = finetune(clone, fit_set, held_set, n_frozen=n_frozen, cfg=ft_cfg, cache=cache,
                          train_views=train_views, val_view=train_views[0], work_dir=trial_dir, seed=config.seed,
                          precision=config.precision, num_workers=config.num_workers, progress=progress,
                          log=lambda m: None)
    finally:
        cleanup(trial_dir)
    if result.val_proba is None:
        raise UsageError(f"{name}: no held-out image could be used to score it; fix the skipped files or choose "
                         "the depth yourself (--freeze all or --freeze N)")
    ok = np.zeros(len(held_set), dtype=bool)
    ok[result.val_index] = True
    trial = _trial(name, n_frozen, top, result.val_proba, ok, held_set.labels, time.perf_counter() - t0,
                   result.best_epoch)
    trial.seconds_per_epoch = result.seconds_per_epoch
    return trial
