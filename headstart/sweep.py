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

import csv
import io
import json
import os
import sys
import time
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .augmented import build_training_pipeline
from .backbones import DEFAULT_BACKBONE, Backbone, check_backbone_name, create_backbone
from .cache import FeatureCache, atomic_write_bytes
from .data import load_images
from .errors import DataError, RunError, UnknownBackboneError, UsageError
from .features import View, augmented_views, clean_view, extract_views
from .selection import DEFAULT_FOLDS, Candidate, Grid, grid_with_classifier, select_head
from .sources import Classifier

SWEEP_FILE, CSV_FILE, PLOT_FILE, BEST_DIR = "sweep.json", "sweep.csv", "sweep.png", "best"
DEFAULT_AUGMENT = "standard"  # the preset when a view count > 0 is asked for without --augment
PLOT_TOP = 20
SCORES = ("cv_accuracy", "cv_std", "cv_log_loss", "cv_log_loss_raw", "temperature", "fold_accuracy", "folds_done",
          "complete", "seconds")


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
    from .transforms import PRESETS

    wants = any(k > 0 for k in counts)
    if augment is None:
        return DEFAULT_AUGMENT if wants else "none"
    if augment not in PRESETS:
        raise UsageError(f"augment (--augment) must be one of {', '.join(PRESETS)}; got '{augment}'")
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


