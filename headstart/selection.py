"""Choose the head by cross-validation on cached features, then refit the winner on every image.

Once the frozen network's features are cached, another head setting costs a fraction of a second,
so :func:`select_head` tries a grid of them (:class:`Grid`) on the same stratified folds (duplicate
files share a fold), ranks them by out-of-fold log-loss at each setting's own temperature (accuracy
breaks ties) and returns the leaderboard; :func:`fit_candidate` trains the chosen setting on all
training images and folds its temperature into the head.

Why a temperature per setting: strong weight decay gives heads that rank the classes well but are
timid, weak decay heads that are over-confident; raw log-loss prefers the middle even where a
strongly regularised head, made confident by one number, is both more accurate and better
calibrated (intel_scenes: 106 errors instead of 117 over 3 nested-CV splits, log-loss 0.276 instead
of 0.322; see docs/selection.md). Each setting's temperature is fitted on its out-of-fold
probabilities, and its score is cross-fitted (each fold's images at the temperature of the other
folds), so no image is scored at a temperature fitted on itself.

Linear candidates of one feature source / standardisation / class weighting are solved together:
all folds in one batched L-BFGS, warm-started along the ``C`` path from strong to weak
regularisation (:mod:`headstart.linear_path`). MLP candidates train fold by fold and are dropped
early (raced) when they trail the best linear candidate on the folds seen so far by a wide margin;
the leaderboard says so.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ._constants import DEFAULT_CS, DEFAULT_FOLDS, DEFAULT_MLP_WIDTHS, HEAD_TYPES, MLP_MIN_IMAGES, SELECT_MAX_IMAGES
from .calibration import apply_temperature, cross_fitted_losses, fit_temperature, scale_head
from .errors import UsageError
from .folds import fold_count, make_folds, selection_sample
from .heads import LinearHead, MLPHead
from .linear_path import fold_problem, solve_path
from .sources import SOURCES, Classifier, check_source, fold_into_pooled, source_features

# DEFAULT_CS (scikit-learn's C: weight decay 1/(C n)), DEFAULT_MLP_WIDTHS, DEFAULT_FOLDS and MLP_MIN_IMAGES (an MLP
# needs data to beat a linear head; below this it is not tried unless asked for) live in headstart._constants.
IMBALANCE_RATIO = 1.5  # largest/smallest class above this adds class_weight="balanced" candidates
MAX_PATH_THREADS = 4  # linear paths solved at once (each holds its own copy of the rows) ...
PARALLEL_ROWS = 1000  # ... from this many training rows (images x views) up
RACE_MARGIN = (0.01, 1.1)  # an MLP is dropped when its log-loss > 0.01 + 1.1 x the best linear's so far
TEMPERATURE_PRIOR = 2.0  # log-normal prior on each setting's temperature (sd 0.5 in log T); see calibration.py
_EPS = 1e-15


@dataclass(frozen=True)
class Candidate:
    """One head setting: head type, feature source and the head's own parameters."""

    head: str = "linear"  # linear | mlp
    source: str = "pooled"  # pooled | logits | pooled+logits
    C: float | None = None  # linear: inverse L2 strength as in scikit-learn (weight decay 1/(C n))
    standardize: bool = False  # linear: scale features first (the MLP always does)
    hidden: int | None = None  # mlp: hidden width
    class_weight: str | None = None  # None or "balanced"
    epochs: int | None = None  # mlp: passes over the data (None: MLPHead's default, ~600 steps)

    @property
    def name(self) -> str:
        parts = [self.head]
        if self.head == "linear":
            parts += [f"C={self.C:g}"] + (["std"] if self.standardize else [])
        else:
            parts.append(f"hidden={self.hidden}" + (f" epochs={self.epochs}" if self.epochs else ""))
        parts.append(self.source)
        if self.class_weight:
            parts.append(self.class_weight)
        return " ".join(parts)

    def build(self, n_images: int, seed: int = 0) -> LinearHead | MLPHead:
        """An unfitted head for ``n_images`` training images (the weight decay scales with them)."""
        if self.head == "linear":
            assert self.C is not None
            return LinearHead(weight_decay=1.0 / (self.C * n_images), class_weight=self.class_weight,
                              standardize=self.standardize)
        assert self.hidden is not None
        return MLPHead(hidden=self.hidden, class_weight=self.class_weight, epochs=self.epochs, seed=seed)


