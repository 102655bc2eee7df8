"""``headstart sweep``: the head selection of ``train``, over backbones and augmented-view counts too.

For every (backbone, augmented-view count) pair the training images' features are read from the
feature cache (each backbone's views are extracted once: a count of 4 uses views 1-4 of a count of
8), :func:`~headstart.selection.select_head` cross-validates the grid of head settings on them, and
all rows are merged into one leaderboard. Every pair sees the same images in the same folds (same
seed, same content groups), so their scores compare. Each pair's winner is the setting ``train`` would
choose for that backbone and view count; all rows are ranked by the selection's own rule (the lowest
log-loss at each setting's own temperature, accuracy breaking ties), so the best of the sweep is
the best of those winners.
The best setting is then saved as an ordinary run by :func:`~headstart.training.train` with its
backbone, views and a grid narrowed to that one candidate, which refits it on every training image.

::

    OUT/
      sweep.json   settings, every row, the best, timings
      sweep.csv    one row per setting, best first
      sweep.png    CV accuracy +- std over folds of the top settings
      best/        run folder of the best setting (evaluate / predict / ensemble accept it)
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from ._constants import DEFAULT_BACKBONE, DEFAULT_FOLDS, DEFAULT_SWEEP_AUGMENT, ENGINES
from ._io import atomic_write_bytes
from ._validation import (
    check_batch_size,
    check_choice,
    check_folds,
    check_num_workers,
    check_out_outside_data,
    check_precision,
    check_preset,
    check_seed,
    check_weights,
)
from .augmented import build_training_pipeline, check_overrides
from .backbones import Backbone, check_backbone_name, create_backbone
from .cache import FeatureCache
from .data import load_images, max_pixels
from .errors import DataError, RunError, UnknownBackboneError, UsageError
from .features import View, augmented_views, clean_view, extract_views
from .selection import Candidate, Grid, grid_with_classifier, select_head
from .sources import Classifier
from .sweep_output import (  # noqa: F401  (the output functions are also importable from here)
    BEST_DIR,
    CSV_FILE,
    PLOT_FILE,
    PLOT_TOP,
    SCORES,
    SWEEP_FILE,
    csv_columns,
    format_sweep,
    plot_leaderboard,
    plot_rows,
    rank_rows,
    views_label,
    write_csv,
)

DEFAULT_AUGMENT = DEFAULT_SWEEP_AUGMENT  # the preset when a view count > 0 is asked for without --augment


def _log(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ settings


def parse_backbones(backbone: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> known timm names, duplicates dropped; unknown ones raise UsageError."""
    items = backbone.split(",") if isinstance(backbone, str) else list(backbone)
    names = list(dict.fromkeys(str(b).strip() for b in items if str(b).strip()))
    if not names:
        raise UsageError(f"backbone (--backbone) must name at least one timm model, e.g. {DEFAULT_BACKBONE}; "
                         f"got {backbone!r}")
    for name in names:
        try:
            check_backbone_name(name)
        except UnknownBackboneError as exc:
            raise UnknownBackboneError(f"--backbone: {exc}") from None
    return names


def check_views(aug_views: int | Sequence[int]) -> list[int]:
    """Augmented-view counts, ascending and without duplicates; each an integer >= 0 (0 = clean view only)."""
    counts = [aug_views] if isinstance(aug_views, int) else list(aug_views)
    if not counts or not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 0
                             for k in counts):
        raise UsageError(f"aug_views (--aug-views) must list view counts >= 0 (0 = the clean view only), "
                         f"e.g. 0,4,8; got {counts}")
    return sorted({int(k) for k in counts})


def resolve_augment(augment: str | None, counts: Sequence[int]) -> str:
    """The augmentation preset of the counts > 0: ``augment``, or ``standard`` when not given."""
    wants = any(k > 0 for k in counts)
    if augment is None:
        return DEFAULT_AUGMENT if wants else "none"
    check_preset(augment, "augment (--augment)")
    if augment == "none" and wants:
        raise UsageError(f"--aug-views {','.join(map(str, counts))} asks for augmented views but --augment is "
                         "'none'; drop --augment (default: standard) or use --aug-views 0")
    if augment != "none" and not wants:
        raise UsageError(f"--augment {augment} has no effect with --aug-views 0; add a count > 0, e.g. "
                         "--aug-views 0,8")
    return augment