def _check_numbers(cv: int | None, seed: int, batch_size: int, num_workers: int | None) -> None:
    if cv is not None and not (isinstance(cv, int) and cv >= 2):
        raise UsageError(f"cv (--cv) must be at least 2 folds; got {cv!r}")
    if not (isinstance(seed, int) and seed >= 0):
        raise UsageError(f"seed (--seed) must be an integer >= 0; got {seed!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise UsageError(f"batch_size (--batch-size) must be a positive integer; got {batch_size!r}")
    if num_workers is not None and not (isinstance(num_workers, int) and num_workers >= 0):
        raise UsageError(f"num_workers (--workers) must be an integer >= 0; got {num_workers!r}")


# ---------------------------------------------------------------------------------------- features


@dataclass(frozen=True)
class _ViewPlan:
    """The views extracted per training image: the clean one and ``n_aug`` augmented ones."""

    augment: str  # preset of the augmented views ("none" when n_aug is 0)
    aug_params: dict[str, Any]  # overrides of the preset
    n_aug: int  # the largest count of the sweep; a smaller count uses the first views
    seed: int  # view v of an image is the same in any run with this seed and pipeline


def _views(bb: Backbone, plan: _ViewPlan, train_paths: Sequence[Path], cache: FeatureCache,
           progress: bool) -> list[View]:
    """The clean view and ``plan.n_aug`` augmented views, exactly as ``train`` makes them for this backbone."""
    views = [clean_view(bb.data_config)]
    if plan.n_aug:
        pipeline = build_training_pipeline(plan.augment, bb.data_config["input_size"][1:], plan.aug_params,
                                           train_paths, cache, seed=plan.seed, progress=progress)
        views += augmented_views(pipeline, bb.data_config, plan.n_aug, seed=plan.seed)
    return views


def _extract_all(names: Sequence[str], paths: Sequence[Path], listing_bad: Sequence[Any], options: dict[str, Any],
                 weights: str, setup: _ViewPlan, cache: FeatureCache, common: dict[str, Any],
                 timings: dict[str, Any], notes: list[str],
                 progress: bool) -> tuple[np.ndarray, dict[str, tuple[Grid, Classifier | None]]]:
    """Extract (or find cached) every view of every backbone, without reading them back.

    Returns the images usable with every backbone (so every pair has the same images and folds) and
    each backbone's grid and classifier, resolved before its extraction so a bad grid fails early.
    """
    ok = np.ones(len(paths), dtype=bool)
    bad: dict[str, str] = {b.path: b.reason for b in listing_bad}
    grids = {}
    for i, name in enumerate(names, 1):
        t0 = time.perf_counter()
        what = f"clean + {setup.n_aug} '{setup.augment}' views" if setup.n_aug else "clean view"
        _log(progress, f"sweep: backbone {i}/{len(names)} {name}: features of {len(paths)} images ({what})")
        bb = create_backbone(name, weights, memo=cache)
        grids[name] = _grid_for(options, bb, weights, cache, notes, progress)
        views = _views(bb, setup, paths, cache, progress)
        result = extract_views(bb, paths, views, cache=cache, progress=progress, desc=f"{name} views", load=False,
                               **common)
        ok &= result.ok
        bad.update({b.path: b.reason for b in result.bad_files})
        seconds = time.perf_counter() - t0
        timings["features"][name] = {"seconds": round(seconds, 3), "views_computed": result.n_computed,
                                     "views_cached": result.n_cached}
        _log(progress, f"sweep: {name}: {result.n_computed} views computed, {result.n_cached} from cache, "
                       f"{len(result.bad_files)} bad, {seconds:.1f}s")
    for path, reason in bad.items():
        _log(progress, f"skipped {path}: {reason}")
    return ok, grids


def _grid_for(options: dict[str, Any], bb: Backbone, weights: str, cache: FeatureCache, notes: list[str],
              progress: bool) -> tuple[Grid, Classifier | None]:
    """The grid and, for the logits sources, the backbone's classifier (as ``train`` chooses them)."""
    grid, classifier, note = grid_with_classifier(options, bb, weights, memo=cache)
    if note:
        notes.append(f"{bb.name}: {note}")
        _log(progress, f"note: {notes[-1]}")
    return grid, classifier


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
    names = parse_backbones(backbone)
    counts = check_views(aug_views)
    augment = resolve_augment(augment, counts)
    aug_params = dict(aug_params or {})
    options = dict(grid or {})
    Grid.from_options(options)  # bad grid values fail before any heavy work
    _check_numbers(cv, seed, batch_size, num_workers)
    _check_out(out)
    folds_asked = cv or DEFAULT_FOLDS
    loaded = load_images(data, val_split=0, seed=seed)
    train_set = loaded.train
    notes = list(loaded.notes)
    for note in notes:
        _log(progress, f"note: {note}")
    common = {"precision": precision, "batch_size": batch_size, "num_workers": num_workers}
    timings: dict[str, Any] = {"features": {}, "selection": {}}
    setup = _ViewPlan(augment, aug_params, max(counts), seed)
    with FeatureCache(cache_dir) as cache:
        ok, grids = _extract_all(names, train_set.paths, loaded.bad_files, options, weights, setup, cache, common,
                                 timings, notes, progress)
        y = train_set.labels[ok]
        class_names = train_set.class_names
        present = np.bincount(y, minlength=len(class_names))
        if present.min() < 2:
            short = [class_names[j] for j in np.flatnonzero(present < 2)]
            raise DataError(f"class(es) {short} have fewer than 2 usable training images; the sweep compares "
                            f"settings by cross-validation, which needs at least 2 per class")
        keys, _ = cache.image_keys([p for p, good in zip(train_set.paths, ok) if good])
        groups = [k if k is not None else f"unreadable:{j}" for j, k in enumerate(keys)]  # duplicates share a fold
        rows: list[dict[str, Any]] = []
        winners: set[int] = set()  # row index of each pair's winner
        folds_used = folds_asked
        for name in names:  # the second pass: read the views back, cross-validate the grid on each view count
            bb = create_backbone(name, weights, memo=cache)
            views = _views(bb, setup, train_set.paths, cache, False)
            x_all = extract_views(bb, train_set.paths, views, cache=cache, progress=False, **common).features[ok]
            grid_k, classifier = grids[name]
            by_name = {c.name: c for c in grid_k.candidates(present.tolist())}
            for k in counts:
                t0 = time.perf_counter()
                selection = select_head(x_all[:, :1 + k], y, grid=grid_k, folds=folds_asked, groups=groups,
                                        seed=seed, classifier=classifier, progress=progress)
                folds_used = selection.folds
                for note in (n for n in selection.notes if n not in notes):
                    notes.append(note)
                    _log(progress, f"note: {note}")
                winners.add(len(rows))
                rows += [_row(r, name, k, augment, by_name[r["setting"]]) for r in selection.leaderboard]
                seconds = time.perf_counter() - t0
                timings["selection"][f"{name} x{k}"] = round(seconds, 3)
                _log(progress, f"sweep: {name}, {_views_label(k, augment)}: {len(selection.leaderboard)} head "
                               f"settings, best {selection.leaderboard[0]['setting']} (CV accuracy "
                               f"{selection.leaderboard[0]['cv_accuracy']:.4f}), {seconds:.1f}s")
            del x_all
    leaderboard = rank_rows(rows, winners)
    best = leaderboard[0]
    settings = {"data": str(data), "backbones": names, "weights": weights, "aug_views": counts, "augment": augment,
                "aug_params": aug_params, "grid": options, "cv": folds_asked, "folds": folds_used, "seed": seed,
                "precision": precision, "n_images": len(y), "class_names": list(class_names),
                "class_counts": {n: int(c) for n, c in zip(class_names, present)}}
    summary: dict[str, Any] = {
        "headstart_version": __version__, "settings": settings, "n_settings": len(leaderboard), "best": best,
        "leaderboard": leaderboard, "notes": notes, "timings": timings,
        "files": {"json": str(out / SWEEP_FILE), "csv": str(out / CSV_FILE), "png": str(out / PLOT_FILE),
                  "best_run": str(out / BEST_DIR)}}
    out.mkdir(parents=True, exist_ok=True)
    write_csv(leaderboard, out / CSV_FILE)
    plot_leaderboard(leaderboard, out / PLOT_FILE, folds=folds_used)
    _write_json(summary, out)  # the leaderboard is kept even if the refit below fails
    _log(progress, f"sweep: {len(leaderboard)} settings; best {best['setting']}; refitting it on all "
                   f"{len(y)} training images into {out / BEST_DIR}")
    t0 = time.perf_counter()
    summary["best_run"] = _refit_best(data, out / BEST_DIR, best, options, len(y), weights=weights, cv=cv,
                                      seed=seed, aug_params=aug_params, cache_dir=cache_dir, progress=progress,
                                      **common)
    timings["refit"] = round(time.perf_counter() - t0, 3)
    timings["total"] = round(time.perf_counter() - start, 3)
    _write_json(summary, out)
    return summary


def _views_label(k: int, augment: str) -> str:
    return "clean" if k == 0 else f"{augment} x{k}"


def _row(row: dict[str, Any], backbone: str, k: int, augment: str, candidate: Candidate) -> dict[str, Any]:
    """A selection row naming its backbone and views, with the candidate's fields spelled out."""
    return {"setting": f"{backbone} | {_views_label(k, augment)} | {row['setting']}", "backbone": backbone,
            "aug_views": k, "augment": augment if k else "none", "head_setting": row["setting"],
            **asdict(candidate), **{key: row[key] for key in SCORES}}


def csv_columns() -> list[str]:
    """The columns of ``sweep.csv``: rank, backbone, views, the head setting's fields, the scores, the full name."""
    return ["rank", "backbone", "aug_views", "augment", "head_setting", *Candidate.__dataclass_fields__,
            *SCORES, "pair_winner", "setting"]


def rank_rows(rows: Sequence[dict[str, Any]], winners: Collection[int] = ()) -> list[dict[str, Any]]:
    """Rows best first, with ``rank`` and ``pair_winner``, ranked as the selection ranks its own.

    ``winners`` holds the index of each (backbone, views) pair's first row, the setting ``train``
    would choose there. Rows go by log-loss (to 4 places; complete first, accuracy breaks ties, then
    the order given: backbones as listed, fewer views first).
    """
    def key(i: int) -> tuple[Any, ...]:
        return (not rows[i]["complete"], round(rows[i]["cv_log_loss"], 4), -rows[i]["cv_accuracy"], i)

    order = sorted(range(len(rows)), key=key)
    return [{"rank": r, **rows[i], "pair_winner": i in winners} for r, i in enumerate(order, 1)]


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


# ------------------------------------------------------------------------------------------ output


def _write_json(summary: dict[str, Any], out: Path) -> None:
    atomic_write_bytes(out / SWEEP_FILE, (json.dumps(summary, indent=2) + "\n").encode())


def write_csv(leaderboard: Sequence[dict[str, Any]], path: Path) -> None:
    """One row per setting, best first; ``fold_accuracy`` joined by ``;``, absent values empty."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = csv_columns()
    writer.writerow(columns)
    for row in leaderboard:
        cells = {**row, "fold_accuracy": ";".join(repr(a) for a in row["fold_accuracy"])}
        writer.writerow(["" if cells.get(col) is None else cells[col] for col in columns])
    atomic_write_bytes(path, buffer.getvalue().encode())


def format_sweep(leaderboard: Sequence[dict[str, Any]], top: int = 20) -> str:
    """The leaderboard as a text table: rank, backbone, views, head setting, CV accuracy +- std, log-loss, seconds."""
    wb = max([len("backbone")] + [len(r["backbone"]) for r in leaderboard[:top]])
    wv = max([len("views")] + [len(_views_label(r["aug_views"], r["augment"])) for r in leaderboard[:top]])
    wh = max([len("head setting")] + [len(r["head_setting"]) for r in leaderboard[:top]])
    lines = [f"{'rank':>4}  {'backbone':<{wb}}  {'views':<{wv}}  {'head setting':<{wh}}  {'CV accuracy':>17}  "
             f"{'log-loss':>8}  {'seconds':>7}"]
    for row in leaderboard[:top]:
        acc = f"{row['cv_accuracy']:.4f} +- {row['cv_std']:.4f}"
        note = "" if row["complete"] else f"  (dropped after {row['folds_done']} fold(s): trailing)"
        views = _views_label(row["aug_views"], row["augment"])
        lines.append(f"{row['rank']:>4}  {row['backbone']:<{wb}}  {views:<{wv}}  {row['head_setting']:<{wh}}"
                     f"  {acc:>17}  {row['cv_log_loss']:>8.4f}  {row['seconds']:>7.2f}{note}")
    if len(leaderboard) > top:
        lines.append(f"      ... {len(leaderboard) - top} more (see {CSV_FILE})")
    return "\n".join(lines)


def plot_rows(leaderboard: Sequence[dict[str, Any]], top: int = PLOT_TOP) -> tuple[list[dict[str, Any]], set[int]]:
    """The rows to plot, in rank order: the winner of each (backbone, views) pair, then the best others up to ``top``.

    Returns the rows and the ranks of the pairs' winners (``pair_winner``; else each pair's first row).
    """
    pair_best: dict[tuple[str, int], int] = {}
    for row in sorted(leaderboard, key=lambda r: (not r.get("pair_winner"), r["rank"])):
        pair_best.setdefault((row["backbone"], row["aug_views"]), row["rank"])
    keep = set(pair_best.values())
    for row in leaderboard:
        if len(keep) >= top:
            break
        keep.add(row["rank"])
    return [r for r in leaderboard if r["rank"] in keep], set(pair_best.values())


def plot_leaderboard(leaderboard: Sequence[dict[str, Any]], path: Path, *, top: int = PLOT_TOP,
                     folds: int | None = None) -> None:
    """A PNG of the top settings' CV accuracy with +- one standard deviation over folds, best at the top.

    The winner of every (backbone, views) pair, the setting ``train`` would choose there, is always
    shown (in bold), so the plot compares them even when one pair holds all the top ranks.
    """
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend, no GUI
    from matplotlib.lines import Line2D

    rows, pair_best = plot_rows(leaderboard, top)
    acc = np.asarray([r["cv_accuracy"] for r in rows])
    std = np.asarray([r["cv_std"] for r in rows])
    backbones = list(dict.fromkeys(r["backbone"] for r in leaderboard))
    view_counts = sorted({r["aug_views"] for r in leaderboard})
    colors = {b: f"C{i % 10}" for i, b in enumerate(backbones)}
    markers = {k: "osD^v<>ph*"[i % 10] for i, k in enumerate(view_counts)}
    fig = Figure(figsize=(12, 2.2 + 0.3 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    for i, r in enumerate(rows):
        ax.errorbar(acc[i], i, xerr=std[i], fmt=markers[r["aug_views"]], color=colors[r["backbone"]], capsize=3,
                    markersize=6, alpha=1.0 if r["complete"] else 0.4)
        ax.annotate(f"{acc[i]:.3f} +- {std[i]:.3f}   log-loss {r['cv_log_loss']:.3f}", (1.0, i),
                    xycoords=ax.get_yaxis_transform(), xytext=(8, 0), textcoords="offset points", va="center",
                    fontsize=8, family="monospace")  # a column right of the axes, never over a point
    labels = [f"{r['rank']}. {r['backbone']} | {_views_label(r['aug_views'], r['augment'])} | {r['head_setting']}"
              + ("" if r["complete"] else " (dropped)") for r in rows]
    ax.set_yticks(range(len(rows)), [label.replace("$", r"\$") for label in labels], fontsize=8)
    for tick, r in zip(ax.get_yticklabels(), rows):
        tick.set_fontweight("bold" if r["rank"] in pair_best else "normal")
    ax.set_ylim(len(rows) - 0.5, -0.5)  # best at the top
    low = float((acc - std).min()) if len(rows) else 0.0
    high = min(1.0, float((acc + std).max())) if len(rows) else 1.0  # no accuracy above 1, whatever the std
    pad = 0.05 * max(high - low, 0.02)
    ax.set_xlim(low - pad, high + pad)
    ax.grid(axis="x", alpha=0.3)
    cv = f"{folds}-fold " if folds else ""
    ax.set_xlabel(f"{cv}CV accuracy (mean +- std over folds)")
    ax.set_title(f"headstart sweep: {len(rows)} of {len(leaderboard)} settings, best first; bold: the winner of its "
                 "backbone and views\n(ranked as the head selection ranks: CV log-loss, accuracy among near-ties)",
                 fontsize=10)
    handles = [Line2D([], [], color=colors[b], marker="o", linestyle="", label=b) for b in backbones]
    handles += [Line2D([], [], color="0.4", marker=markers[k], linestyle="",
                       label="clean view only" if k == 0 else f"clean + {k} augmented views") for k in view_counts]
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncols=min(len(handles), 6), frameon=False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())