@dataclass
class Grid:
    """The candidates tried; each dimension can be narrowed (CLI: ``--grid-*``)."""

    head: tuple[str, ...] = HEAD_TYPES
    C: tuple[float, ...] = DEFAULT_CS
    standardize: tuple[bool, ...] = (False, True)
    source: tuple[str, ...] = SOURCES
    mlp: tuple[int, ...] = DEFAULT_MLP_WIDTHS
    mlp_source: tuple[str, ...] = ("pooled",)  # MLPs cost seconds per fit: pooled features only, by default
    mlp_min_images: int = MLP_MIN_IMAGES  # fewer training images: no MLP candidates (noted)
    mlp_epochs: int | None = None  # None: MLPHead's default (about 600 optimiser steps)
    class_weight: tuple[str | None, ...] | None = None  # None: add "balanced" when classes are imbalanced
    max_images: int | None = SELECT_MAX_IMAGES  # rank on a stratified sample of at most this many (None: all)

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> Grid:
        """A grid from ``{"C": [...], "source": [...], ...}``; unknown keys or bad values raise UsageError."""
        options = dict(options or {})
        if options.get("mlp") and "mlp_min_images" not in options:
            options["mlp_min_images"] = 0  # widths asked for by name are tried whatever the data size
        unknown = set(options) - set(cls.__dataclass_fields__)
        if unknown:
            raise UsageError(f"unknown grid option(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        grid = cls(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in options.items()})
        grid.validate()
        return grid

    def validate(self) -> None:
        for name in ("head", "C", "standardize", "source", "mlp", "mlp_source"):
            if not isinstance(getattr(self, name), tuple):
                raise UsageError(f"grid '{name}' must be a list; got {getattr(self, name)!r}")
        if not self.head or set(self.head) - set(HEAD_TYPES):
            raise UsageError(f"grid head must list 'linear' and/or 'mlp'; got {list(self.head)}")
        if "linear" in self.head and (not self.C or not all(isinstance(c, (int, float)) and c > 0 for c in self.C)):
            raise UsageError(f"grid C must list numbers > 0 (scikit-learn's C); got {list(self.C)}")
        if "mlp" in self.head and not all(isinstance(h, int) and h > 0 for h in self.mlp):
            raise UsageError(f"grid mlp must list hidden widths (positive integers); got {list(self.mlp)}")
        if self.max_images is not None and not (isinstance(self.max_images, int) and self.max_images >= 100):
            raise UsageError(f"grid max_images must be a whole number >= 100 or None (all); got {self.max_images!r}")
        if self.mlp_epochs is not None and not (isinstance(self.mlp_epochs, int) and self.mlp_epochs > 0):
            raise UsageError(f"grid mlp_epochs must be a positive integer or None; got {self.mlp_epochs!r}")
        if not self.standardize or not all(isinstance(s, bool) for s in self.standardize):
            raise UsageError(f"grid standardize must list true/false; got {list(self.standardize)}")
        if not self.source:
            raise UsageError("grid source must list at least one of " + ", ".join(SOURCES))
        if "linear" not in self.head and (not self.mlp or not self.mlp_source):
            raise UsageError("the grid holds no candidate: MLP heads only, but no mlp widths or mlp sources")
        for s in self.source + self.mlp_source:
            check_source(s)
        if self.class_weight is not None and (
                not self.class_weight or set(self.class_weight) - {None, "balanced"}):
            raise UsageError(f"grid class_weight must list none and/or balanced; got {list(self.class_weight)}")

    def needs_classifier(self) -> bool:
        sources = (self.source if "linear" in self.head else ()) + (
            self.mlp_source if "mlp" in self.head and self.mlp else ())
        return any(s != "pooled" for s in sources)

    def candidates(self, counts: Sequence[int]) -> list[Candidate]:
        """Every setting of the grid for classes with ``counts`` images."""
        weights: tuple[str | None, ...] = self.class_weight or (
            (None, "balanced") if max(counts) > IMBALANCE_RATIO * max(1, min(counts)) else (None,))
        out = []
        for source in self.source:
            for cw in weights:
                if "linear" in self.head:
                    out += [Candidate("linear", source, C=float(c), standardize=s, class_weight=cw)
                            for s in self.standardize for c in sorted(self.C)]
        if "mlp" in self.head:
            out += [Candidate("mlp", source, hidden=h, class_weight=cw, epochs=self.mlp_epochs)
                    for source in self.mlp_source for cw in weights for h in self.mlp]
        return out


@dataclass
class Selection:
    """What :func:`select_head` found: the leaderboard (best first), the winner and its out-of-fold scores."""

    leaderboard: list[dict[str, Any]]
    best: Candidate
    folds: int
    oof_proba: np.ndarray  # (n_images, n_classes): the winner's out-of-fold probabilities, at its temperature
    fold_accuracy: list[float]
    seconds: float
    notes: list[str] = field(default_factory=list)
    temperature: float = 1.0  # the winner's logits are divided by it (fit_candidate folds it into the head)
    sample: np.ndarray | None = None  # the images ranked on (indices into x; oof_proba's rows), None: every image

    def summary(self, top: int | None = None) -> dict[str, Any]:
        best = self.leaderboard[0]
        return {"folds": self.folds, "chosen": self.best.name, "candidate": asdict(self.best),
                "cv_accuracy": best["cv_accuracy"], "cv_std": best["cv_std"], "cv_log_loss": best["cv_log_loss"],
                "temperature": round(self.temperature, 4),
                "n_candidates": len(self.leaderboard), "images_ranked_on": len(self.oof_proba),
                "seconds": round(self.seconds, 3), "notes": self.notes,
                "leaderboard": self.leaderboard[:top] if top else self.leaderboard}


def grid_with_classifier(options: dict[str, Any], backbone: Any, weights: str,
                         memo: Any = None) -> tuple[Grid, Classifier | None, str | None]:
    """The grid of ``options`` and, when it uses the logits sources, the backbone's own classifier.

    The default sources fall back to ``pooled`` (with a note, the third item) for a backbone that has
    no classifier (``--weights random``, headless models); a grid that names the sources explicitly
    raises :class:`UsageError` instead.
    """
    from .sources import backbone_classifier

    grid = Grid.from_options(options)
    if not grid.needs_classifier():
        return grid, None, None
    try:
        return grid, backbone_classifier(backbone, weights, memo=memo), None
    except UsageError as exc:
        if "source" in options:
            raise
        return Grid.from_options({**options, "source": ["pooled"]}), None, f"{exc}; selecting on pooled features only"


# -------------------------------------------------------------------------------------- scoring


def _score(proba_by_fold: Sequence[np.ndarray], folds: list[tuple[np.ndarray, ...]], y: np.ndarray,
           k: int) -> dict[str, Any]:
    n = sum(len(te) for _, te in folds)
    oof = np.zeros((len(y), k))
    for p, (_, te) in zip(proba_by_fold, folds):
        oof[te] = p
    seen = np.concatenate([te for _, te in folds[:len(proba_by_fold)]])
    p_true = np.clip(oof[seen, y[seen]], _EPS, 1.0)
    accs = [float((p.argmax(1) == y[te]).mean()) for p, (_, te) in zip(proba_by_fold, folds)]
    return {"cv_log_loss": float(-np.log(p_true).mean()), "cv_accuracy": float((oof[seen].argmax(1) == y[seen]).mean()),
            "cv_std": float(np.std(accs)), "fold_accuracy": accs, "folds_done": len(proba_by_fold),
            "complete": len(seen) == n, "oof": oof}


def _rank_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (not row["complete"], round(row["cv_log_loss"], 4), -row["cv_accuracy"], row.get("order", 0))


def _calibrate(row: dict[str, Any], folds: list[tuple[np.ndarray, ...]], y: np.ndarray) -> dict[str, Any]:
    """A complete row scored at its own temperature: ``cv_log_loss`` cross-fitted, the raw one kept aside."""
    if not row["complete"]:  # raced out: ranked after every complete row anyway
        return {**row, "cv_log_loss_raw": row["cv_log_loss"], "temperature": 1.0}
    t = fit_temperature(row["oof"], y, TEMPERATURE_PRIOR)
    return {**row, "cv_log_loss_raw": row["cv_log_loss"], "temperature": t, "oof": apply_temperature(row["oof"], t),
            "cv_log_loss": float(cross_fitted_losses(row["oof"], y, folds, TEMPERATURE_PRIOR).mean())}


def format_leaderboard(rows: Sequence[dict[str, Any]], top: int = 10) -> str:
    """The leaderboard as a text table (best first)."""
    lines = [f"{'rank':>4}  {'setting':<38} {'CV accuracy':>17} {'log-loss':>8} {'T':>5} {'seconds':>8}"]
    for i, row in enumerate(rows[:top], 1):
        acc = f"{row['cv_accuracy']:.4f} +- {row['cv_std']:.4f}"
        note = "" if row["complete"] else f"  (dropped after {row['folds_done']} fold(s): trailing)"
        lines.append(f"{i:>4}  {row['setting']:<38} {acc:>17} {row['cv_log_loss']:>8.4f} "
                     f"{row.get('temperature', 1.0):>5.2f} {row['seconds']:>8.2f}{note}")
    if len(rows) > top:
        lines.append(f"      ... {len(rows) - top} more (see metrics.json)")
    lines.append("      log-loss at each setting's temperature T (logits / T), fitted out of fold")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- selection


def select_head(x: np.ndarray, y: np.ndarray, *, grid: Grid | None = None, folds: int = DEFAULT_FOLDS,
                groups: Sequence[Any] | None = None, seed: int = 0, classifier: Classifier | None = None,
                progress: bool = False) -> Selection:
    """Cross-validate every candidate of ``grid`` on features ``x`` and rank them.

    Args:
        x: pooled features, ``(n, d)`` or ``(n, views, d)`` (view 0 is the clean one; held-out images
            are scored on it, training folds use every view).
        y: integer labels ``0..k-1``.
        grid: the candidates (default :class:`Grid`).
        folds: k of the stratified k-fold (fewer when the smallest class is smaller; noted).
        groups: e.g. content hashes; a group never spans two folds.
        classifier: the backbone's own classifier, needed by the ``logits`` sources.

    Returns:
        :class:`Selection`, leaderboard sorted best first.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):  # small products: 2 BLAS threads cost 5-7x here
        return _select(x, y, grid or Grid(), folds, groups, seed, classifier, progress)


def _select(x: np.ndarray, y: np.ndarray, grid: Grid, folds: int, groups: Sequence[Any] | None, seed: int,
            classifier: Classifier | None, progress: bool) -> Selection:
    start = time.perf_counter()
    grid.validate()
    x = x[:, None, :] if x.ndim == 2 else x
    y = np.asarray(y, dtype=np.int64)
    k = int(y.max()) + 1
    if y.ndim != 1 or len(y) != len(x) or (len(y) and (y.min() < 0)):
        raise UsageError(f"y must hold one integer label 0..k-1 per row of x; got shape {y.shape} for {len(x)} rows")
    sample = selection_sample(y, groups, grid.max_images, folds, seed)
    notes = []
    if sample is not None:
        notes.append(f"settings ranked on a stratified sample of {len(sample)} of {len(y)} images (the winner is "
                     "refitted on all; grid max_images=None, CLI --grid-max-images all, ranks on every image)")
        x, y = x[sample], y[sample]
        groups = None if groups is None else [groups[i] for i in sample]
    n_folds, note = fold_count(y, folds, groups)
    notes += [note] if note else []
    if grid.needs_classifier() and classifier is None:
        if grid.source != SOURCES or grid.mlp_source != ("pooled",):
            raise UsageError("the grid asks for a 'logits' feature source but no classifier was given (pass "
                             "classifier=, or grid source=['pooled']; CLI: --grid-source pooled)")
        grid = replace(grid, source=("pooled",))
        notes.append("no classifier given: selecting on pooled features only")
    fold_list = make_folds(y, groups, n_folds, seed)
    candidates = grid.candidates(np.bincount(y, minlength=k).tolist())
    if len(y) < grid.mlp_min_images and any(c.head == "mlp" for c in candidates):
        if all(c.head == "mlp" for c in candidates):
            raise UsageError(f"the grid holds only MLP heads, which need at least {grid.mlp_min_images} training "
                             f"images (there are {len(y)}); name widths to try them anyway (grid mlp=[...], CLI "
                             "--grid-mlp 64,256) or add linear heads")
        candidates = [c for c in candidates if c.head != "mlp"]
        notes.append(f"no mlp candidates: {len(y)} training images (< {grid.mlp_min_images}); a linear head is the "
                     "right size for so few (--grid-mlp 64,256 tries them anyway)")
    rows: list[dict[str, Any]] = []
    total = sum(len(fold_list) if c.head == "mlp" else 1 for c in candidates)
    with tqdm(total=total, desc="selecting head", unit="fit", file=sys.stderr, disable=not progress,
              leave=False) as bar:
        feats_of: dict[str, np.ndarray] = {}
        for source in dict.fromkeys(c.source for c in candidates):
            feats_of[source] = source_features(x, source, classifier)
        rows += _linear_rows([c for c in candidates if c.head == "linear"], feats_of, y, fold_list, k, bar)
        best_linear = min((r for r in rows), key=_rank_key, default=None)
        for c in (c for c in candidates if c.head == "mlp"):
            rows.append(_race_mlp(c, feats_of[c.source], y, fold_list, k, seed, best_linear, bar))
    rows = sorted((_calibrate({**row, "order": i}, fold_list, y) for i, row in enumerate(rows)), key=_rank_key)
    best = rows[0]
    leaderboard = [{key: v for key, v in r.items() if key not in ("oof", "candidate", "order")}
                   for r in rows]
    for r in leaderboard:
        r["seconds"] = round(r["seconds"], 4)
    return Selection(leaderboard, best["candidate"], len(fold_list), best["oof"], best["fold_accuracy"],
                     time.perf_counter() - start, notes, best["temperature"], sample)


def _linear_rows(linear: list[Candidate], feats_of: dict[str, np.ndarray], y: np.ndarray,
                 folds: list[tuple[np.ndarray, ...]], k: int, bar: Any) -> list[dict[str, Any]]:
    """Score the linear candidates: one path per (source, standardisation, class weighting).

    The paths are independent. On many rows their time goes to BLAS products and numpy, which
    release the GIL, so they run in threads: on 2 cores two paths take 0.57x the time of one after
    the other (5,000 images). On few rows Python overhead dominates and threads only contend for the
    GIL (intel_scenes, 360 images: 1.2x slower), so they run one after the other; 1,200 digits took
    0.63x the serial time in threads.
    """
    from concurrent.futures import ThreadPoolExecutor

    keys = list(dict.fromkeys((c.source, c.standardize, c.class_weight) for c in linear))
    if not keys:
        return []
    n, n_views, _ = feats_of[keys[0][0]].shape
    threads = min(len(keys), os.cpu_count() or 1, MAX_PATH_THREADS) if n * n_views >= PARALLEL_ROWS else 1

    def path(key: tuple[str, bool, str | None]) -> list[dict[str, Any]]:
        group = [c for c in linear if (c.source, c.standardize, c.class_weight) == key]
        t0 = time.perf_counter()
        problem = fold_problem(feats_of[key[0]], y, folds, key[1], key[2], k)
        probas = solve_path(problem, [c.C for c in group], k, [y[te] for _, te in folds])
        each = (time.perf_counter() - t0) / len(group)
        bar.update(len(group))
        return [{**_score(p, folds, y, k), "setting": c.name, "candidate": c, "seconds": each}
                for c, p in zip(group, probas)]

    with ThreadPoolExecutor(threads) as pool:
        return [row for rows in pool.map(path, keys) for row in rows]


def _race_mlp(c: Candidate, feats: np.ndarray, y: np.ndarray, folds: list[tuple[np.ndarray, ...]], k: int,
              seed: int, best_linear: dict[str, Any] | None, bar: Any) -> dict[str, Any]:
    """Cross-validate an MLP candidate fold by fold; stop once it clearly trails the best linear one."""
    t0 = time.perf_counter()
    probas: list[np.ndarray] = []
    for f, (tr, te) in enumerate(folds):
        head = c.build(len(tr), seed).fit_views(feats[tr], y[tr])
        p = np.zeros((len(te), k))
        p[:, head.classes_] = head.predict_proba(feats[te, 0])
        probas.append(p)
        bar.update(1)
        if best_linear is not None and f + 1 < len(folds):
            seen = np.concatenate([te for _, te in folds[:f + 1]])
            ref = -np.log(np.clip(best_linear["oof"][seen, y[seen]], _EPS, 1)).mean()
            mine = _score(probas, folds, y, k)["cv_log_loss"]
            if mine > RACE_MARGIN[0] + RACE_MARGIN[1] * ref:
                bar.update(len(folds) - f - 1)
                break
    return {**_score(probas, folds, y, k), "setting": c.name, "candidate": c, "seconds": time.perf_counter() - t0}


def fit_candidate(c: Candidate, x: np.ndarray, y: np.ndarray, *, classifier: Classifier | None = None,
                  seed: int = 0, temperature: float = 1.0) -> LinearHead | MLPHead:
    """Train ``c`` on every image of ``x`` (``(n, d)`` or ``(n, views, d)``) and return a head on pooled features.

    ``y`` holds the labels the head should answer with (class names). A head chosen on the
    ``logits`` sources is folded into a head on pooled features (:func:`~headstart.sources.fold_into_pooled`);
    its output layer is divided by ``temperature`` (the selection's, :attr:`Selection.temperature`).
    """
    x = x[:, None, :] if x.ndim == 2 else x
    feats = source_features(x, c.source, classifier)
    head = c.build(len(x), seed).fit_views(feats, y)
    x_mean = x.reshape(-1, x.shape[2]).astype(np.float64).mean(0)
    return scale_head(fold_into_pooled(head, c.source, classifier, x_mean), temperature)


def candidate_from_dict(value: dict[str, Any]) -> Candidate:
    """The :class:`Candidate` saved by ``asdict`` (e.g. in a run's metrics)."""
    return Candidate(**value)


def log_loss(proba: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(proba[np.arange(len(y)), y], _EPS, 1.0)).mean())