def _check_out(out: Path) -> None:
    """Refuse an output folder that exists and holds something other than a previous sweep."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / SWEEP_FILE).is_file())):
        raise RunError(f"--out '{out}' exists and is not a headstart sweep folder; choose a new folder or remove it")
    from .runs import check_out_folder

    check_out_folder(out / BEST_DIR)


def _check_numbers(cv: int | None, seed: int, precision: str, batch_size: int, num_workers: int | None) -> None:
    """The scalar options, named by their flags."""
    if cv is not None:
        check_folds(cv, "cv (--cv)")
    check_seed(seed, "seed (--seed)")
    check_precision(precision, "precision (--precision)")
    check_batch_size(batch_size, "batch_size (--batch-size)")
    check_num_workers(num_workers, "num_workers (--workers)")


@dataclass(frozen=True)
class _ViewPlan:
    """The views extracted per training image: the clean one and ``n_aug`` augmented ones."""

    augment: str  # preset of the augmented views ("none" when n_aug is 0)
    aug_params: dict[str, Any]  # overrides of the preset
    n_aug: int  # the largest count of the sweep; a smaller count uses the first views
    seed: int  # view v of an image is the same in any run with this seed and pipeline


@dataclass
class _Context:
    """A sweep's checked settings, and the notes and timings it collects on the way."""

    names: list[str]  # backbones, as listed
    counts: list[int]  # augmented-view counts, ascending
    plan: _ViewPlan
    options: dict[str, Any]  # grid options
    weights: str
    folds: int  # asked for (the selection may use fewer)
    common: dict[str, Any]  # precision, batch_size and num_workers of every extraction
    progress: bool
    notes: list[str] = field(default_factory=list)
    timings: dict[str, Any] = field(default_factory=lambda: {"features": {}, "selection": {}})

    def note(self, note: str) -> None:
        self.notes.append(note)
        _log(self.progress, f"note: {note}")


def _context(backbone: str | Sequence[str], aug_views: int | Sequence[int], augment: str | None,
             aug_params: dict[str, Any] | None, grid: dict[str, Any] | None, cv: int | None, seed: int,
             weights: str, common: dict[str, Any], progress: bool) -> _Context:
    """Every argument checked (bad grid values too) before any heavy work."""
    names = parse_backbones(backbone)
    counts = check_views(aug_views)
    augment = resolve_augment(augment, counts)
    check_overrides(augment, aug_params)  # at a nominal size; each backbone's own is used later
    options = dict(grid or {})
    Grid.from_options(options)
    _check_numbers(cv, seed, common["precision"], common["batch_size"], common["num_workers"])
    check_choice(common["engine"], ENGINES, "engine (--engine)")
    check_weights(weights)
    max_pixels()  # $HEADSTART_MAX_PIXELS, read by every decode
    plan = _ViewPlan(augment, dict(aug_params or {}), max(counts), seed)
    return _Context(names, counts, plan, options, weights, cv or DEFAULT_FOLDS, common, progress)


# ---------------------------------------------------------------------------------------- features


def _views(bb: Backbone, plan: _ViewPlan, train_paths: Sequence[Path], cache: FeatureCache,
           progress: bool) -> list[View]:
    """The clean view and ``plan.n_aug`` augmented views, exactly as ``train`` makes them for this backbone."""
    views = [clean_view(bb.data_config)]
    if plan.n_aug:
        pipeline = build_training_pipeline(plan.augment, bb.data_config["input_size"][1:], plan.aug_params,
                                           train_paths, cache, seed=plan.seed, progress=progress)
        views += augmented_views(pipeline, bb.data_config, plan.n_aug, seed=plan.seed)
    return views


def _extract_all(ctx: _Context, paths: Sequence[Path], listing_bad: Sequence[Any],
                 cache: FeatureCache) -> tuple[np.ndarray, dict[str, tuple[Grid, Classifier | None]]]:
    """Extract (or find cached) every view of every backbone, without reading them back.

    Returns the images usable with every backbone (so every pair has the same images and folds) and
    each backbone's grid and classifier, resolved before its extraction so a bad grid fails early.
    """
    ok = np.ones(len(paths), dtype=bool)
    bad: dict[str, str] = {b.path: b.reason for b in listing_bad}
    grids = {}
    plan = ctx.plan
    for i, name in enumerate(ctx.names, 1):
        t0 = time.perf_counter()
        what = f"clean + {plan.n_aug} '{plan.augment}' views" if plan.n_aug else "clean view"
        _log(ctx.progress, f"sweep: backbone {i}/{len(ctx.names)} {name}: features of {len(paths)} images ({what})")
        bb = create_backbone(name, ctx.weights, memo=cache)
        grids[name] = _grid_for(ctx, bb, cache)
        views = _views(bb, plan, paths, cache, ctx.progress)
        result = extract_views(bb, paths, views, cache=cache, progress=ctx.progress, desc=f"{name} views",
                               load=False, **ctx.common)
        ok &= result.ok
        bad.update({b.path: b.reason for b in result.bad_files})
        seconds = time.perf_counter() - t0
        ctx.timings["features"][name] = {"seconds": round(seconds, 3), "views_computed": result.n_computed,
                                         "views_cached": result.n_cached}
        _log(ctx.progress, f"sweep: {name}: {result.n_computed} views computed, {result.n_cached} from cache, "
                           f"{len(result.bad_files)} bad, {seconds:.1f}s")
    for path, reason in bad.items():
        _log(ctx.progress, f"skipped {path}: {reason}")
    return ok, grids


def _grid_for(ctx: _Context, bb: Backbone, cache: FeatureCache) -> tuple[Grid, Classifier | None]:
    """The grid and, for the logits sources, the backbone's classifier (as ``train`` chooses them)."""
    grid, classifier, note = grid_with_classifier(ctx.options, bb, ctx.weights, memo=cache)
    if note:
        ctx.note(f"{bb.name}: {note}")
    return grid, classifier


# --------------------------------------------------------------------------------------- selection


@dataclass
class _Selected:
    """Every pair's selection rows, on the images that every backbone could read."""

    y: np.ndarray  # labels of those images
    present: np.ndarray  # images per class
    groups: list[str]  # content keys: copies of one file share a fold
    folds: int  # used (the last selection's; every pair sees the same images, so the same)
    rows: list[dict[str, Any]] = field(default_factory=list)
    winners: set[int] = field(default_factory=set)  # row index of each pair's winner


def _selection_inputs(train_set: Any, ok: np.ndarray, cache: FeatureCache, folds: int) -> _Selected:
    """The usable images' labels and content groups; every class needs 2 of them to cross-validate."""
    y = train_set.labels[ok]
    class_names = train_set.class_names
    present = np.bincount(y, minlength=len(class_names))
    if present.min() < 2:
        short = [class_names[j] for j in np.flatnonzero(present < 2)]
        raise DataError(f"class(es) {short} have fewer than 2 usable training images; the sweep compares "
                        f"settings by cross-validation, which needs at least 2 per class; add images")
    keys, _ = cache.image_keys([p for p, good in zip(train_set.paths, ok) if good])
    groups = [k if k is not None else f"unreadable:{j}" for j, k in enumerate(keys)]  # duplicates share a fold
    return _Selected(y, present, groups, folds)


def _select_backbone(ctx: _Context, name: str, train_paths: Sequence[Path], ok: np.ndarray,
                     grid: tuple[Grid, Classifier | None], cache: FeatureCache, found: _Selected) -> None:
    """Read one backbone's views back and cross-validate the grid on each view count; rows go to ``found``."""
    bb = create_backbone(name, ctx.weights, memo=cache)
    views = _views(bb, ctx.plan, train_paths, cache, False)
    x_all = extract_views(bb, train_paths, views, cache=cache, progress=False, **ctx.common).features[ok]
    grid_k, classifier = grid
    by_name = {c.name: c for c in grid_k.candidates(found.present.tolist())}
    augment = ctx.plan.augment
    for k in ctx.counts:
        t0 = time.perf_counter()
        selection = select_head(x_all[:, :1 + k], found.y, grid=grid_k, folds=ctx.folds, groups=found.groups,
                                seed=ctx.plan.seed, classifier=classifier, progress=ctx.progress)
        found.folds = selection.folds
        for note in (n for n in selection.notes if n not in ctx.notes):
            ctx.note(note)
        found.winners.add(len(found.rows))
        found.rows += [_row(r, name, k, augment, by_name[r["setting"]]) for r in selection.leaderboard]
        seconds = time.perf_counter() - t0
        ctx.timings["selection"][f"{name} x{k}"] = round(seconds, 3)
        best = selection.leaderboard[0]
        _log(ctx.progress, f"sweep: {name}, {views_label(k, augment)}: {len(selection.leaderboard)} head "
                           f"settings, best {best['setting']} (CV accuracy {best['cv_accuracy']:.4f}), "
                           f"{seconds:.1f}s")


def _row(row: dict[str, Any], backbone: str, k: int, augment: str, candidate: Candidate) -> dict[str, Any]:
    """A selection row naming its backbone and views, with the candidate's fields spelled out."""
    return {"setting": f"{backbone} | {views_label(k, augment)} | {row['setting']}", "backbone": backbone,
            "aug_views": k, "augment": augment if k else "none", "head_setting": row["setting"],
            **asdict(candidate), **{key: row[key] for key in SCORES}}


# ------------------------------------------------------------------------------------------- sweep


def sweep(
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    backbone: str | Sequence[str] = DEFAULT_BACKBONE,
    aug_views: int | Sequence[int] = (0,),
    augment: str | None = None,
    aug_params: dict[str, Any] | None = None,
    grid: dict[str, Any] | None = None,
    cv: int | None = None,
    seed: int = 0,
    weights: str = "default",
    cache_dir: str | os.PathLike[str] | None = None,
    precision: str = "auto",
    batch_size: int = 32,
    num_workers: int | None = None,
    progress: bool = True,
    engine: str = "auto",
) -> dict[str, Any]:
    """Cross-validate head settings x feature sources x augmented-view counts x backbones; save the best run.

    Args:
        data: class-folder tree, ``train/``+``val/`` tree (the sweep uses ``train/``) or CSV manifest.
        out: folder for ``sweep.json``, ``sweep.csv``, ``sweep.png`` and the best run in ``best/``.
        backbone: timm names, a list or ``"a,b,c"``; each backbone's features are cached once.
        aug_views: augmented views per training image to compare, e.g. ``(0, 4, 8)``; 0 = clean view only.
        augment: preset of the augmented views (default ``standard`` when a count is > 0).
        aug_params: augmentation overrides, e.g. ``{"affine": {"degrees": 20}}``.
        grid: :class:`~headstart.selection.Grid` options that narrow the head settings, e.g. ``{"C": [0.1, 1]}``.
        cv: folds (default 5; fewer when the smallest class is smaller).
        seed: seed of the folds, the augmented views and the heads.
        engine: what runs the backbones' forward (``auto``, ``torch``, ``openvino``; :mod:`headstart.engines`).

    Returns:
        What ``sweep.json`` holds: ``settings``, ``leaderboard`` (rows best first, each naming backbone
        and ``aug_views``), ``best``, ``best_run``, ``timings``, ``notes`` and ``files``.

    Example:
        >>> result = headstart.sweep("photos/", "sweeps/photos", backbone="tf_efficientnet_lite0,"
        ...                          "tf_efficientnet_lite1", aug_views=(0, 4))  # doctest: +SKIP
        >>> result["best"]["setting"]  # doctest: +SKIP
        'tf_efficientnet_lite1 | standard x4 | linear C=0.3 pooled+logits'
    """
    start = time.perf_counter()
    out = Path(out)
    common = {"precision": precision, "batch_size": batch_size, "num_workers": num_workers, "engine": engine}
    ctx = _context(backbone, aug_views, augment, aug_params, grid, cv, seed, weights, common, progress)
    check_out_outside_data(data, out, "sweep")
    _check_out(out)
    loaded = load_images(data, val_split=0, seed=seed)
    for note in loaded.notes:
        ctx.note(note)
    train_set = loaded.train
    with FeatureCache(cache_dir) as cache:
        ok, grids = _extract_all(ctx, train_set.paths, loaded.bad_files, cache)
        found = _selection_inputs(train_set, ok, cache, ctx.folds)
        for name in ctx.names:  # the second pass: read the views back, cross-validate the grid on each count
            _select_backbone(ctx, name, train_set.paths, ok, grids[name], cache, found)
    summary = _summary(data, out, ctx, found, train_set.class_names)
    _save(summary, out, found.folds)  # the leaderboard is kept even if the refit below fails
    best = summary["best"]
    n = len(found.y)
    _log(progress, f"sweep: {summary['n_settings']} settings; best {best['setting']}; refitting it on all "
                   f"{n} training images into {out / BEST_DIR}")
    t0 = time.perf_counter()
    summary["best_run"] = _refit_best(data, out / BEST_DIR, best, ctx.options, n, weights=weights, cv=cv,
                                      seed=seed, aug_params=ctx.plan.aug_params, cache_dir=cache_dir,
                                      progress=progress, **common)
    ctx.timings["refit"] = round(time.perf_counter() - t0, 3)
    ctx.timings["total"] = round(time.perf_counter() - start, 3)
    _write_json(summary, out)
    return summary


def _summary(data: Any, out: Path, ctx: _Context, found: _Selected, class_names: Sequence[str]) -> dict[str, Any]:
    """What ``sweep.json`` holds, before the refit adds ``best_run`` and the last timings."""
    leaderboard = rank_rows(found.rows, found.winners)
    settings = {"data": str(data), "backbones": ctx.names, "weights": ctx.weights, "aug_views": ctx.counts,
                "augment": ctx.plan.augment, "aug_params": ctx.plan.aug_params, "grid": ctx.options,
                "cv": ctx.folds, "folds": found.folds, "seed": ctx.plan.seed, "precision": ctx.common["precision"],
                "n_images": len(found.y), "class_names": list(class_names),
                "class_counts": {n: int(c) for n, c in zip(class_names, found.present)}}
    return {"headstart_version": __version__, "settings": settings, "n_settings": len(leaderboard),
            "best": leaderboard[0], "leaderboard": leaderboard, "notes": ctx.notes, "timings": ctx.timings,
            "files": {"json": str(out / SWEEP_FILE), "csv": str(out / CSV_FILE), "png": str(out / PLOT_FILE),
                      "best_run": str(out / BEST_DIR)}}


def _save(summary: dict[str, Any], out: Path, folds: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(summary["leaderboard"], out / CSV_FILE)
    plot_leaderboard(summary["leaderboard"], out / PLOT_FILE, folds=folds)
    _write_json(summary, out)


def _write_json(summary: dict[str, Any], out: Path) -> None:
    atomic_write_bytes(out / SWEEP_FILE, (json.dumps(summary, indent=2) + "\n").encode())


# ------------------------------------------------------------------------------------------ refit


def candidate_of(row: dict[str, Any]) -> Candidate:
    """The head setting of a leaderboard row."""
    return Candidate(**{f: row[f] for f in Candidate.__dataclass_fields__})


def _refit_best(data: Any, run_dir: Path, best: dict[str, Any], options: dict[str, Any], n_images: int,
                **kw: Any) -> dict[str, Any]:
    """``train`` the best row's backbone and views with the grid narrowed to its one candidate.

    The sweep's grid options are kept (e.g. the MLP's epochs) and each list of choices is narrowed to
    the candidate's value, so ``train`` cross-validates that one setting on the same folds and refits
    it on every training image.
    """
    from .training import train

    c = candidate_of(best)
    narrow: dict[str, Any] = {**options, "head": [c.head], "source": [c.source], "class_weight": [c.class_weight],
                              "standardize": [c.standardize]}
    if c.head == "linear":
        narrow.update(C=[c.C], mlp=[])
    else:
        narrow.update(mlp=[c.hidden], mlp_source=[c.source])
    k = best["aug_views"]
    run = train(data, run_dir, backbone=best["backbone"], augment=best["augment"], aug_views=k or None,
                grid=narrow, **kw)
    refit_cv = run.metrics.get("cv", {})
    info = {"path": str(run_dir), "setting": run.info["head"]["setting"], "n_train": run.metrics["n_train"],
            "n_images_swept": n_images, "cv_accuracy": refit_cv.get("accuracy"),
            "cv_log_loss": refit_cv.get("log_loss")}
    if "val" in run.metrics:
        info["val_accuracy"] = run.metrics["val"]["accuracy"]
    if info["n_train"] != n_images:  # only when an image failed for another backbone but not for this one
        info["note"] = (f"the run was refitted on {info['n_train']} images; the sweep used the {n_images} that "
                        "every backbone could read")
    if info["setting"] != best["head_setting"]:  # the narrowed grid left more than one candidate
        info["note"] = f"the run holds '{info['setting']}', not the sweep's best '{best['head_setting']}'"
    return info
